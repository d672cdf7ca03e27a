"""Settings come from flags, then PHALANX_TRAIN_* env, then platform env, then defaults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from phalanx_trainer.config import TrainConfig, load_config
from phalanx_trainer.termination import InvalidConfig


def test_defaults() -> None:
    cfg = load_config([], environ={})
    assert cfg == TrainConfig()
    assert cfg.metrics_port == 9400
    assert cfg.parallelism == "ddp"


@pytest.mark.parametrize(
    ("argv", "env", "field", "expected"),
    [
        (["--batch-size", "3"], {}, "batch_size", 3),
        ([], {"PHALANX_TRAIN_BATCH_SIZE": "5"}, "batch_size", 5),
        (["--batch-size", "3"], {"PHALANX_TRAIN_BATCH_SIZE": "5"}, "batch_size", 3),
        ([], {"PHALANX_CHECKPOINT_DIR": "/ckpt"}, "checkpoint_dir", "/ckpt"),
        (
            [],
            {"PHALANX_CHECKPOINT_DIR": "/ckpt", "PHALANX_TRAIN_CHECKPOINT_DIR": "/mine"},
            "checkpoint_dir",
            "/mine",
        ),
        ([], {"PHALANX_METRICS_PORT": "9500"}, "metrics_port", 9500),
        ([], {"PHALANX_TRAIN_COMPILE": "true"}, "compile", True),
        (["--no-export"], {"PHALANX_TRAIN_EXPORT": "1"}, "export", False),
        ([], {"PHALANX_TRAIN_LR": "1e-3"}, "lr", 1e-3),
        (["--parallelism", "fsdp"], {}, "parallelism", "fsdp"),
        ([], {"PHALANX_TRAIN_SEQ_LEN": ""}, "seq_len", None),
    ],
    ids=[
        "flag",
        "env",
        "flag-beats-env",
        "platform-checkpoint-dir",
        "train-env-beats-platform",
        "platform-metrics-port",
        "env-bool",
        "no-flag-beats-env",
        "env-float",
        "choice",
        "empty-env-is-unset",
    ],
)
def test_precedence(argv: list[str], env: dict[str, str], field: str, expected: object) -> None:
    assert getattr(load_config(argv, environ=env), field) == expected


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        ([], {"PHALANX_TRAIN_PARALLELISM": "zero3"}),
        ([], {"PHALANX_TRAIN_COMPILE": "maybe"}),
        (["--steps", "0"], {}),
    ],
    ids=["bad-choice-from-env", "bad-bool", "zero-steps"],
)
def test_invalid_settings_exit_with_a_message(argv: list[str], env: dict[str, str]) -> None:
    with pytest.raises(InvalidConfig):
        load_config(argv, environ=env)


def test_module_entry_point_answers_help_without_torch() -> None:
    code = (
        "import sys, runpy; sys.argv = ['phalanx-train', '--help'];"
        "from phalanx_trainer.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'help imported torch'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--parallelism" in out.stdout
    assert "PHALANX_TRAIN_BATCH_SIZE" in out.stdout


@pytest.mark.parametrize(
    "trainer",
    [
        {},
        {"preset": "gpt2-small", "parallelism": "fsdp", "precision": "bf16", "compile": True},
        {"exportEvery": 50, "data": "shards/v1", "extraArgs": ["--eval-every", "0"]},
        {"parallelism": "fsdp", "tensorParallel": 4},
    ],
    ids=["defaults", "fsdp-bf16-compile", "exports-data-extra", "tensor-parallel"],
)
def test_every_flag_the_operator_renders_is_a_trainer_setting(trainer: dict[str, object]) -> None:
    """The operator's rendered command line (spec.trainer) parses here, value for value."""
    from phalanx.api.trainjob import LLMTrainJobSpec
    from phalanx.render.trainjob import trainer_args

    spec = LLMTrainJobSpec.model_validate({"trainer": trainer})
    cfg = load_config(trainer_args(spec), environ={})
    t = spec.trainer
    assert (cfg.preset, cfg.steps, cfg.batch_size, cfg.seq_len) == (
        t.preset, t.steps, t.batch_size, t.seq_len,
    )  # fmt: skip
    assert (cfg.parallelism, cfg.precision, cfg.compile) == (t.parallelism, t.precision, t.compile)
    assert cfg.lr == t.learning_rate
    assert cfg.export_every == t.export_every
    assert cfg.metrics_port == t.metrics_port
    assert cfg.checkpoint_dir == spec.checkpoint.mount_path
    assert cfg.tensor_parallel == t.tensor_parallel


def test_the_operator_refuses_tensor_parallel_without_fsdp() -> None:
    """The API rule and the trainer agree: TP composes with FSDP2 only."""
    from phalanx.api.base import rule_violations
    from phalanx.api.trainjob import LLMTrainJobSpec

    spec = LLMTrainJobSpec.model_validate({"trainer": {"tensorParallel": 2}})
    assert rule_violations(spec, "spec") == [
        (
            "spec.trainer.tensorParallel",
            "trainer.tensorParallel > 1 composes with FSDP2: set trainer.parallelism to fsdp.",
        )
    ]
    fsdp = {"trainer": {"tensorParallel": 2, "parallelism": "fsdp"}}
    assert rule_violations(LLMTrainJobSpec.model_validate(fsdp), "spec") == []
