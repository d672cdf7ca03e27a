"""Training settings: one dataclass, settable by flag (``--batch-size``) or env.

Precedence: command-line flag > ``PHALANX_TRAIN_<NAME>`` (e.g. ``PHALANX_TRAIN_BATCH_SIZE``)
> the platform variables ``PHALANX_CHECKPOINT_DIR`` / ``PHALANX_METRICS_PORT`` > default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, NoReturn

from phalanx_trainer.termination import InvalidConfig

ENV_PREFIX = "PHALANX_TRAIN_"
# Variables the operator sets for every pod, accepted as fallbacks.
PLATFORM_ENV = {
    "checkpoint_dir": "PHALANX_CHECKPOINT_DIR",
    "metrics_port": "PHALANX_METRICS_PORT",
}


def _opt(help: str, default: Any = None, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # model
    preset: str = _opt("model preset", "nano", ("nano", "gpt2-small", "1b"))
    model_config: str | None = _opt("JSON file of ModelConfig fields (overrides --preset)")
    # schedule
    steps: int = _opt("optimizer steps to train", 200)
    batch_size: int = _opt("sequences per rank per micro-step", 8)
    seq_len: int | None = _opt("tokens per sequence (default: the model's max_seq_len)")
    grad_accum: int = _opt("micro-steps per optimizer step", 1)
    lr: float | None = _opt("peak learning rate (default: per preset)")
    min_lr_ratio: float = _opt("final LR as a fraction of the peak (cosine floor)", 0.1)
    warmup_steps: int | None = _opt("linear warmup steps (default: 10%% of steps, max 1000)")
    weight_decay: float = _opt("AdamW weight decay (not applied to norms)", 0.1)
    grad_clip: float = _opt("clip the global gradient norm to this (0 = off)", 1.0)
    seed: int = _opt("seed for init and data order", 1337)
    # execution
    parallelism: str = _opt("data parallelism strategy", "ddp", ("ddp", "fsdp"))
    tensor_parallel: int = _opt(
        "tensor-parallel degree: consecutive ranks split each block (needs fsdp)", 1
    )
    compile: bool = _opt("torch.compile each transformer block", False)
    activation_checkpointing: bool = _opt("recompute block activations in backward", False)
    precision: str = _opt(
        "auto = bf16 autocast on GPU, fp32 on CPU", "auto", ("auto", "bf16", "fp32")
    )
    device: str = _opt(
        "auto (cuda, else npu, else cpu; npu when $RANK_TABLE_FILE is set), cuda, npu or cpu",
        "auto",
        ("auto", "cuda", "npu", "cpu"),
    )
    pg_timeout: float = _opt("process-group timeout in seconds (must exceed a save)", 900.0)
    loss_chunk: int | None = _opt(
        "tokens per chunk of the cross-entropy, so full logits never exist (0 = plain loss; "
        "default: 2^26 logits per chunk, i.e. 2^26 / vocab tokens)"
    )
    # data
    data: str | None = _opt("prepared data directory (default: the built-in corpus)")
    data_cache: str | None = _opt("where to prepare the built-in corpus")
    # evaluation
    eval_every: int | None = _opt(
        "validation loss on the fixed val set every N steps and at the end (0 = off; "
        "default: 100 when the data has a val split)"
    )
    eval_samples: int = _opt("sequences in the fixed val set (at most the split holds)", 64)
    # checkpoints
    checkpoint_dir: str = _opt("checkpoint root ($PHALANX_CHECKPOINT_DIR)", "phalanx-run")
    checkpoint_every: int = _opt("save every N steps (0 = only at the end)", 100)
    keep: int = _opt("complete checkpoints to keep (plus the final one)", 3)
    async_save: bool = _opt("write checkpoints in the background", False)
    checkpoint_on_signal: bool = _opt("save a checkpoint when stopped by SIGTERM", True)
    export: bool = _opt("export a Hugging Face checkpoint to <checkpoint-dir>/export", True)
    export_every: int = _opt(
        "also export <checkpoint-dir>/exports/step-N every N steps for serving (0 = off)", 0
    )
    export_dtype: str = _opt(
        "auto = bf16 if trained in bf16", "auto", ("auto", "bfloat16", "float32")
    )
    # observability
    log_every: int = _opt("log (and all-reduce the loss) every N steps", 10)
    metrics_port: int = _opt("rank 0 serves /metrics and /progress here (-1 = off)", 9400)
    peak_flops: float | None = _opt("peak FLOP/s per device for MFU (default: from the GPU)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": _parse_bool,
}


def _base_type(annotation: str) -> str:
    return annotation.replace(" | None", "")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    """Usage errors become ``InvalidConfig`` (exit 2, classified) instead of a bare exit."""

    def error(self, message: str) -> NoReturn:
        self.print_usage()
        raise InvalidConfig(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="phalanx-train",
        description="Train a decoder-only transformer (launch with torchrun for >1 process).",
    )
    for f in fields(TrainConfig):
        help_text = f"{f.metadata['help']} [env {ENV_PREFIX}{f.name.upper()}]"
        kind = _base_type(str(f.type))
        if kind == "bool":
            parser.add_argument(
                _flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(
                _flag(f.name),
                type=_PARSERS[kind],
                choices=f.metadata["choices"],
                default=None,
                help=help_text,
            )
    return parser


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> TrainConfig:
    env = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    for f in fields(TrainConfig):
        parse = _PARSERS[_base_type(str(f.type))]
        if args[f.name] is not None:
            values[f.name] = args[f.name]
            continue
        for var in (ENV_PREFIX + f.name.upper(), PLATFORM_ENV.get(f.name)):
            if var and env.get(var, "") != "":
                try:
                    values[f.name] = parse(env[var])
                except ValueError as exc:
                    raise InvalidConfig(f"{var}: {exc}") from None
                break
        else:
            assert f.default is not MISSING
            values[f.name] = f.default
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    choices = {f.name: f.metadata["choices"] for f in fields(TrainConfig)}
    for name, allowed in choices.items():
        if allowed and getattr(cfg, name) not in allowed:
            raise InvalidConfig(f"--{name.replace('_', '-')} must be one of {list(allowed)}")
    for name in (
        "steps",
        "batch_size",
        "grad_accum",
        "log_every",
        "eval_samples",
        "tensor_parallel",
    ):
        if getattr(cfg, name) < 1:
            raise InvalidConfig(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("eval_every", "checkpoint_every", "export_every", "loss_chunk"):
        if (getattr(cfg, name) or 0) < 0:  # None: the automatic default
            raise InvalidConfig(f"--{name.replace('_', '-')} must be 0 or more")
