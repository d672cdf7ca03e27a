"""The Helm chart on the local control plane, with the pinned helm: install, upgrade from the
previous chart version (CRDs included), RBAC proved by impersonating the operator's
ServiceAccount and by running the operator under that identity, optional Prometheus Operator
objects on clusters with and without their kinds, and KServe's InferenceService CRD beside ours.

The tests share one control plane of their own (fake nodes only): they install cluster-scoped
objects (CRDs, ClusterRoles) that other tests' clusters must not see.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import socket
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from phalanx.devcluster import build
from phalanx.devcluster.certs import ClientIdentity, issue_client
from phalanx.devcluster.cluster import DevCluster
from phalanx.devcluster.errors import DevClusterError
from phalanx.devcluster.kubeconfig import render_kubeconfig, write_kubeconfig
from phalanx.devcluster.testing import ClusterHandle, Kubectl, wait_for

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "phalanx"
# The last commit of chart 0.1.0 (CRDs in crds/, which Helm never upgrades).
PREVIOUS_CHART_COMMIT = "301e18e9c33ff9817c8450c5f48c8813175085b1"
RELEASE = "phalanx"
CRDS = ("llmtrainjobs.phalanx.dev", "inferenceservices.phalanx.dev")


class Chart:
    """helm and kubectl bound to the chart tests' cluster."""

    def __init__(self, handle: ClusterHandle, helm: Path) -> None:
        self.handle = handle
        self.helm_path = helm
        self.kubectl = Kubectl(handle)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.helm_path), f"--kubeconfig={self.handle.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed: {result.stderr}")
        return result

    def can_i(self, verb: str, resource: str, namespace: str, service_account: str) -> bool:
        scope = ["--all-namespaces"] if namespace == "*" else ["-n", namespace]
        result = self.kubectl(
            "auth", "can-i", verb, resource, *scope, f"--as={service_account}", check=False
        )
        answer = result.stdout.strip()
        assert answer in ("yes", "no"), result.stderr
        return answer == "yes"


@pytest.fixture(scope="module")
def chart_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Chart, DevCluster]]:
    if os.environ.get("PHALANX_SKIP_INTEGRATION") == "1":
        pytest.skip("PHALANX_SKIP_INTEGRATION=1")
    try:
        bin_dir = build.require_binaries(real_nodes=False)
        helm = build.ensure_helm(progress=lambda line: print(line, file=sys.stderr))
    except DevClusterError as error:
        pytest.fail(f"the chart tests need the binaries: {error}", pytrace=False)
    cluster = DevCluster(tmp_path_factory.mktemp("chart-cluster"))
    try:
        kubeconfig = cluster.up(profile="gpu", nodes=8)
    except DevClusterError as error:
        cluster.down()
        pytest.fail(f"cannot start the dev cluster: {error}", pytrace=False)
    try:
        yield Chart(ClusterHandle(kubeconfig, bin_dir / "kubectl", cluster.root), helm), cluster
    finally:
        cluster.down()


@pytest.fixture
def chart(chart_cluster: tuple[Chart, DevCluster]) -> Chart:
    return chart_cluster[0]


@pytest.fixture
def release(chart: Chart) -> Iterator[str]:
    """The release's namespace, emptied afterwards. Always the same one: the CRDs, kept on
    uninstall, stay annotated with the release that installed them, and Helm refuses to adopt
    them into a release of another namespace."""
    namespace = "phalanx-system"
    yield namespace
    chart.helm("uninstall", RELEASE, "-n", namespace, "--wait", check=False)
    chart.kubectl(
        "delete",
        "namespace",
        namespace,
        "--ignore-not-found",
        "--wait=true",
        timeout=120,
        check=False,
    )


def new_namespace(chart: Chart, stem: str) -> str:
    name = f"{stem}-{uuid.uuid4().hex[:6]}"
    chart.kubectl("create", "namespace", name)
    wait_for(lambda: chart.kubectl.exists("serviceaccount", "default", "-n", name), 30, name)
    return name


def install(chart: Chart, namespace: str, *sets: str, source: Path = CHART) -> str:
    args = ["upgrade", "--install", RELEASE, str(source), "-n", namespace, "--create-namespace"]
    for value in sets:
        args += ["--set", value]
    return chart.helm(*args).stdout


