"""Trainer CPU cost per step against a plain PyTorch loop, in one process, by CPU time.

Wall time on a shared machine swings with other load; the CPU time a process spends is far
steadier, so this compares process CPU seconds per optimizer step (one thread):

- ``plainLoop``: the simplest correct loop on the same model: random tokens, full logits,
  ``F.cross_entropy``, backward, AdamW. Timed over its measured steps after warm-up.
- ``phalanx``: ``phalanx_trainer``'s whole loop (data loader, chunked loss, gradient norm
  and clipping, scheduler, per-step log, checkpoint at the end), run in this process. Its
  per-step cost is the difference between a long and a short run divided by the extra
  steps, so start-up, the final checkpoint and the export cancel out.
- ``phalanxPlainLoss``: the same with ``--loss-chunk 0`` (full logits), to price the chunked
  loss; ``phalanxChunk256``: ``--loss-chunk 256`` (8 chunks per micro-batch here).
- ``phalanxEval``: ``--eval-every 10`` on 64 val sequences, to price validation.

Rounds alternate the variants; each variant's min and median over rounds are reported, and
its ratio to the plain loop of the same round (min and median). Writes
``bench/results/train_cpu_time.json``::

    python bench/train_cpu_time.py            # nano, batch 8 x 256 tokens, 3 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from phalanx_trainer.cli import main as trainer_main
from phalanx_trainer.data import ensure_builtin_data
from phalanx_trainer.model import ModelConfig, Transformer

RESULTS = Path(__file__).parent / "results" / "train_cpu_time.json"


def plain_loop(cfg: ModelConfig, *, batch: int, seq_len: int, steps: int, warmup: int) -> float:
    """CPU seconds per step of a plain loop (after ``warmup`` steps)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.loss_chunk = 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            start = time.process_time()
        logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.process_time() - start) / steps


def phalanx_loop(
    preset: str,
    data: Path,
    *,
    batch: int,
    seq_len: int,
    steps: int,
    warmup: int,
    extra: tuple[str, ...] = (),
) -> float:
    """CPU seconds per step of the trainer: (long run - short run) / extra steps."""

    def cpu_seconds(total_steps: int) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            args = [
                "--preset", preset,
                "--device", "cpu",
                "--data", str(data),
                "--steps", str(total_steps),
                "--batch-size", str(batch),
                "--seq-len", str(seq_len),
                "--lr", "1e-4",
                "--log-every", "10",
                "--eval-every", "0",
                "--checkpoint-every", "0",
                "--checkpoint-dir", tmp,
                "--metrics-port", "-1",
                "--no-export",
                *extra,
            ]  # fmt: skip
            start = time.process_time()
            code = trainer_main(args, {})
            spent = time.process_time() - start
        if code != 0:
            raise SystemExit(f"training exited with {code}")
        return spent

    short = cpu_seconds(warmup)
    long = cpu_seconds(warmup + steps)
    return (long - short) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(1)
    cfg = ModelConfig.preset(args.preset)
    data = ensure_builtin_data(min(cfg.vocab_size, 8192)).path
    common: dict[str, Any] = dict(
        batch=args.batch_size, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup
    )
    variants: dict[str, Callable[[], float]] = {
        "plainLoop": lambda: plain_loop(cfg, **common),
        "phalanx": lambda: phalanx_loop(args.preset, data, **common),
        "phalanxPlainLoss": lambda: phalanx_loop(
            args.preset, data, extra=("--loss-chunk", "0"), **common
        ),
        "phalanxChunk256": lambda: phalanx_loop(
            args.preset, data, extra=("--loss-chunk", "256"), **common
        ),
        "phalanxEval": lambda: phalanx_loop(
            args.preset, data, extra=("--eval-every", "10", "--eval-samples", "64"), **common
        ),
    }
    per_round: list[dict[str, float]] = []
    loads = []
    for r in range(args.rounds):
        seconds = {name: measure() for name, measure in variants.items()}
        per_round.append(seconds)
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in seconds.items()))

    results: dict[str, dict[str, float]] = {}
    for name in variants:
        values = [round_[name] for round_ in per_round]
        ratios = [round_[name] / round_["plainLoop"] for round_ in per_round]
        results[name] = {
            "cpuMsPerStepMin": round(min(values) * 1e3, 2),
            "cpuMsPerStepMedian": round(statistics.median(values) * 1e3, 2),
            "ratioToPlainMin": round(min(ratios), 3),
            "ratioToPlainMedian": round(statistics.median(ratios), 3),
        }
        print(f"{name:>18}: {results[name]}")
    report = {
        "benchmark": "train_cpu_time",
        "what": "process CPU seconds per optimizer step, one thread",
        "command": " ".join(["python", "bench/train_cpu_time.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "preset": args.preset,
        "params": cfg.num_params(),
        "batchSize": args.batch_size,
        "seqLen": args.seq_len,
        "measuredSteps": args.steps,
        "rounds": args.rounds,
        "loadAverage1m": [round(x, 2) for x in loads],
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
