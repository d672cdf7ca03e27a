"""A private mount namespace for one child process, with a directory overlaid on a path.

Some peers read files from fixed paths of the machine (Kueue's manager loads its metrics
serving certificate from /etc/kueue/metrics/certs when it does not manage certificates
itself). Rather than writing into the machine's /etc, the child gets a mount namespace of
its own in which an overlay adds our files on top of the path; the machine's mounts and
files are untouched, and the overlay ends with the process.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 0x40000


def overlay(target: Path, upper: Path, work: Path) -> Callable[[], None]:
    """A `preexec_fn` that moves the child into a new mount namespace (mounts private, so
    nothing propagates back) and overlays `upper` on `target` there. `work` is overlayfs's
    scratch directory, on the same filesystem as `upper`."""
    options = f"lowerdir={target},upperdir={upper},workdir={work}".encode()

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
        _check(
            libc.mount(b"overlay", str(target).encode(), b"overlay", 0, options),
            f"overlay on {target}",
        )

    return preexec


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")
