"""Helpers for tests that run against a dev cluster: polling, our kubectl, the operator.

Plain functions and classes (no pytest import) so any test suite or script can use them;
`tests/integration/conftest.py` wraps them in fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
OPERATOR_MODULE = "phalanx.handlers"


class WaitTimeout(AssertionError):
    """A condition a test waited for never came true; the message says which."""


@dataclass(frozen=True)
class ClusterHandle:
    """How tests reach a cluster: its admin kubeconfig and our pinned kubectl."""

    kubeconfig: Path
    kubectl_path: Path
    state_dir: Path | None = None


def wait_for(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25
) -> T:
    """Poll `predicate` until it returns something truthy, which is returned.

    At the deadline fail with `what` in the message; an exception from the predicate counts as
    "not yet" (the API may be briefly unavailable) and is reported if time runs out.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:
            last_error = error
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)


@contextlib.contextmanager
def duty_cycled(pid: int, period: float = 0.1, stopped: float = 0.06) -> Iterator[None]:
    """`pid` stopped (SIGSTOP) for `stopped` of every `period` seconds until the block ends:
    a process that runs at a fraction of its speed, a straggler made from outside."""
    done = threading.Event()

    def cycle() -> None:
        while not done.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            time.sleep(stopped)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            done.wait(period - stopped)

    thread = threading.Thread(target=cycle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


class KubectlError(AssertionError):
    """kubectl exited non-zero where the caller expected success."""


class Kubectl:
    """Our own pinned kubectl, bound to one kubeconfig: `kubectl("get", "nodes")`."""

    def __init__(self, handle: ClusterHandle) -> None:
        self.handle = handle

    def __call__(
        self, *args: str, check: bool = True, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.handle.kubectl_path), f"--kubeconfig={self.handle.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def json(self, *args: str) -> Any:
        """Run a read command with `-o json` and parse the output."""
        return json.loads(self(*args, "-o", "json").stdout)

    def create(self, namespace: str, manifest: dict[str, Any]) -> None:
        self("create", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))

    def exists(self, *args: str) -> bool:
        return self("get", *args, check=False).returncode == 0


@contextlib.contextmanager
def run_operator(*extra_args: str, timeout: float = 30) -> Iterator[Any]:
    """Run the operator in a thread of this process for the duration of the block.

    The cluster is the one KUBECONFIG points at (the `dev_cluster` fixture sets it).
    """
    from kopf.testing import KopfRunner

    args = ["run", "--standalone", "--all-namespaces", "-m", OPERATOR_MODULE, *extra_args]
    with KopfRunner(args, timeout=timeout) as runner:
        yield runner
    if runner.exception is not None:
        raise AssertionError(f"operator raised {runner.exception!r}:\n{runner.output}")
    if runner.exit_code != 0:
        raise AssertionError(f"operator exited with {runner.exit_code}:\n{runner.output}")
