"""Run the benchmarks that fit a laptop (minutes, CPU only); each writes bench/results/*.json.

The cluster-scale ones are run on their own, since they take longer:
    python bench/devcluster_up.py      # control plane start-up and memory, 64 and 1,000 nodes
    python bench/admission.py          # gang admission vs kube-scheduler on 1,000 fake nodes
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICK = ["placement.py", "train_throughput.py", "serve_load.py"]


def main() -> int:
    failed = []
    for script in QUICK:
        print(f"== {script}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script)], check=False).returncode != 0:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
