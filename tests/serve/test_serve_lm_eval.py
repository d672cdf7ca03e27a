"""lm-eval through the server gives the scores lm-eval's own ``hf`` model gives on the same weights.

The tasks are local files (``lm_eval_tasks/``) and everything runs offline: the tokenizer and
the model are read from the locally built model directory, datasets from JSON lines.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import LiveServer

# Read by huggingface_hub and datasets at import time: no network, ever.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

TASKS = Path(__file__).parent / "lm_eval_tasks"
# A Jinja template in the Hugging Face style, so that lm-eval's hf model renders exactly the
# text the server renders.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture
def tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TaskManager:
    # The task files name their data relative to themselves; datasets resolves from the cwd.
    copy = tmp_path / "tasks"
    shutil.copytree(TASKS, copy)
    monkeypatch.chdir(copy)
    return TaskManager(include_path=str(copy))


def _evaluate(
    model: str, model_args: dict[str, Any], task: str, tasks: TaskManager, **kw: Any
) -> Any:
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task],
        task_manager=tasks,
        log_samples=True,
        batch_size=1,
        **kw,
    )


def _hf(model_dir: Path) -> dict[str, Any]:
    return {"pretrained": str(model_dir), "dtype": "float64", "device": "cpu"}


def _api(server: LiveServer, path: str, model_dir: Path) -> dict[str, Any]:
    return {
        "model": "tiny",
        "base_url": server.url + path,
        "tokenizer_backend": "huggingface",
        "tokenizer": str(model_dir),
        "max_length": 256,
        "num_concurrent": 1,
        "max_retries": 1,
    }


def _responses(result: Any, task: str) -> list[Any]:
    return [s["filtered_resps"] for s in result["samples"][task]]


def test_local_completions_loglikelihood_equals_hf(
    server: LiveServer, tiny_model_dir: Path, tasks: TaskManager
) -> None:
    hf = _evaluate("hf", _hf(tiny_model_dir), "phalanx_mc", tasks)
    api = _evaluate(
        "local-completions", _api(server, "/v1/completions", tiny_model_dir), "phalanx_mc", tasks
    )
    assert api["results"]["phalanx_mc"]["acc,none"] == hf["results"]["phalanx_mc"]["acc,none"]
    hf_scores = [[ll for ll, _ in doc] for doc in _responses(hf, "phalanx_mc")]
    api_scores = [[ll for ll, _ in doc] for doc in _responses(api, "phalanx_mc")]
    assert len(api_scores) == 6
    assert api_scores == [pytest.approx(doc, abs=1e-5) for doc in hf_scores]
    greedy = [[g for _, g in doc] for doc in _responses(api, "phalanx_mc")]
    assert greedy == [[g for _, g in doc] for doc in _responses(hf, "phalanx_mc")]


def test_local_completions_generation_equals_hf(
    server: LiveServer, tiny_model_dir: Path, tasks: TaskManager
) -> None:
    hf = _evaluate("hf", _hf(tiny_model_dir), "phalanx_gen", tasks)
    api = _evaluate(
        "local-completions", _api(server, "/v1/completions", tiny_model_dir), "phalanx_gen", tasks
    )
    assert _responses(api, "phalanx_gen") == _responses(hf, "phalanx_gen")
    assert any(r[0] for r in _responses(api, "phalanx_gen")), "nothing was generated"
    em = "exact_match,none"
    assert api["results"]["phalanx_gen"][em] == hf["results"]["phalanx_gen"][em]


def test_local_chat_completions_generation_equals_hf(
    make_server: Callable[..., LiveServer], tiny_model_dir: Path, tmp_path: Path, tasks: TaskManager
) -> None:
    chat_model = tmp_path / "tiny-chat"
    shutil.copytree(tiny_model_dir, chat_model)
    config_file = chat_model / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_file.write_text(json.dumps(config))
    server = make_server(model=str(chat_model))
    hf = _evaluate("hf", _hf(chat_model), "phalanx_gen", tasks, apply_chat_template=True)
    args = _api(server, "/v1/chat/completions", chat_model) | {"tokenized_requests": False}
    api = _evaluate("local-chat-completions", args, "phalanx_gen", tasks, apply_chat_template=True)
    assert _responses(api, "phalanx_gen") == _responses(hf, "phalanx_gen")
    assert any(r[0] for r in _responses(api, "phalanx_gen")), "nothing was generated"