def printer_columns(chart: Chart, crd: str) -> list[str]:
    spec = chart.kubectl.json("get", "crd", crd)["spec"]
    return [c["name"] for c in spec["versions"][0].get("additionalPrinterColumns", [])]


def established(chart: Chart, crd: str) -> bool:
    result = chart.kubectl("get", "crd", crd, "-o", "json", check=False)
    if result.returncode != 0:
        return False
    conditions = yaml.safe_load(result.stdout).get("status", {}).get("conditions", [])
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def previous_chart(tmp_path: Path) -> Path:
    """Chart 0.1.0 as git history holds it."""
    archive = subprocess.run(
        [
            "git",
            "-C",
            str(ROOT),
            "archive",
            "--format=tar",
            PREVIOUS_CHART_COMMIT,
            "charts/phalanx",
        ],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp_path, filter="data")
    chart = tmp_path / "charts" / "phalanx"
    assert yaml.safe_load((chart / "Chart.yaml").read_text())["version"] == "0.1.0"
    return chart


# --- install and upgrade ------------------------------------------------------------------


def test_upgrade_from_the_previous_chart_brings_the_new_crds(
    chart: Chart, release: str, tmp_path: Path
) -> None:
    for crd in CRDS:  # the previous chart installs CRDs only where there are none
        chart.kubectl("delete", "crd", crd, "--ignore-not-found", "--wait=true")
    install(chart, release, source=previous_chart(tmp_path))
    wait_for(lambda: all(established(chart, c) for c in CRDS), 60, "0.1.0's CRDs")
    assert "Tokens/s" not in printer_columns(chart, "llmtrainjobs.phalanx.dev")
    job = new_namespace(chart, "upgrade-job")
    chart.kubectl("apply", "-n", job, "-f", str(ROOT / "jobs" / "tiny-cpu.yaml"))

    # 0.1.0's CRDs are not Helm's: the documented one-time flag hands them over.
    refused = chart.helm("upgrade", RELEASE, str(CHART), "-n", release, check=False)
    assert refused.returncode != 0
    assert "invalid ownership metadata" in refused.stderr
    chart.helm("upgrade", RELEASE, str(CHART), "-n", release, "--take-ownership")

    columns = printer_columns(chart, "llmtrainjobs.phalanx.dev")
    assert {"Tokens/s", "ETA(s)"} <= set(columns)
    wide = chart.kubectl("get", "ltj", "-n", job, "-o", "wide").stdout.splitlines()[0].split()
    assert {"TOKENS/S", "ETA(S)"} <= set(wide)
    assert "TOKENS/S" not in chart.kubectl("get", "ltj", "-n", job).stdout.splitlines()[0]
    # The job made under 0.1.0 survived the CRD upgrade; later upgrades need no flag.
    assert chart.kubectl.exists("ltj", "tiny-cpu", "-n", job)
    chart.helm("upgrade", RELEASE, str(CHART), "-n", release, "--set", "operator.workers=4")
    history = chart.helm("history", RELEASE, "-n", release, "-o", "yaml").stdout
    assert [r["chart"] for r in yaml.safe_load(history)] == [
        "phalanx-0.1.0",
        "phalanx-0.2.0",
        "phalanx-0.2.0",
    ]

    # Uninstalling keeps the CRDs, and with them every job.
    chart.helm("uninstall", RELEASE, "-n", release, "--wait")
    assert all(established(chart, c) for c in CRDS)
    assert chart.kubectl.exists("ltj", "tiny-cpu", "-n", job)
    chart.kubectl("delete", "namespace", job, "--wait=false")


def test_monitoring_objects_only_where_the_cluster_serves_them(chart: Chart, release: str) -> None:
    sets = ("serviceMonitor.enabled=true", "prometheusRule.enabled=true")
    notes = install(chart, release, *sets)
    # Without the Prometheus Operator the install succeeds and says what it left out.
    assert "NOT CREATED: serviceMonitor.enabled" in notes
    assert "NOT CREATED: prometheusRule.enabled" in notes
    manifest = chart.helm("get", "manifest", RELEASE, "-n", release).stdout
    assert "kind: ServiceMonitor" not in manifest

    for kind in ("ServiceMonitor", "PrometheusRule"):
        chart.kubectl(
            "apply", "--server-side", "-f", "-", stdin=yaml.safe_dump(monitoring_crd(kind))
        )
    try:
        wait_for(
            lambda: all(
                established(chart, f"{k.lower()}s.monitoring.coreos.com")
                for k in ("ServiceMonitor", "PrometheusRule")
            ),
            60,
            "the Prometheus Operator's CRDs",
        )
        notes = install(chart, release, *sets)
        assert "NOT CREATED" not in notes
        assert chart.kubectl.exists("servicemonitor", f"{RELEASE}-operator", "-n", release)
        rule = chart.kubectl.json("get", "prometheusrule", f"{RELEASE}-operator", "-n", release)
        assert len(rule["spec"]["groups"]) == 3
    finally:
        chart.helm("uninstall", RELEASE, "-n", release, "--wait", check=False)
        for kind in ("ServiceMonitor", "PrometheusRule"):
            chart.kubectl("delete", "crd", f"{kind.lower()}s.monitoring.coreos.com", check=False)


