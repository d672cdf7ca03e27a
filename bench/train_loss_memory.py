"""Peak memory and CPU time of the training loss: full logits against the chunked loss.

One forward and backward of the loss over the output projection, ``hidden [T, dim]`` x
``weight [vocab, dim]``, each in a fresh process so that its peak resident memory (the
kernel's ``ru_maxrss``) above the inputs is the loss's own. Variants: ``plain`` (fp32 logits
``[T, vocab]`` and their gradient, as ``F.cross_entropy`` needs them) and the chunked loss
with 512 tokens per chunk and with the trainer's automatic chunk (2^26 logits). Repeated; min and median of each, with the ratio to
``plain`` measured in the same round. Writes ``bench/results/train_loss_memory.json``::

    python bench/train_loss_memory.py      # 8192 tokens, vocab 32768, dim 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from phalanx_trainer.loss import auto_chunk_tokens

RESULTS = Path(__file__).parent / "results" / "train_loss_memory.json"

CHILD = """
import json, resource, sys, time
import torch
from phalanx_trainer.loss import linear_cross_entropy
torch.set_num_threads(1)
tokens, vocab, dim, chunk = (int(x) for x in sys.argv[1:5])
g = torch.Generator().manual_seed(0)
hidden = torch.randn(tokens, dim, generator=g, requires_grad=True)
weight = (torch.randn(vocab, dim, generator=g) * 0.02).requires_grad_()
targets = torch.randint(0, vocab, (tokens,), generator=g)
# Touch the gradient buffers first so that both variants start from the same footprint.
hidden.grad = torch.zeros_like(hidden); weight.grad = torch.zeros_like(weight)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.process_time()
loss = linear_cross_entropy(hidden, weight, targets, chunk=chunk)
loss.backward()
cpu = time.process_time() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peakMiB": (peak - before) / 1024, "cpuSeconds": cpu, "loss": loss.item()}))
"""


def measure(tokens: int, vocab: int, dim: int, chunk: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tokens), str(vocab), str(dim), str(chunk)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    auto = auto_chunk_tokens(args.vocab)
    variants = {"plain": 0, "chunked512": 512, f"chunkedAuto{auto}": auto}
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        got = {name: measure(args.tokens, args.vocab, args.dim, c) for name, c in variants.items()}
        rounds.append(got)
        print(f"round {r + 1}: {json.dumps(got)}")
    results: dict[str, Any] = {}
    for name in variants:
        peaks = [x[name]["peakMiB"] for x in rounds]
        cpus = [x[name]["cpuSeconds"] for x in rounds]
        cpu_ratios = [x[name]["cpuSeconds"] / x["plain"]["cpuSeconds"] for x in rounds]
        results[name] = {
            "peakMiBMin": round(min(peaks), 1),
            "peakMiBMedian": round(statistics.median(peaks), 1),
            "cpuSecondsMin": round(min(cpus), 3),
            "cpuSecondsMedian": round(statistics.median(cpus), 3),
            "cpuRatioToPlainMedian": round(statistics.median(cpu_ratios), 3),
            "loss": rounds[0][name]["loss"],
        }
        print(f"{name:>12}: {results[name]}")
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    report = {
        "benchmark": "train_loss_memory",
        "command": " ".join(["python", "bench/train_loss_memory.py", *sys.argv[1:]]),
        "tokens": args.tokens,
        "vocab": args.vocab,
        "dim": args.dim,
        "fp32LogitsMiB": round(logits_mib, 1),
        "rounds": args.rounds,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
