"""`make demo`, timed end to end: from the command to the completion it prints from the model it
just trained, then `make demo-down`. Each run records what was cached when it began (the
binaries, the images, the nodes' image stores), so a first run on a machine is told from a
warm one. Writes bench/results/demo.json.

Real nodes: run it alone (nothing else using real nodes or the default dev cluster).
    python bench/demo.py [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
COMPLETION = re.compile(r"completion from the model \S+ just trained: (.*)$")


def cached() -> dict[str, bool]:
    """What a run can reuse, as the dev cluster's caches say at its start."""
    from phalanx.devcluster import paths

    cache = paths.cache_root()
    return {
        "binaries": any((cache / "bin").glob("v*/kubelet")),
        "images": any((cache / "images" / "oci").glob("*")),
        "nodeImageStores": any((cache / "node-stores").glob("*/*")),
    }


def one_run() -> dict[str, Any]:
    state = cached()
    started = time.monotonic()
    completion: str | None = None
    completed_after: float | None = None
    lines: list[str] = []
    with subprocess.Popen(
        ["make", "demo"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as demo:
        assert demo.stdout is not None
        for line in demo.stdout:
            sys.stdout.write(line)
            lines.append(line.rstrip())
            found = COMPLETION.search(line)
            if found and completion is None:
                completion = found.group(1)
                completed_after = time.monotonic() - started
        code = demo.wait()
    subprocess.run(["make", "demo-down"], cwd=ROOT, check=False)
    return {
        "cachedAtStart": state,
        "exitCode": code,
        "secondsToCompletion": round(completed_after, 1) if completed_after is not None else None,
        "completion": completion,
        "tail": lines[-3:] if completion is None else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    runs = [one_run() for _ in range(args.runs)]
    result = {
        "command": "make demo (then make demo-down)",
        "machine": {"cpus": os.cpu_count(), "load1": os.getloadavg()[0]},
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps([{k: r[k] for k in ("cachedAtStart", "secondsToCompletion")} for r in runs]))


if __name__ == "__main__":
    main()