def monitoring_crd(kind: str) -> dict[str, Any]:
    """A stand-in for the Prometheus Operator's CRD of `kind`: the same group, version and
    names, a schema that accepts any spec (we test Helm's capability check, not its schema)."""
    plural = kind.lower() + "s"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": kind.lower(),
                "listKind": f"{kind}List",
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


# --- RBAC ---------------------------------------------------------------------------------

# What phalanx/kube.py and kopf call, as `kubectl auth can-i --list` names it.
RESOURCES = {
    "llmtrainjobs.phalanx.dev": {"list", "watch", "delete"},
    "inferenceservices.phalanx.dev": {"list", "watch"},
    "llmtrainjobs.phalanx.dev/status": {"patch"},
    "inferenceservices.phalanx.dev/status": {"patch"},
    "inferenceservices.phalanx.dev/scale": {"patch"},
    "pods": {"list", "watch", "create", "patch", "delete"},
    "services": {"list", "watch", "create", "patch", "delete"},
    "configmaps": {"list", "watch", "create", "patch", "delete"},
    "persistentvolumeclaims": {"list", "watch", "create", "patch"},
    "events": {"create", "patch"},
    "podgroups.scheduling.volcano.sh": {"create", "patch"},
    "podgroups.scheduling.x-k8s.io": {"create", "patch"},
    "nodes": {"list", "watch"},
    "customresourcedefinitions.apiextensions.k8s.io": {"list", "watch"},
    "namespaces": {"list", "watch"},
}
CLUSTER_READS = {
    "nodes": {"list", "watch"},
    "customresourcedefinitions.apiextensions.k8s.io": {"list", "watch"},
    # Each namespace's pod security label (and kopf's namespace discovery).
    "namespaces": {"list", "watch"},
}
# Outside the watched namespaces: only the caches' cluster-wide first lists, and kopf's
# namespace discovery.
OUTSIDE_WATCHED = {
    **CLUSTER_READS,
    "pods": {"list"},
    "persistentvolumeclaims": {"list"},
    "llmtrainjobs.phalanx.dev": {"list"},
    "inferenceservices.phalanx.dev": {"list"},
}


def listed(chart: Chart, namespace: str, account: str) -> dict[str, set[str]]:
    """`kubectl auth can-i --list` in a namespace, as resource -> verbs."""
    out = chart.kubectl("auth", "can-i", "--list", "-n", namespace, f"--as={account}").stdout
    rules: dict[str, set[str]] = {}
    for line in out.splitlines()[1:]:
        match = re.match(r"^(\S+)\s+\[[^\]]*\]\s+\[[^\]]*\]\s+\[([^\]]*)\]\s*$", line)
        if match:
            rules.setdefault(match.group(1), set()).update(match.group(2).split())
    return rules


def granted(chart: Chart, namespace: str, account: str) -> dict[str, set[str]]:
    """What the account may do in a namespace beyond what every authenticated user may."""
    everyone = listed(chart, namespace, "system:serviceaccount:default:nobody")
    rules = listed(chart, namespace, account)
    return {
        resource: verbs - everyone.get(resource, set())
        for resource, verbs in rules.items()
        if verbs - everyone.get(resource, set())
    }


def service_account(release: str) -> str:
    return f"system:serviceaccount:{release}:{RELEASE}-operator"


