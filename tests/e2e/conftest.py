"""Fixtures of the end-to-end tier: Phalanx's own images on real kubelet nodes.

- `real_cluster`: one dev cluster per session with two real nodes (`phalanx dev up --real 2`,
  no fake nodes), the images built from images/*/Dockerfile (cached by content hash), the
  CRDs applied, and the operator running as its own process inside the cluster's network
  namespace, exactly as `make demo` runs it. KUBECONFIG points at it for the session.
- `namespace`: a fresh namespace per test, deleted after.

The tier is skipped, with the reason printed, only where the machine cannot run real nodes
(not root, no network or mount namespaces, no overlay file system); anything else missing
(binaries, buildah, runc, CNI plugins) fails with the command that fixes it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from realkit import RealCluster, kernel_blocker, machine_snapshot, snapshot_difference

from phalanx.devcluster import build, paths, realnode
from phalanx.devcluster.cluster import DevCluster
from phalanx.devcluster.errors import DevClusterError
from phalanx.devcluster.testing import ClusterHandle, Kubectl, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def real_cluster() -> Iterator[RealCluster]:
    blocker = kernel_blocker()
    if blocker is not None:
        print(f"\nskipping the e2e tier: {blocker}", file=sys.stderr)
        pytest.skip(f"e2e tier needs real nodes: {blocker}")
    try:
        bin_dir = build.require_binaries()
        realnode.check_host()
        from phalanx.devcluster.images import ImageBuilder

        ImageBuilder(progress=lambda line: print(line, file=sys.stderr)).build_all()
    except DevClusterError as error:
        pytest.fail(f"the e2e tier cannot start: {error}", pytrace=False)
    cluster = DevCluster(paths.default_state_dir("e2e"))
    cluster.down()  # leftovers of an interrupted run
    before = machine_snapshot()
    previous = os.environ.get("KUBECONFIG")
    try:
        kubeconfig = cluster.up(profile="cpu", nodes=0, real=2, timeout=600)
        handle = ClusterHandle(kubeconfig, bin_dir / "kubectl", cluster.root)
        os.environ["KUBECONFIG"] = str(kubeconfig)
        kubectl = Kubectl(handle)
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds"))
        kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        log_path = cluster.start_operator({"PHALANX_PROGRESS_INTERVAL": "2"})
        yield RealCluster(cluster, handle, log_path)
    except DevClusterError as error:
        pytest.fail(f"cannot start the real-node cluster: {error}", pytrace=False)
    finally:
        cluster.down()
        changed = snapshot_difference(before, machine_snapshot())
        # Reported as an error of the session's last test: the machine must be as it was.
        assert not changed, "real nodes left the machine changed:\n" + "\n".join(changed[:20])
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous


@pytest.fixture
def kubectl(real_cluster: RealCluster) -> Kubectl:
    return real_cluster.kubectl


@pytest.fixture
def namespace(real_cluster: RealCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    kubectl = real_cluster.kubectl
    stem = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40]
    name = f"{stem.strip('-')}-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    wait_for(
        lambda: kubectl.exists("serviceaccount", "default", "-n", name),
        30,
        f"the default ServiceAccount in namespace {name}",
    )
    yield name
    kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture
def port_forward(real_cluster: RealCluster) -> Iterator[Any]:
    started: list[subprocess.Popen[str]] = []

    def forward(namespace: str, target: str, port: int) -> int:
        process = subprocess.Popen(
            [
                str(real_cluster.handle.kubectl_path),
                f"--kubeconfig={real_cluster.handle.kubeconfig}",
                "port-forward",
                "-n",
                namespace,
                target,
                f"0:{port}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        started.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"kubectl port-forward said: {line!r}"
        return int(match.group(1))

    yield forward
    for process in started:
        process.terminate()
        process.wait(10)
