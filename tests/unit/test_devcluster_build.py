from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from phalanx.devcluster import build
from phalanx.devcluster.errors import DevClusterError
from phalanx.devcluster.versions import ALL_BINARIES, KUBERNETES_VERSION, STAGING_VERSION

KUBERNETES_GO_MOD = """\
module k8s.io/kubernetes

go 1.26.0

require (
	github.com/spf13/cobra v1.10.2
	k8s.io/api v0.0.0
	k8s.io/client-go v0.0.0
	k8s.io/klog/v2 v2.140.0
	k8s.io/kubectl v0.0.0
)

replace (
	k8s.io/api => ./staging/src/k8s.io/api
	k8s.io/client-go => ./staging/src/k8s.io/client-go
	k8s.io/kubectl => ./staging/src/k8s.io/kubectl
	k8s.io/sample-cli-plugin => ./staging/src/k8s.io/sample-cli-plugin
)
"""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PHALANX_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_staging_modules_are_the_required_and_locally_replaced_ones() -> None:
    # sample-cli-plugin is replaced but never required (and never published).
    assert build.staging_modules(KUBERNETES_GO_MOD) == [
        "k8s.io/api",
        "k8s.io/client-go",
        "k8s.io/kubectl",
    ]


def test_consumer_go_mod_pins_kubernetes_and_replaces_staging_with_published_releases() -> None:
    go_mod = build.kubernetes_consumer_go_mod(KUBERNETES_GO_MOD)

    assert "go 1.26.0" in go_mod
    assert f"require k8s.io/kubernetes {KUBERNETES_VERSION}" in go_mod
    assert f"\tk8s.io/client-go => k8s.io/client-go {STAGING_VERSION}\n" in go_mod
    assert "sample-cli-plugin" not in go_mod


def test_ldflags_stamp_the_release_into_both_version_packages() -> None:
    flags = build.kubernetes_ldflags("2026-07-22T18:07:38Z")

    for package in ("k8s.io/client-go/pkg/version", "k8s.io/component-base/version"):
        assert f"-X {package}.gitVersion={KUBERNETES_VERSION}" in flags
        assert f"-X {package}.buildDate=2026-07-22T18:07:38Z" in flags
    assert "-X k8s.io/component-base/version.gitMinor=36" in flags


def fake_binaries(directory: Path, *, stamp: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for binary in ALL_BINARIES:
        path = directory / binary.name
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    if stamp:
        entries = {b.name: {"package": b.package, "version": b.version} for b in ALL_BINARIES}
        (directory / build.STAMP_NAME).write_text(json.dumps(entries))


def test_cached_binaries_are_not_rebuilt(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_binaries(cache / "bin" / KUBERNETES_VERSION)
    monkeypatch.setenv("PATH", "/nonexistent")  # any Go invocation would fail

    assert build.ensure_binaries() == cache / "bin" / KUBERNETES_VERSION
    assert build.require_binaries() == cache / "bin" / KUBERNETES_VERSION


def test_binaries_without_a_matching_stamp_count_as_missing(cache: Path) -> None:
    fake_binaries(cache / "bin" / KUBERNETES_VERSION, stamp=False)

    assert build.missing_binaries(cache / "bin" / KUBERNETES_VERSION) == list(ALL_BINARIES)


def test_missing_binaries_name_the_fix(cache: Path) -> None:
    with pytest.raises(DevClusterError, match=r"missing binaries .*run `phalanx dev build`"):
        build.require_binaries()


def test_missing_go_is_one_clear_line(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")

    with pytest.raises(DevClusterError, match="Go toolchain is not on PATH") as error:
        build.ensure_binaries()
    assert "\n" not in str(error.value)


def test_unreachable_proxy_is_one_clear_line(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("go") is None:
        pytest.skip("needs a Go toolchain")
    monkeypatch.setenv("GOPROXY", "off")
    monkeypatch.setenv("GOMODCACHE", str(cache / "empty-modcache"))

    with pytest.raises(DevClusterError, match=r"cannot download .* GOPROXY=off") as error:
        build.ensure_binaries()
    assert "\n" not in str(error.value)
