"""Build and cache the pinned control-plane binaries from the Go module proxy.

Kubernetes cannot be built with `go install k8s.io/kubernetes/cmd/...@v1.36.3`: its go.mod
points every `k8s.io/<staging>` module at `./staging/...` and requires them as v0.0.0. A
generated consumer module replaces each of them with its published `v0.<minor>.<patch>`
release instead. etcd's server module also carries local replaces, so it gets a consumer
module too; kwok's go.mod is clean and builds with `go install`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from phalanx.devcluster import paths
from phalanx.devcluster.errors import DevClusterError
from phalanx.devcluster.versions import (
    ALL_BINARIES,
    CONTAINERD_BINARIES,
    CONTROL_PLANE_BINARIES,
    COREDNS_BINARY,
    ETCD_BINARY,
    HELM_BINARY,
    HELM_KUBE_MINOR,
    KUBELET_BINARY,
    KUBERNETES_BINARIES,
    KUBERNETES_VERSION,
    KUEUE_BINARY,
    KWOK_BINARY,
    PROMETHEUS_BINARY,
    PROMETHEUS_RELEASE,
    STAGING_VERSION,
    GoBinary,
)

Progress = Callable[[str], None]
STAMP_NAME = "stamp.json"
CONSUMER_MODULE = "phalanx.dev/devcluster-build"
BUILD_HINT = "run `phalanx dev build`"


def ensure_binaries(*, force: bool = False, progress: Progress | None = None) -> Path:
    """Return the directory holding every pinned binary, building the missing ones."""
    report = progress or (lambda _line: None)
    target = paths.bin_dir()
    if not force and not missing_binaries(target):
        return target
    go = find_go()
    target.mkdir(parents=True, exist_ok=True)
    with _build_lock():
        stale = list(ALL_BINARIES) if force else missing_binaries(target)
        if not stale:
            return target
        builder = _Builder(go, target, report)
        kubernetes = [b for b in stale if b in (*KUBERNETES_BINARIES, KUBELET_BINARY)]
        if kubernetes:
            builder.build_kubernetes(kubernetes)
        if ETCD_BINARY in stale:
            builder.build_etcd()
        if KWOK_BINARY in stale:
            builder.install(
                [KWOK_BINARY],
                f"-s -w -X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_BINARY.version.lstrip('v')}",
            )
        containerd = [b for b in stale if b in CONTAINERD_BINARIES]
        if containerd:
            builder.install(
                containerd,
                f"-s -w -X github.com/containerd/containerd/v2/version.Version={CONTAINERD_BINARIES[0].version}",
            )
        if COREDNS_BINARY in stale:
            builder.install([COREDNS_BINARY], "-s -w")
    return target


def ensure_tool(
    binary: GoBinary, ldflags: str, *, force: bool = False, progress: Progress | None = None
) -> Path:
    """A pinned tool the tests use beside a cluster (helm, Prometheus), built with `go install`
    from the module proxy when missing, cached apart from the cluster's binaries
    (`bin/<its version>/<name>`): a cluster does not need it."""
    target = paths.bin_dir(binary.version)
    tool = target / binary.name
    if not force and built_tool(binary) is not None:
        return tool
    go = find_go()
    target.mkdir(parents=True, exist_ok=True)
    with _build_lock():
        if force or built_tool(binary) is None:
            _Builder(go, target, progress or (lambda _line: None)).install([binary], ldflags)
    return tool


def built_tool(binary: GoBinary) -> Path | None:
    """The cached build of a pinned tool, or None when it is missing or stale."""
    target = paths.bin_dir(binary.version)
    tool = target / binary.name
    stamp = read_stamp(target).get(binary.name)
    return tool if os.access(tool, os.X_OK) and stamp == _stamp_entry(binary) else None


def ensure_helm(*, force: bool = False, progress: Progress | None = None) -> Path:
    """The pinned helm, for the chart's lint, render, install and upgrade tests."""
    return ensure_tool(HELM_BINARY, helm_ldflags(), force=force, progress=progress)


def ensure_prometheus(*, force: bool = False, progress: Progress | None = None) -> Path:
    """The pinned Prometheus, with Kubernetes service discovery (Debian's build has none),
    for scraping a dev cluster's pods as a cluster's Prometheus would."""
    version = f"-X github.com/prometheus/common/version.Version={PROMETHEUS_RELEASE}"
    return ensure_tool(PROMETHEUS_BINARY, f"-s -w {version}", force=force, progress=progress)


def ensure_kueue(*, force: bool = False, progress: Progress | None = None) -> Path:
    """The pinned Kueue manager, the peer `bench/scale.py` runs against the dev cluster."""
    version = f"-X sigs.k8s.io/kueue/pkg/version.GitVersion={KUEUE_BINARY.version}"
    return ensure_tool(KUEUE_BINARY, f"-s -w {version}", force=force, progress=progress)


