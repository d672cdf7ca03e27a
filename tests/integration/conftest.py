"""Fixtures for tests against the real local control plane (`phalanx dev`).

- `dev_cluster`: one control plane per session with the default `gpu` profile, started and
  stopped here; set PHALANX_TEST_KUBECONFIG to reuse a running cluster instead. KUBECONFIG
  points at it for the whole session (kopf and the kubernetes client pick it up).
- `namespace`: a fresh namespace per test (its `default` ServiceAccount ready), deleted after.
- `crds`: every CRD in `crds/*.yaml`, applied once and waited for Established.
- `kubectl`, `wait_for`, `run_operator`: the helpers of `phalanx.devcluster.testing`.

Without built binaries every integration test fails with the fix (`phalanx dev build`);
PHALANX_SKIP_INTEGRATION=1 skips them instead.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from phalanx.devcluster import build, netns
from phalanx.devcluster.cluster import DevCluster
from phalanx.devcluster.errors import DevClusterError
from phalanx.devcluster.testing import ClusterHandle, Kubectl, run_operator, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "crds"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def dev_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterHandle]:
    if os.environ.get("PHALANX_SKIP_INTEGRATION") == "1":
        pytest.skip("PHALANX_SKIP_INTEGRATION=1")
    try:
        bin_dir = build.require_binaries(real_nodes=False)
    except DevClusterError as error:
        pytest.fail(f"integration tests need the control-plane binaries: {error}", pytrace=False)
    previous = os.environ.get("KUBECONFIG")
    reuse = os.environ.get("PHALANX_TEST_KUBECONFIG")
    cluster: DevCluster | None = None
    if reuse:
        handle = ClusterHandle(Path(reuse), bin_dir / "kubectl")
    else:
        cluster = DevCluster(tmp_path_factory.mktemp("devcluster"))
        try:
            kubeconfig = cluster.up(profile="gpu")
        except DevClusterError as error:
            cluster.down()
            pytest.fail(f"cannot start the dev cluster: {error}", pytrace=False)
        handle = ClusterHandle(kubeconfig, bin_dir / "kubectl", cluster.root)
    os.environ["KUBECONFIG"] = str(handle.kubeconfig)
    try:
        yield handle
    finally:
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous
        if cluster is not None:
            cluster.down()


@pytest.fixture(scope="session")
def kubectl(dev_cluster: ClusterHandle) -> Kubectl:
    return Kubectl(dev_cluster)


@pytest.fixture(autouse=True)
def inside_the_cluster_network(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that uses the cluster runs inside its network namespace, where fake pods'
    addresses are served and dialled, as do the threads and processes it starts (the operator,
    stand-ins for workloads, Prometheus); the rest of the session stays where it was."""
    if "dev_cluster" not in request.fixturenames:
        yield
        return
    handle: ClusterHandle = request.getfixturevalue("dev_cluster")
    namespace = DevCluster(handle.state_dir).namespace() if handle.state_dir else None
    with netns.entered(namespace):
        yield


@pytest.fixture(name="wait_for")
def wait_for_fixture() -> Callable[..., Any]:
    return wait_for


@pytest.fixture
def namespace(kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace whose `default` ServiceAccount exists, so pods are admitted at once."""
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


@pytest.fixture(scope="session")
def crds(kubectl: Kubectl) -> list[str]:
    """Apply every CRD in crds/ server-side and wait until each one is Established."""
    files = sorted(CRD_DIR.glob("*.yaml"))
    if not files:
        pytest.fail(f"no CRDs in {CRD_DIR}: run `phalanx crds`", pytrace=False)
    names = []
    for path in files:
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
        names.append(kubectl.json("get", "-f", str(path))["metadata"]["name"])

    def established(name: str) -> bool:
        conditions = kubectl.json("get", "crd", name).get("status", {}).get("conditions", [])
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    for name in names:
        wait_for(functools.partial(established, name), 30, f"CRD {name} to be Established")
    return names


@pytest.fixture(name="run_operator")
def run_operator_fixture(dev_cluster: ClusterHandle, crds: list[str]) -> Callable[..., Any]:
    """`with run_operator() as runner:` runs `kopf run -m phalanx.handlers` in a thread."""
    return run_operator
