"""Every sampling parameter the server accepts changes the output as OpenAI/vLLM define it.

References are computed here from the same float64 weights without any cache: the whole
sequence is re-run for every new token and the parameter is applied by hand.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import LiveServer

from phalanx_trainer.hf import load_pretrained
from phalanx_trainer.model import Transformer

PROMPT = "In the beginning was the word, and the word was"
Processor = Callable[[torch.Tensor, list[int]], torch.Tensor]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Transformer:
    net, _ = load_pretrained(tiny_model_dir, dtype=torch.float64)
    return net.eval()


def _ids(server: LiveServer, text: str) -> list[int]:
    return list(server.runtime.loaded.tokenizer.encode(text).ids)


def _decode(server: LiveServer, ids: list[int]) -> str:
    return str(server.runtime.loaded.tokenizer.decode(ids))


def reference_greedy(
    model: Transformer, prompt: list[int], steps: int, process: Processor | None = None
) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([prompt + out]))[0, -1]
            if process is not None:
                logits = process(logits.clone(), out)
            out.append(int(logits.argmax()))
    return out


def _complete(server: LiveServer, **body: Any) -> dict[str, Any]:
    body.setdefault("prompt", PROMPT)
    body.setdefault("temperature", 0)
    body.setdefault("ignore_eos", True)
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _text(response: dict[str, Any], index: int = 0) -> str:
    return str(response["choices"][index]["text"])


# -- penalties, bias, min_p ------------------------------------------------------------------


def _frequency(penalty: float, presence: float) -> Processor:
    def process(logits: torch.Tensor, out: list[int]) -> torch.Tensor:
        for token, count in Counter(out).items():
            logits[token] -= penalty * count + presence
        return logits

    return process


def _repetition(penalty: float, prompt: list[int]) -> Processor:
    def process(logits: torch.Tensor, out: list[int]) -> torch.Tensor:
        for token in set(prompt) | set(out):
            v = logits[token]
            logits[token] = v / penalty if v > 0 else v * penalty
        return logits

    return process


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("frequency_penalty", 2.0, id="frequency"),
        pytest.param("presence_penalty", 2.0, id="presence"),
        pytest.param("frequency_penalty", -2.0, id="negative-frequency"),
        pytest.param("repetition_penalty", 3.0, id="repetition"),
    ],
)
def test_penalties_change_greedy_output_exactly_as_defined(
    server: LiveServer, model: Transformer, field: str, value: float
) -> None:
    prompt = _ids(server, PROMPT)
    steps = 24
    if field == "repetition_penalty":
        process = _repetition(value, prompt)
    elif field == "presence_penalty":
        process = _frequency(0.0, value)
    else:
        process = _frequency(value, 0.0)
    plain = reference_greedy(model, prompt, steps)
    expected = reference_greedy(model, prompt, steps, process)
    assert expected != plain, "the penalty must matter for this prompt, or the test proves nothing"
    got = _complete(server, max_tokens=steps, **{field: value})
    assert _text(got) == _decode(server, expected)


def test_logit_bias_forces_and_bans_tokens(server: LiveServer, model: Transformer) -> None:
    prompt = _ids(server, PROMPT)
    forced = _complete(server, max_tokens=4, logit_bias={"65": 100})
    assert _text(forced) == _decode(server, [65] * 4)
    first = reference_greedy(model, prompt, 1)[0]

    def ban(logits: torch.Tensor, out: list[int]) -> torch.Tensor:
        logits[first] -= 100
        return logits

    banned = _complete(server, max_tokens=6, logit_bias={str(first): -100})
    assert _text(banned) == _decode(server, reference_greedy(model, prompt, 6, ban))


def test_min_p_one_keeps_only_the_most_likely_token(server: LiveServer) -> None:
    greedy = _complete(server, max_tokens=20)
    sampled = [_complete(server, max_tokens=20, temperature=1.0, min_p=1.0, seed=s) for s in (1, 2)]
    assert [_text(s) for s in sampled] == [_text(greedy)] * 2
    loose = _complete(server, max_tokens=20, temperature=1.5, min_p=0.0, seed=1)
    assert _text(loose) != _text(greedy)


def test_stop_token_ids_end_generation_and_min_tokens_delays_them(
    server: LiveServer, model: Transformer
) -> None:
    prompt = _ids(server, PROMPT)
    first = reference_greedy(model, prompt, 1)[0]
    body = {"max_tokens": 10, "ignore_eos": False, "stop_token_ids": [first]}
    stopped = _complete(server, **body)
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == 1
    assert _text(stopped) == ""

    def ban_first(logits: torch.Tensor, out: list[int]) -> torch.Tensor:
        if len(out) < 3:
            logits[first] = float("-inf")
        return logits

    delayed = _complete(server, **body, min_tokens=3)
    expected = reference_greedy(model, prompt, 10, ban_first)
    if first in expected[3:]:
        expected = expected[: expected.index(first, 3) + 1]
    assert delayed["usage"]["completion_tokens"] == len(expected) >= 3
    assert _text(delayed) == _decode(server, [t for t in expected if t != first])


def test_min_tokens_holds_back_stop_strings(server: LiveServer) -> None:
    free = _complete(server, max_tokens=30)
    text = _text(free)
    stop = text[0]
    cut = _complete(server, max_tokens=30, stop=[stop])
    assert _text(cut) == ""
    assert cut["choices"][0]["finish_reason"] == "stop"
    held = _complete(server, max_tokens=30, stop=[stop], min_tokens=4)
    assert len(_text(held)) > 0
    assert text.startswith(_text(held))


# -- logprobs ------------------------------------------------------------------------------------


def _log_softmax_rows(model: Transformer, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)


def test_completion_logprobs_are_the_models_and_list_the_top_alternatives(
    server: LiveServer, model: Transformer
) -> None:
    prompt = _ids(server, PROMPT)
    got = _complete(server, max_tokens=8, logprobs=3)
    lp = got["choices"][0]["logprobs"]
    out = reference_greedy(model, prompt, 8)
    ref = _log_softmax_rows(model, prompt + out)
    assert len(lp["token_logprobs"]) == 8
    for i, token in enumerate(out):
        row = ref[len(prompt) - 1 + i]
        assert lp["token_logprobs"][i] == pytest.approx(float(row[token]), abs=1e-9)
        top = lp["top_logprobs"][i]
        assert len(top) == 3  # the greedy choice is the best, so it is among the three
        assert sorted(top.values(), reverse=True) == pytest.approx(
            row.topk(3).values.tolist(), abs=1e-9
        )
    assert "".join(lp["tokens"]) == _text(got)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(8)]


def test_echo_with_logprobs_and_zero_max_tokens_scores_the_prompt(
    server: LiveServer, model: Transformer
) -> None:
    prompt = _ids(server, PROMPT)
    got = _complete(server, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = got["choices"][0]
    assert choice["text"] == _decode(server, prompt)
    assert got["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt)
    assert lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None
    ref = _log_softmax_rows(model, prompt)
    expected = [float(ref[p - 1, prompt[p]]) for p in range(1, len(prompt))]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-9)
    for p in range(1, len(prompt)):
        best = float(ref[p - 1].max())
        assert max(lp["top_logprobs"][p].values()) == pytest.approx(best, abs=1e-9)


def test_echo_logprobs_with_one_generated_token_as_lm_eval_asks(
    server: LiveServer, model: Transformer
) -> None:
    prompt = _ids(server, PROMPT)
    got = _complete(server, prompt=prompt, max_tokens=1, echo=True, logprobs=1)
    lp = got["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(prompt) + 1
    ref = _log_softmax_rows(model, prompt)
    assert lp["token_logprobs"][-1] == pytest.approx(float(ref[-1].max()), abs=1e-9)


def test_streamed_logprobs_add_up_to_the_non_streamed_ones(server: LiveServer) -> None:
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "echo": True, "logprobs": 1}  # fmt: skip
    whole = _complete(server, **body)["choices"][0]
    tokens: list[str] = []
    scores: list[float | None] = []
    text = ""
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            if choice["logprobs"]:
                tokens += choice["logprobs"]["tokens"]
                scores += choice["logprobs"]["token_logprobs"]
    assert text == whole["text"]
    assert tokens == whole["logprobs"]["tokens"]
    assert scores == whole["logprobs"]["token_logprobs"]


def test_a_request_larger_than_the_server_is_refused(server: LiveServer) -> None:
    r = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": ["a"] * 8, "n": 16, "max_tokens": 1},
    )
    assert r.status_code == 400
    assert "needs 128 sequences" in r.json()["error"]["message"]


def test_chat_logprobs_and_top_logprobs(server: LiveServer) -> None:
    body = {
        "messages": [{"role": "user", "content": "Say something"}],
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 2,
    }
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 6
    assert "".join(c["token"] for c in content) == r["choices"][0]["message"]["content"]
    for c in content:
        assert len(c["top_logprobs"]) == 2
        assert c["logprob"] == pytest.approx(c["top_logprobs"][0]["logprob"], abs=1e-12)
        assert bytes(c["bytes"]).decode() == c["token"]
        assert c["logprob"] <= 0
    plain = httpx.post(
        server.url + "/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": None}
    ).json()
    assert plain["choices"][0]["logprobs"] is None


# -- n, best_of, several prompts -------------------------------------------------------------------


def test_n_returns_distinct_reproducible_choices(server: LiveServer) -> None:
    body = {"max_tokens": 12, "temperature": 1.0, "seed": 11, "n": 3}
    first, again = _complete(server, **body), _complete(server, **body)
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert len(set(texts)) > 1
    assert texts == [c["text"] for c in again["choices"]]
    assert first["usage"]["completion_tokens"] == 36


def test_best_of_returns_the_candidate_with_the_best_logprob_per_token(
    server: LiveServer,
) -> None:
    body = {"max_tokens": 10, "temperature": 1.0, "seed": 5}
    candidates = _complete(server, **body, n=4, logprobs=0)["choices"]
    means = [sum(c["logprobs"]["token_logprobs"]) / 10 for c in candidates]
    best = _complete(server, **body, n=1, best_of=4)
    assert [c["text"] for c in best["choices"]] == [candidates[means.index(max(means))]["text"]]
    assert best["usage"]["completion_tokens"] == 40  # every candidate was generated
    assert math.isfinite(max(means))


def test_several_prompts_get_choices_in_prompt_order(server: LiveServer) -> None:
    one = _complete(server, prompt="Hello", max_tokens=5)
    two = _complete(server, prompt="import sys", max_tokens=5)
    both = _complete(server, prompt=["Hello", "import sys"], max_tokens=5, n=2)
    assert [c["index"] for c in both["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in both["choices"]] == [_text(one)] * 2 + [_text(two)] * 2


# -- refusals ------------------------------------------------------------------------------------


UNSUPPORTED = [
    ("/v1/completions", "suffix", "tail"),
    ("/v1/completions", "response_format", {"type": "json_object"}),
    ("/v1/completions", "use_beam_search", True),
    ("/v1/completions", "include_stop_str_in_output", True),
    ("/v1/completions", "prompt_logprobs", 1),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "tool_choice", "auto"),
    ("/v1/chat/completions", "response_format", {"type": "json_schema"}),
    ("/v1/chat/completions", "reasoning_effort", "high"),
    ("/v1/chat/completions", "audio", {"voice": "alloy"}),
]


def _base(path: str) -> dict[str, Any]:
    if path == "/v1/completions":
        return {"prompt": "x", "max_tokens": 2}
    return {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}


@pytest.mark.parametrize(("path", "field", "value"), UNSUPPORTED, ids=[u[1] for u in UNSUPPORTED])
def test_known_but_unimplemented_fields_are_refused_by_name(
    server: LiveServer, path: str, field: str, value: Any
) -> None:
    r = httpx.post(server.url + path, json={**_base(path), field: value})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == field
    assert (
        error["message"] == f"{field} is not supported by this server; remove it from the request"
    )


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_their_no_op_values_are_accepted(server: LiveServer, path: str) -> None:
    extra = {"response_format": {"type": "text"}, "use_beam_search": False}
    if path == "/v1/chat/completions":
        extra |= {"tools": [], "tool_choice": "none", "store": False}
    else:
        extra |= {"suffix": None}
    assert httpx.post(server.url + path, json={**_base(path), **extra}).status_code == 200


def test_unknown_fields_are_refused_as_openai_does(server: LiveServer) -> None:
    r = httpx.post(server.url + "/v1/completions", json={**_base("/v1/completions"), "tempo": 1})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "Unrecognized request argument supplied: tempo"
    assert r.json()["error"]["param"] == "tempo"


ONE_SENTENCE = [
    pytest.param(
        "/v1/completions",
        {"prompt": ["a", [1, 2]]},
        "prompt must be a string, a list of strings, a list of token ids, or a list of "
        "token-id lists",
        id="mixed-prompt",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": [1, -2]},
        "prompt token ids must be non-negative integers",
        id="negative-token",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": "x", "stop": [1]},
        "stop must be a string or a list of up to 4 strings of at most 256 characters",
        id="stop-type",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": "x", "logit_bias": {"abc": 1}},
        "logit_bias keys must be token ids below the vocabulary size 2048, got 'abc'",
        id="logit-bias-key",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": "x", "min_tokens": 5, "max_tokens": 2},
        "min_tokens (5) must not exceed max_tokens (2)",
        id="min-tokens",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": "x", "n": 2, "best_of": 1},
        "best_of must be greater than or equal to n",
        id="best-of",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        "top_logprobs needs logprobs set to true",
        id="top-logprobs",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": "x", "stream_options": {"include_usage": True}},
        "stream_options is only allowed when stream is true",
        id="stream-options",
    ),
]


@pytest.mark.parametrize(("path", "body", "message"), ONE_SENTENCE)
def test_bad_values_get_one_sentence(
    server: LiveServer, path: str, body: dict[str, Any], message: str
) -> None:
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == 400
    assert r.json()["error"]["message"].removeprefix("prompt: ") == message


SURROGATE = '"\\ud800"'
SURROGATE_BODIES = [
    pytest.param(
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": ' + SURROGATE + "}]}",
        id="chat-content",
    ),
    pytest.param(
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": [{"type": "text", "text": '
        + SURROGATE
        + "}]}]}",
        id="chat-part",
    ),
    pytest.param("/v1/completions", '{"prompt": [' + SURROGATE + "]}", id="list-prompt"),
    pytest.param("/v1/completions", '{"prompt": "a", "stop": ' + SURROGATE + "}", id="stop"),
]


@pytest.mark.parametrize(("path", "raw"), SURROGATE_BODIES)
def test_lone_surrogates_get_a_json_400(server: LiveServer, path: str, raw: str) -> None:
    r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "lone UTF-16 surrogate" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_unknown_model_is_404_and_models_can_be_retrieved(server: LiveServer) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "model": "gpt-9"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    card = httpx.get(server.url + "/v1/models/tiny")
    assert card.status_code == 200
    assert card.json()["id"] == "tiny"
    missing = httpx.get(server.url + "/v1/models/gpt-9")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_message_names_reach_the_chat_template(make_server: Callable[..., LiveServer]) -> None:
    template = (
        "{% for m in messages %}{{ m.get('name', 'anon') }}: {{ m['content'] }}\n{% endfor %}"
    )
    server = make_server(chat_template=template)
    body: dict[str, Any] = {"max_tokens": 1, "temperature": 0, "ignore_eos": True}
    named = [{"role": "user", "content": "hi", "name": "a_very_long_participant_name"}]
    anonymous = [{"role": "user", "content": "hi"}]
    tokenizer = server.runtime.loaded.tokenizer
    usage = [
        httpx.post(server.url + "/v1/chat/completions", json={**body, "messages": m}).json()[
            "usage"
        ]["prompt_tokens"]
        for m in (named, anonymous)
    ]
    assert usage == [
        len(tokenizer.encode(f"{who}: hi\n").ids)
        for who in ("a_very_long_participant_name", "anon")
    ]
    assert usage[0] > usage[1]