def helm_ldflags() -> str:
    """What helm's own release build stamps: its version, and the Kubernetes version its
    offline commands (`helm template`, `helm lint`) assume, from the client-go it is built on."""
    flags = [f"-X helm.sh/helm/v3/internal/version.version={HELM_BINARY.version}"]
    for package in ("pkg/lint/rules", "pkg/chartutil"):
        flags += [
            f"-X helm.sh/helm/v3/{package}.k8sVersionMajor=1",
            f"-X helm.sh/helm/v3/{package}.k8sVersionMinor={HELM_KUBE_MINOR}",
        ]
    return " ".join(["-s", "-w", *flags])


def require_binaries(*, real_nodes: bool = True) -> Path:
    """The binary directory, or a one-line error saying how to build it (never builds).

    Without real nodes only the control plane's binaries are needed.
    """
    target = paths.bin_dir()
    wanted = ALL_BINARIES if real_nodes else CONTROL_PLANE_BINARIES
    missing = [b for b in missing_binaries(target) if b in wanted]
    if missing:
        names = ", ".join(b.name for b in missing)
        raise DevClusterError(f"missing binaries in {target} ({names}): {BUILD_HINT}")
    return target


def missing_binaries(target: Path) -> list[GoBinary]:
    """Binaries that are absent, not executable, or stamped with another pinned version."""
    stamp = read_stamp(target)
    return [
        binary
        for binary in ALL_BINARIES
        if not os.access(target / binary.name, os.X_OK)
        or stamp.get(binary.name) != _stamp_entry(binary)
    ]