def test_rbac_grants_exactly_the_verbs_the_operator_calls(chart: Chart, release: str) -> None:
    install(chart, release)
    account = service_account(release)
    elsewhere = new_namespace(chart, "rbac-any")

    # Impersonating the operator's ServiceAccount: in any namespace, these verbs and no more.
    assert granted(chart, elsewhere, account) == RESOURCES
    assert granted(chart, "kube-system", account) == RESOURCES
    # Cluster-scoped: nodes are only read; nothing about RBAC, secrets or CRDs is writable.
    for verb, resource, allowed in [
        ("list", "nodes", True),
        ("watch", "nodes", True),
        ("patch", "nodes", False),
        ("list", "customresourcedefinitions.apiextensions.k8s.io", True),
        ("create", "customresourcedefinitions.apiextensions.k8s.io", False),
        ("list", "namespaces", True),
        ("patch", "namespaces", False),
        ("create", "clusterroles.rbac.authorization.k8s.io", False),
    ]:
        assert chart.can_i(verb, resource, "*", account) is allowed, (verb, resource)
    chart.kubectl("delete", "namespace", elsewhere, "--wait=false")


def test_watch_namespaces_grants_writes_only_there(chart: Chart, release: str) -> None:
    watched = new_namespace(chart, "rbac-watched")
    other = new_namespace(chart, "rbac-other")
    install(chart, release, f"watchNamespaces={{{watched}}}")
    account = service_account(release)

    assert granted(chart, watched, account) == RESOURCES
    assert granted(chart, other, account) == OUTSIDE_WATCHED
    assert chart.can_i("list", "pods", "*", account)
    assert not chart.can_i("watch", "pods", "*", account)
    assert chart.can_i("list", "namespaces", "*", account)
    assert chart.kubectl.json("get", "role", f"{RELEASE}-operator", "-n", watched)["rules"]
    assert not chart.kubectl.exists("role", f"{RELEASE}-operator", "-n", other)
    for namespace in (watched, other):
        chart.kubectl("delete", "namespace", namespace, "--wait=false")


# --- the operator under its ServiceAccount -------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_account_kubeconfig(cluster: DevCluster, release: str, path: Path) -> Path:
    """Credentials that authenticate as the operator's ServiceAccount: a client certificate
    with its user name, signed by the cluster CA, so RBAC evaluates exactly its bindings."""
    pki = cluster.layout.pki
    stem = f"sa-{release}"
    issue_client(pki, ClientIdentity(stem, service_account(release), ("system:serviceaccounts",)))
    port = cluster.layout.read_ports().apiserver
    config = render_kubeconfig(
        cluster="chart",
        server=f"https://127.0.0.1:{port}",
        ca_cert=pki.ca_cert,
        client_cert=pki.cert(stem),
        client_key=pki.key(stem),
        user=stem,
    )
    return write_kubeconfig(path, config)