def read_stamp(target: Path) -> dict[str, dict[str, str]]:
    try:
        loaded = json.loads((target / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def find_go() -> str:
    go = shutil.which("go")
    if go is None:
        raise DevClusterError(
            "the Go toolchain is not on PATH: install Go >= 1.26 (https://go.dev/dl) "
            f"and {BUILD_HINT} again"
        )
    return go


def staging_modules(kubernetes_go_mod: str) -> list[str]:
    """The `k8s.io/*` modules that kubernetes requires at v0.0.0 and replaces locally."""
    required = set(re.findall(r"^\s*(k8s\.io/[\w.-]+) v0\.0\.0\b", kubernetes_go_mod, re.M))
    replaced = re.findall(r"^\s*(k8s\.io/[\w.-]+) => \./staging/", kubernetes_go_mod, re.M)
    return sorted(set(replaced) & required)


def kubernetes_consumer_go_mod(kubernetes_go_mod: str) -> str:
    replaces = "".join(
        f"\t{module} => {module} {STAGING_VERSION}\n"
        for module in staging_modules(kubernetes_go_mod)
    )
    return (
        f"module {CONSUMER_MODULE}\n\ngo {_go_directive(kubernetes_go_mod)}\n\n"
        f"require k8s.io/kubernetes {KUBERNETES_VERSION}\n\nreplace (\n{replaces})\n"
    )


def kubernetes_ldflags(build_date: str) -> str:
    """Stamp the release into both version packages so `kubectl version` reports it."""
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    values = {
        "gitVersion": KUBERNETES_VERSION,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": build_date,
    }
    flags = [
        f"-X k8s.io/{package}.{key}={value}"
        for package in ("client-go/pkg/version", "component-base/version")
        for key, value in values.items()
    ]
    return " ".join(["-s", "-w", *flags])


def _go_directive(go_mod: str) -> str:
    match = re.search(r"^go (\S+)$", go_mod, re.M)
    return match.group(1) if match else "1.26.0"


def _stamp_entry(binary: GoBinary) -> dict[str, str]:
    return {"package": binary.package, "version": binary.version}


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """Serialise concurrent builds (two test runs at once) on one cache."""
    paths.build_dir().mkdir(parents=True, exist_ok=True)
    with open(paths.build_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _Builder:
    def __init__(self, go: str, target: Path, report: Progress) -> None:
        self.go = go
        self.target = target
        self.report = report
        self.log_path = paths.build_dir() / "build.log"
        self.env = {**os.environ, "CGO_ENABLED": "0"}

    def build_kubernetes(self, binaries: Sequence[GoBinary]) -> None:
        module = self._download(f"k8s.io/kubernetes@{KUBERNETES_VERSION}")
        go_mod = Path(module["GoMod"]).read_text()
        workdir = self._consumer(
            f"kubernetes-{KUBERNETES_VERSION}", kubernetes_consumer_go_mod(go_mod)
        )
        self._go_get(
            workdir, [f"{b.package}@{b.version}" for b in (*KUBERNETES_BINARIES, KUBELET_BINARY)]
        )
        ldflags = kubernetes_ldflags(_release_date(module))
        for binary in binaries:
            self._build(workdir, binary, ldflags)

    def build_etcd(self) -> None:
        binary = ETCD_BINARY
        self._download(f"{binary.package}@{binary.version}")
        go_mod = (
            f"module {CONSUMER_MODULE}\n\ngo 1.26.0\n\nrequire {binary.package} {binary.version}\n"
        )
        workdir = self._consumer(f"etcd-{binary.version}", go_mod)
        self._go_get(workdir, [f"{binary.package}@{binary.version}"])
        ldflags = f"-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA={binary.version}"
        self._build(workdir, binary, ldflags)

    def install(self, binaries: Sequence[GoBinary], ldflags: str) -> None:
        """`go install` packages of one clean module (no local replaces) at one version."""
        first = binaries[0]
        tags = ",".join(first.tags)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=self.target) as gobin:
            self._go(
                [
                    "install",
                    "-p",
                    "2",
                    "-trimpath",
                    *(["-tags", tags] if tags else []),
                    "-ldflags",
                    ldflags,
                    *(f"{b.package}@{b.version}" for b in binaries),
                ],
                cwd=paths.build_dir(),
                env={"GOBIN": gobin, "GOFLAGS": _without_mod_flag()},
                what=f"build {', '.join(b.name for b in binaries)}",
            )
            for binary in binaries:
                os.replace(Path(gobin) / binary.name, self.target / binary.name)
        for binary in binaries:
            self._stamp(binary, time.monotonic() - started)

    def _download(self, module: str) -> dict[str, str]:
        result = subprocess.run(
            [self.go, "mod", "download", "-json", module],
            cwd=paths.build_dir(),
            env={**self.env, "GOFLAGS": _without_mod_flag()},
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            info: dict[str, str] = json.loads(result.stdout)
        except ValueError:
            info = {"Error": result.stderr.strip() or "no output"}
        if result.returncode != 0 or "Error" in info:
            proxy = self.env.get("GOPROXY") or _go_env(self.go, "GOPROXY")
            reason = _last_line(info.get("Error", result.stderr))
            raise DevClusterError(
                f"cannot download {module} from the Go module proxy (GOPROXY={proxy}): {reason}; "
                "check network access to the proxy or set GOPROXY"
            )
        return info

    def _consumer(self, name: str, go_mod: str) -> Path:
        workdir = paths.build_dir() / name
        workdir.mkdir(parents=True, exist_ok=True)
        mod_file = workdir / "go.mod"
        if not (workdir / "go.sum").exists() or not mod_file.exists():
            mod_file.write_text(go_mod)
            (workdir / "go.sum").unlink(missing_ok=True)
        return workdir

    def _go_get(self, workdir: Path, packages: Sequence[str]) -> None:
        # Resolved once per package list: a cache from before a binary was added resolves again.
        wanted = "\n".join(sorted(packages)) + "\n"
        resolved = workdir / "packages.txt"
        if (workdir / "go.sum").exists() and resolved.exists() and resolved.read_text() == wanted:
            return
        self._go(["get", *packages], cwd=workdir, env={}, what="resolve modules")
        resolved.write_text(wanted)

    def _build(self, workdir: Path, binary: GoBinary, ldflags: str) -> None:
        started = time.monotonic()
        partial = self.target / f".{binary.name}.partial"
        self._go(
            [
                "build",
                "-p",
                "2",
                "-trimpath",
                "-ldflags",
                ldflags,
                "-o",
                str(partial),
                binary.package,
            ],
            cwd=workdir,
            env={},
            what=f"build {binary.name}",
        )
        os.replace(partial, self.target / binary.name)
        self._stamp(binary, time.monotonic() - started)

    def _stamp(self, binary: GoBinary, seconds: float) -> None:
        stamp = read_stamp(self.target)
        stamp[binary.name] = _stamp_entry(binary)
        (self.target / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        self.report(f"built {binary.name} {binary.version} in {seconds:.1f}s")

    def _go(self, args: list[str], *, cwd: Path, env: dict[str, str], what: str) -> None:
        with open(self.log_path, "a") as log:
            log.write(f"$ go {' '.join(args)}  (in {cwd})\n")
            log.flush()
            result = subprocess.run(
                [self.go, *args],
                cwd=cwd,
                env={**self.env, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if result.returncode != 0:
            tail = self.log_path.read_text().strip().splitlines()[-1:] or ["no output"]
            raise DevClusterError(f"{what} failed: {tail[0]} (full log: {self.log_path})")


def _release_date(module: dict[str, str]) -> str:
    """The release's publication time from the proxy: a reproducible build date."""
    try:
        published = json.loads(Path(module["Info"]).read_text()).get("Time", "")
    except (OSError, ValueError, KeyError):
        published = ""
    return str(published) or "1970-01-01T00:00:00Z"


def go_env(key: str) -> str:
    """One `go env` value of the Go toolchain the builds use (GOMODCACHE, for one)."""
    return _go_env(find_go(), key)


def _go_env(go: str, key: str) -> str:
    result = subprocess.run([go, "env", key], capture_output=True, text=True, check=False)
    return result.stdout.strip()


def _without_mod_flag() -> str:
    """GOFLAGS minus -mod=..., which `go install pkg@version` and downloads reject."""
    flags = os.environ.get("GOFLAGS", "").split()
    return " ".join(flag for flag in flags if not flag.startswith("-mod="))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"