def rendered_operator(chart: Chart, release: str) -> tuple[dict[str, str], list[str]]:
    """The environment (its ConfigMap) and arguments the chart's Deployment gives the operator."""
    manifest = list(
        yaml.safe_load_all(chart.helm("get", "manifest", RELEASE, "-n", release).stdout)
    )
    config = next(
        o for o in manifest if o and o["kind"] == "ConfigMap" and "PHALANX_TOPOLOGY" in o["data"]
    )
    deployment = next(o for o in manifest if o and o["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = dict(config["data"])
    for variable in container.get("env", []):
        # The downward API's one use here: the pod's namespace, the release's.
        field = variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        assert "value" in variable or field == "metadata.namespace", variable
        env[variable["name"]] = variable.get("value", release)
    return env, list(container["args"])


def gpu_job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "phalanx.dev/v1alpha1",
        "kind": "LLMTrainJob",
        "metadata": {"name": name},
        "spec": {
            "nodes": 2,
            "accelerator": {"type": "nvidia", "perNode": 8},
            "trainer": {"preset": "nano", "steps": 10},
            "checkpoint": {"size": "1Gi"},
        },
    }


def phase(chart: Chart, namespace: str, name: str) -> str:
    return str(
        chart.kubectl.json("get", "ltj", name, "-n", namespace).get("status", {}).get("phase", "")
    )


@contextlib.contextmanager
def chart_operator(chart: Chart, release: str, kubeconfig: Path, log_path: Path) -> Iterator[None]:
    """`phalanx operator run` as the chart's Deployment runs it: its ConfigMap's environment
    and its arguments, with `kubeconfig`'s credentials. The log is in the failure message."""
    env, args = rendered_operator(chart, release)
    args = [a.replace("0.0.0.0", "127.0.0.1") for a in args]
    phalanx = Path(sys.executable).with_name("phalanx")
    with open(log_path, "w") as log:
        operator = subprocess.Popen(
            [str(phalanx), "operator", "run", *args],
            env={
                **os.environ,
                **env,
                "KUBECONFIG": str(kubeconfig),
                "PHALANX_SCRAPE_INTERVAL": "0",
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield
    except AssertionError as error:
        raise AssertionError(f"{error}\noperator log:\n{log_path.read_text()[-3000:]}") from None
    finally:
        operator.terminate()
        operator.wait(timeout=30)


def operator_sets(**values: str) -> list[str]:
    """Ports of their own (the operator runs on this machine), no progress polling."""
    sets = {
        "operator.metricsPort": str(free_port()),
        "operator.livenessPort": str(free_port()),
        "operator.progressIntervalSeconds": "0",
        **values,
    }
    return [f"{k}={v}" for k, v in sets.items()]


@pytest.mark.parametrize(
    ("watch", "level"),
    [(False, "info"), (True, "warning")],
    ids=["all-namespaces-info", "watch-namespaces-warning"],
)
def test_operator_reconciles_under_its_service_account(
    chart_cluster: tuple[Chart, DevCluster], release: str, tmp_path: Path, watch: bool, level: str
) -> None:
    chart, cluster = chart_cluster
    namespace = new_namespace(chart, "sa-job")
    values = {"operator.logLevel": level} | (
        {"watchNamespaces": f"{{{namespace}}}"} if watch else {}
    )
    install(chart, release, *operator_sets(**values))
    # RBAC is eventually consistent: the API server's authorizer sees new or replaced bindings
    # a moment after helm returns. A pod's start hides that moment on a real cluster; this
    # operator starts at once.
    account = service_account(release)
    wait_for(
        lambda: granted(chart, namespace, account) == RESOURCES, 60, "the chart's grants in effect"
    )
    # A job the operator does not watch, there before it starts: the cache's cluster-wide
    # first list sees it, yet the operator leaves it alone (it may not write there).
    other = new_namespace(chart, "sa-other") if watch else None
    if other is not None:
        chart.kubectl.create(other, gpu_job("elsewhere"))
    kubeconfig = service_account_kubeconfig(cluster, release, tmp_path / "operator.kubeconfig")
    log_path = tmp_path / "operator.log"
    with chart_operator(chart, release, kubeconfig, log_path):
        chart.kubectl.create(namespace, gpu_job("sa-job"))
        wait_for(lambda: phase(chart, namespace, "sa-job") == "Running", 120, "the job to run")
    output = log_path.read_text()
    assert "Forbidden" not in output, output[-3000:]
    assert " 403" not in output, output[-3000:]
    if other is not None:
        assert phase(chart, other, "elsewhere") == ""
        assert chart.kubectl.json("get", "pods", "-n", other)["items"] == []
        chart.kubectl("delete", "namespace", other, "--wait=false")
    # The log level is the chart's: INFO lines only at info.
    assert ("phalanx operator started" in output) is (level == "info"), output[-3000:]
    chart.kubectl("delete", "namespace", namespace, "--wait=false")


# --- examples under the topology presets they name ----------------------------------------


def named_presets(path: Path) -> list[str]:
    """The presets an example says it runs under (its `# Topology presets:` line)."""
    match = re.search(r"^# Topology presets: (.+)$", path.read_text(), re.M)
    return [p.strip() for p in match.group(1).split(",")] if match else []


PRESET_CASES = [
    (path, preset)
    for path in sorted((ROOT / "jobs").glob("*.yaml"))
    for preset in named_presets(path)
]


def admitted(chart: Chart, namespace: str, name: str) -> dict[str, Any] | None:
    status = chart.kubectl.json("get", "ltj", name, "-n", namespace).get("status") or {}
    conditions = {c["type"]: c for c in status.get("conditions") or []}
    return conditions.get("Admitted")


def bound_claim(chart: Chart, namespace: str, name: str) -> dict[str, Any] | None:
    result = chart.kubectl("get", "pvc", name, "-n", namespace, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    claim: dict[str, Any] = yaml.safe_load(result.stdout)
    return claim if (claim.get("status") or {}).get("phase") == "Bound" else None


@pytest.mark.parametrize("preset", sorted({p for _, p in PRESET_CASES}))
def test_examples_run_under_every_preset_they_name(
    chart_cluster: tuple[Chart, DevCluster], release: str, tmp_path: Path, preset: str
) -> None:
    chart, cluster = chart_cluster
    install(chart, release, *operator_sets(**{"operator.topology": preset}))
    namespace = new_namespace(chart, f"preset-{preset}")
    examples = [path for path, p in PRESET_CASES if p == preset]
    log_path = tmp_path / "operator.log"
    with chart_operator(chart, release, cluster.kubeconfig, log_path):
        for path in examples:
            chart.kubectl("apply", "-n", namespace, "-f", str(path))
        for path in examples:
            name = yaml.safe_load(path.read_text())["metadata"]["name"]
            condition = wait_for(
                functools.partial(admitted, chart, namespace, name), 60, f"{name}'s Admitted"
            )
            # Admitted, or waiting for capacity this cluster lacks: never a level the preset
            # does not have.
            assert condition["reason"] != "UnknownTopologyLevel", (path.name, condition)
        gpt2 = yaml.safe_load((ROOT / "jobs" / "gpt2-124m-h100.yaml").read_text())["metadata"][
            "name"
        ]
        if (ROOT / "jobs" / "gpt2-124m-h100.yaml") in examples:
            # The gpu profile's racks hold it: it is placed in one rack.
            wait_for(
                lambda: (admitted(chart, namespace, gpt2) or {}).get("status") == "True",
                60,
                f"{gpt2} to be admitted under {preset}",
            )
            # Its checkpoint claim binds as written: 200Gi of the class it names.
            claim = wait_for(
                lambda: bound_claim(chart, namespace, f"{gpt2}-checkpoint"),
                60,
                f"{gpt2}'s checkpoint claim to bind",
            )
            assert claim["status"]["capacity"]["storage"] == "200Gi", claim["status"]
            assert claim["spec"]["storageClassName"] == "shared-nfs"
    chart.kubectl("delete", "namespace", namespace, "--wait=false")


# --- KServe beside Phalanx -----------------------------------------------------------------


def kserve_like_crd() -> dict[str, Any]:
    """KServe's InferenceService as the API server sees it: group serving.kserve.io, kind
    InferenceService, plural inferenceservices, short name isvc (schema left open)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "inferenceservices.serving.kserve.io"},
        "spec": {
            "group": "serving.kserve.io",
            "scope": "Namespaced",
            "names": {
                "kind": "InferenceService",
                "listKind": "InferenceServiceList",
                "plural": "inferenceservices",
                "singular": "inferenceservice",
                "shortNames": ["isvc"],
            },
            "versions": [
                {
                    "name": "v1beta1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


def test_kserve_and_phalanx_inference_services_side_by_side(chart: Chart, release: str) -> None:
    install(chart, release)
    chart.kubectl("apply", "--server-side", "-f", "-", stdin=yaml.safe_dump(kserve_like_crd()))
    namespace = new_namespace(chart, "kserve")
    try:
        wait_for(
            lambda: all(
                established(chart, c) for c in (*CRDS, "inferenceservices.serving.kserve.io")
            ),
            60,
            "both InferenceService CRDs",
        )
        chart.kubectl("apply", "-n", namespace, "-f", str(ROOT / "jobs" / "serve-tiny-cpu.yaml"))
        kserve = {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": {"name": "kserve-model"},
            "spec": {"predictor": {"model": {"modelFormat": {"name": "sklearn"}}}},
        }
        chart.kubectl.create(namespace, kserve)

        def names(resource: str) -> list[str]:
            return chart.kubectl("get", resource, "-n", namespace, "-o", "name").stdout.split()

        ours = ["inferenceservice.phalanx.dev/tiny-chat"]
        theirs = ["inferenceservice.serving.kserve.io/kserve-model"]
        assert names("lis") == ours
        assert names("inferenceservices.phalanx.dev") == ours
        assert names("isvc") == theirs
        assert names("inferenceservices.serving.kserve.io") == theirs
        # The bare plural names one of the two: why the docs say to use lis.
        assert names("inferenceservices") in (ours, theirs)
    finally:
        chart.kubectl("delete", "namespace", namespace, "--wait=true", check=False)
        chart.kubectl("delete", "crd", "inferenceservices.serving.kserve.io", check=False)
