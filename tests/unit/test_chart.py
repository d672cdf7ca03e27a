"""The Helm chart, rendered and linted by the pinned helm: CRDs in step with crds/, values
checked by their schema, every option combination rendering what it promises, alerts that
promtool accepts and whose unit tests pass, a README whose values table is the schema's,
dashboards and alerts that query only metrics Phalanx really exports.

`python tests/unit/test_chart.py` rewrites the chart README's values table from the schema.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from phalanx import metrics as operator_metrics
from phalanx.placement import PRESETS, Topology

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "phalanx"
README = CHART / "README.md"
TABLE_START = "<!-- values table: generated from values.schema.json; run `python tests/unit/test_chart.py` -->"
TABLE_END = "<!-- end of values table -->"
MONITORING = ("ServiceMonitor", "PrometheusRule", "PodMonitor")


@functools.cache
def helm_binary() -> Path:
    from phalanx.devcluster import build

    return build.ensure_helm(progress=lambda line: print(line, file=sys.stderr))


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(helm_binary()), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {result.stderr}")
    return result


def render(
    *sets: str, api: tuple[str, ...] = (), namespace: str = "phalanx-system"
) -> list[dict[str, Any]]:
    args = ["template", "phalanx", str(CHART), "--namespace", namespace, *set_args(sets)]
    for kind in api:
        args += ["--api-versions", f"monitoring.coreos.com/v1/{kind}"]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def set_args(sets: tuple[str, ...] | list[str]) -> list[str]:
    """`--set k=v`; `--set-json` for a value with a comma or a float, which --set would split
    or turn into a string."""
    args: list[str] = []
    for value in sets:
        key, _, raw = value.partition("=")
        if ("," in raw and not raw.startswith("{")) or re.fullmatch(r"-?[0-9]+\.[0-9]+", raw):
            args += ["--set-json", f"{key}={raw if ',' not in raw else json.dumps(raw)}"]
        else:
            args += ["--set", value]
    return args


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def schema() -> dict[str, Any]:
    return dict(json.loads((CHART / "values.schema.json").read_text()))


# --- CRDs ---------------------------------------------------------------------------------


def test_chart_crds_match_generated_crds() -> None:
    generated = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    chart_crds = CHART / "files" / "crds"
    assert sorted(p.name for p in chart_crds.glob("*.yaml")) == generated
    for name in generated:
        assert (chart_crds / name).read_text() == (ROOT / "crds" / name).read_text(), (
            f"run `make crds` ({name})"
        )


def test_crds_are_templates_kept_on_uninstall_so_upgrades_reach_them() -> None:
    # Helm never upgrades crds/: a chart with CRDs there would freeze them at the first install.
    assert not (CHART / "crds").exists()
    crds = [o for o in render() if o["kind"] == "CustomResourceDefinition"]
    assert sorted(c["metadata"]["name"] for c in crds) == [
        "inferenceservices.phalanx.dev",
        "llmtrainjobs.phalanx.dev",
    ]
    for crd in crds:
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        source = yaml.safe_load(
            (ROOT / "crds" / f"phalanx.dev_{crd['spec']['names']['plural']}.yaml").read_text()
        )
        assert crd["spec"] == source["spec"]
    assert "annotations" not in next(
        o["metadata"] for o in render("crds.keep=false") if o["kind"] == "CustomResourceDefinition"
    )
    assert "CustomResourceDefinition" not in kinds(render("crds.install=false"))


# --- lint and every option combination ------------------------------------------------------


@pytest.mark.parametrize(
    "sets",
    [
        (),
        (
            "serviceMonitor.enabled=true",
            "prometheusRule.enabled=true",
            "podMonitors.enabled=true",
            "watchNamespaces={team-a,team-b}",
            "hostNetwork=true",
            "operator.logLevel=warning",
        ),
    ],
    ids=["defaults", "every-option"],
)
def test_helm_lint_strict(sets: tuple[str, ...]) -> None:
    args = ["lint", "--strict", str(CHART)]
    for value in sets:
        args += ["--set", value]
    assert "0 chart(s) failed" in helm(*args).stdout


TOGGLES = {
    "serviceMonitor.enabled": ("false", "true"),
    "prometheusRule.enabled": ("false", "true"),
    "podMonitors.enabled": ("false", "true"),
    "dashboards.enabled": ("false", "true"),
    "crds.install": ("false", "true"),
    "watchNamespaces": ("null", "{team-a,team-b}"),
}
COMBINATIONS = [
    (dict(zip(TOGGLES, values, strict=True)), api)
    for values in itertools.product(*TOGGLES.values())
    for api in (False, True)
]


@pytest.mark.parametrize(
    ("options", "api"),
    COMBINATIONS,
    ids=[
        ",".join(k.split(".")[0] for k, v in o.items() if v not in ("false", "null"))
        + ("+monitoring-api" if a else "")
        for o, a in COMBINATIONS
    ],
)
def test_every_option_combination_renders_what_it_promises(
    options: dict[str, str], api: bool
) -> None:
    sets = [f"{k}={v}" for k, v in options.items() if v != "null"]
    on = {k: v != "false" and v != "null" for k, v in options.items()}
    if on["podMonitors.enabled"] and not api:
        # Workload scraping cannot be skipped quietly: the install stops and says why.
        result = helm("template", "phalanx", str(CHART), *set_args(sets), check=False)
        assert result.returncode != 0
        assert (
            "podMonitors.enabled needs the Prometheus Operator's PodMonitor kind" in result.stderr
        )
        return
    objects = render(*sets, api=MONITORING if api else ())
    got = kinds(objects)

    # Objects of a kind the cluster does not serve are never rendered: they would fail the
    # whole install ("no matches for kind").
    assert got.count("ServiceMonitor") == int(on["serviceMonitor.enabled"] and api)
    assert got.count("PrometheusRule") == int(on["prometheusRule.enabled"] and api)
    assert (got.count("PodMonitor") > 0) == (on["podMonitors.enabled"] and api)
    assert got.count("CustomResourceDefinition") == (2 if on["crds.install"] else 0)
    dashboards = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"]
    ]
    assert len(dashboards) == (2 if on["dashboards.enabled"] else 0)
    assert got.count("Deployment") == 1
    assert_least_privilege(
        objects, namespaces=["team-a", "team-b"] if on["watchNamespaces"] else []
    )


READS = {"list", "watch"}


def rules_of(objects: list[dict[str, Any]], kind: str) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for obj in objects:
        if obj["kind"] != kind:
            continue
        for rule in obj["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


# What phalanx/kube.py and kopf call, by resource: the chart must grant exactly this.
WORKLOAD_VERBS = {
    ("phalanx.dev", "llmtrainjobs"): {"list", "watch", "delete"},
    ("phalanx.dev", "inferenceservices"): {"list", "watch"},
    ("phalanx.dev", "llmtrainjobs/status"): {"patch"},
    ("phalanx.dev", "inferenceservices/status"): {"patch"},
    ("phalanx.dev", "inferenceservices/scale"): {"patch"},
    ("", "pods"): {"list", "watch", "create", "patch", "delete"},
    ("", "services"): {"list", "watch", "create", "patch", "delete"},
    ("", "configmaps"): {"list", "watch", "create", "patch", "delete"},
    ("", "persistentvolumeclaims"): {"list", "watch", "create", "patch"},
    ("", "events"): {"create", "patch"},
    ("scheduling.volcano.sh", "podgroups"): {"create", "patch"},
    ("scheduling.x-k8s.io", "podgroups"): {"create", "patch"},
}
CLUSTER_READS = {
    ("", "nodes"): READS,
    ("apiextensions.k8s.io", "customresourcedefinitions"): READS,
    # Each namespace's pod security label; kopf's namespace discovery too.
    ("", "namespaces"): READS,
}


# Leader election (phalanx/handlers/leader.py through kube.get_lease, create_lease and
# replace_lease): its Lease, in the release namespace only.
LEADER_ELECTION = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}


def assert_least_privilege(objects: list[dict[str, Any]], namespaces: list[str]) -> None:
    leader = [o for o in objects if o["metadata"]["name"].endswith("-leader-election")]
    assert sorted(o["kind"] for o in leader) == ["Role", "RoleBinding"]
    assert {o["metadata"]["namespace"] for o in leader} == {"phalanx-system"}
    assert rules_of(leader, "Role") == LEADER_ELECTION
    objects = [o for o in objects if o not in leader]
    cluster = rules_of(objects, "ClusterRole")
    if not namespaces:
        assert cluster == {**CLUSTER_READS, **WORKLOAD_VERBS}
        assert kinds(objects).count("Role") == 0
        return
    # Namespaced: the cluster role only reads (the capacity snapshot, kopf's namespace check).
    assert cluster == {
        **CLUSTER_READS,
        ("", "pods"): {"list"},
        ("", "persistentvolumeclaims"): {"list"},
        ("phalanx.dev", "llmtrainjobs"): {"list"},
        ("phalanx.dev", "inferenceservices"): {"list"},
    }
    roles = [o for o in objects if o["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == namespaces
    for role in roles:
        assert rules_of([role], "Role") == WORKLOAD_VERBS
    bindings = [o for o in objects if o["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == namespaces


# Calls in phalanx/kube.py whose verb and resource are literals: `_rest("patch", "event", ...)`.
LITERAL_CALL = re.compile(r'\b_(?:rest|call)\(\s*"(\w+)",\s*"([a-z/]+)"')


@pytest.mark.parametrize("namespaces", [[], ["team-a"]], ids=["cluster-wide", "watch-namespaces"])
def test_every_literal_api_call_of_kube_py_is_granted(namespaces: list[str]) -> None:
    calls = set(LITERAL_CALL.findall((ROOT / "operator" / "phalanx" / "kube.py").read_text()))
    assert ("list", "node") in calls  # the pattern still finds the calls
    sets = [f"watchNamespaces={{{','.join(namespaces)}}}"] if namespaces else []
    objects = render(*sets)
    grants = rules_of(objects, "ClusterRole")
    for resource, verbs in rules_of(objects, "Role").items():
        grants.setdefault(resource, set()).update(verbs)
    for verb, resource in sorted(calls):
        plural = resource if resource.endswith("s") else f"{resource}s"
        wanted = {"create", "patch"} if verb == "apply" else {verb}
        assert wanted <= grants.get(("", plural), set()), f"kube.py calls {verb} {plural}"


# --- values: the schema and the checks it cannot express ------------------------------------


def test_default_values_match_the_schema() -> None:
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema())


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["operator.workers=0"], "operator/workers"),
        (["operator.topolgy=gke"], "topolgy"),
        (["operator.topology=nvidai"], "operator/topology"),
        (["operator.topology=rack"], "operator/topology"),
        (["operator.topology=rack=a,,host=b"], "operator/topology"),
        (["operator.logLevel=verbose"], "operator/logLevel"),
        (
            ["operator.livenessPort=8080"],
            "operator.metricsPort and operator.livenessPort are both 8080",
        ),
        (["operator.metricsPort=80"], "operator/metricsPort"),
        (["operator.progressBudgetPerSecond=0"], "operator/progressBudgetPerSecond"),
        (["resources=null"], "resources"),
        (["resources.limits=null"], "limits"),
        (["resources.limits.memory=lots"], "resources/limits/memory"),
        (["serviceMonitor.interval=soon"], "serviceMonitor/interval"),
        (["image.pullPolicy=Sometimes"], "image/pullPolicy"),
        (["watchNamespaces={Team_A}"], "watchNamespaces/0"),
        (["prometheusRule.ttftSeconds=0.3"], "prometheusRule/ttftSeconds"),
        (["prometheusRule.ttftObjective=1"], "prometheusRule/ttftObjective"),
        (["extraEnv[0].value=x"], "name"),
    ],
    ids=lambda v: v if isinstance(v, str) else v[0],
)
def test_bad_values_are_refused_by_helm_naming_the_field(sets: list[str], message: str) -> None:
    result = helm("template", "phalanx", str(CHART), *set_args(sets), check=False)
    assert result.returncode != 0, f"helm accepted {sets}"
    assert message in result.stderr, result.stderr


def test_schema_topology_presets_are_the_operators() -> None:
    topology = schema()["properties"]["operator"]["properties"]["topology"]
    assert sorted(topology["anyOf"][0]["enum"]) == sorted(PRESETS)


@pytest.mark.parametrize(
    "value",
    [
        "generic",
        "nvidia",
        "gke",
        "eks",
        "zone=topology.kubernetes.io/zone,rack=example.com/rack,host=kubernetes.io/hostname",
        "rack=phalanx.dev/rack",
    ],
)
def test_topologies_the_schema_accepts_start_the_operator(value: str) -> None:
    sub = schema()["properties"]["operator"]["properties"]["topology"]
    jsonschema.validate(value, sub)
    Topology.parse(value)  # the operator's own parser: no crash at startup


def test_log_level_reaches_the_operator() -> None:
    for level in ("debug", "info", "warning"):
        config = next(
            o
            for o in render(f"operator.logLevel={level}")
            if o["kind"] == "ConfigMap" and "PHALANX_TOPOLOGY" in o["data"]
        )
        assert config["data"]["PHALANX_LOG_LEVEL"] == level


def test_progress_budget_reaches_the_operator_and_parses() -> None:
    from phalanx.handlers import PROGRESS_BUDGET_ENV, progress_budget_from_env

    config = next(
        o
        for o in render("operator.progressBudgetPerSecond=250")
        if o["kind"] == "ConfigMap" and "PHALANX_TOPOLOGY" in o["data"]
    )
    value = config["data"][PROGRESS_BUDGET_ENV]
    with pytest.MonkeyPatch.context() as env:
        env.setenv(PROGRESS_BUDGET_ENV, value)
        assert progress_budget_from_env() == 250.0  # what the operator reads at startup


def test_replicas_elect_a_leader_through_a_lease() -> None:
    deployment = next(o for o in render("replicas=2") if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PHALANX_LEADER_ELECTION"]["value"] == "1"
    assert env["PHALANX_LEADER_LEASE"]["value"] == "phalanx-operator"
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_host_network_and_extra_env() -> None:
    objects = render(
        "hostNetwork=true",
        "extraEnv[0].name=KUBERNETES_SERVICE_HOST",
        "extraEnv[0].value=127.0.0.1",
    )
    pod = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["containers"][0]["env"][-1:] == [
        {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"}
    ]
    default = next(o for o in render() if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert "hostNetwork" not in default
    assert [e["name"] for e in default["containers"][0]["env"]] == [
        "PHALANX_LEADER_ELECTION",
        "PHALANX_LEADER_LEASE",
        "POD_NAMESPACE",
    ]


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"].startswith(">=1.")
    assert chart["home"].startswith("https://")
    assert chart["sources"]
    assert chart["maintainers"]
    assert (ROOT / "LICENSE").read_text().split()[:3] == ["Apache", "License", "Version"]
    # The chart refuses clusters older than its kubeVersion.
    old = helm("template", "phalanx", str(CHART), "--kube-version", "1.29.0", check=False)
    assert old.returncode != 0
    assert "kubeVersion" in old.stderr


# --- README --------------------------------------------------------------------------------


def _leaves(node: dict[str, Any], prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    rows: list[tuple[str, dict[str, Any]]] = []
    for name, sub in node.get("properties", {}).items():
        path = f"{prefix}{name}"
        if sub.get("type") == "object" and "properties" in sub and name != "resources":
            rows += _leaves(sub, path + ".")
        else:
            rows.append((path, sub))
    return rows


def _type(sub: dict[str, Any]) -> str:
    if "enum" in sub:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in sub["enum"])
    if "anyOf" in sub:
        return " or ".join(
            _type(option) if "enum" in option else option.get("type", "") for option in sub["anyOf"]
        )
    return str(sub.get("type", ""))


def values_table() -> str:
    lines = ["| value | type | default | description |", "|---|---|---|---|"]
    for path, sub in _leaves(schema()):
        default = json.dumps(sub.get("default"))
        description = str(sub.get("description", "")).replace("|", "\\|")
        lines.append(f"| `{path}` | {_type(sub)} | `{default}` | {description} |")
    return "\n".join(lines) + "\n"


def readme_with_table(text: str) -> str:
    start = text.index(TABLE_START) + len(TABLE_START)
    end = text.index(TABLE_END)
    return text[:start] + "\n" + values_table() + text[end:]


def test_readme_values_table_is_the_schema() -> None:
    text = README.read_text()
    assert readme_with_table(text) == text, "run `python tests/unit/test_chart.py`"


def test_every_value_is_described_with_its_default() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for path, sub in _leaves(schema()):
        assert sub.get("description"), f"{path} has no description"
        value: Any = defaults
        for part in path.split("."):
            value = value[part]
        assert sub.get("default") == value, (
            f"{path}: schema default {sub.get('default')!r}, values.yaml {value!r}"
        )


# --- metrics the dashboards and alerts query ------------------------------------------------


def exported_names() -> set[str]:
    """Every sample name the operator, the trainer and the inference server can expose."""
    from phalanx_serve.metrics import ServeMetrics
    from phalanx_trainer.metrics import TrainMetrics

    registries: list[CollectorRegistry] = [
        operator_metrics.REGISTRY,
        TrainMetrics(total_steps=1).registry,
    ]
    serve = CollectorRegistry()
    ServeMetrics("m", registry=serve)
    registries.append(serve)
    names: set[str] = set()
    for registry in registries:
        for family in registry.collect():
            suffixes = {
                "counter": ["_total"],
                "histogram": ["_bucket", "_sum", "_count"],
                "gauge": [""],
            }
            names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


METRIC_NAME = r"\b(phalanx_[a-z0-9_]+|controller_runtime_[a-z0-9_]+)\b"


@pytest.mark.parametrize(
    "dashboard", sorted((CHART / "dashboards").glob("*.json")), ids=lambda p: p.stem
)
def test_dashboards_query_real_metrics(dashboard: Path) -> None:
    data = json.loads(dashboard.read_text())
    known = exported_names()
    used = {
        name
        for panel in data["panels"]
        for target in panel["targets"]
        for name in re.findall(METRIC_NAME, target["expr"])
    }
    assert used, "a dashboard without queries"
    assert used <= known, f"unknown metrics: {sorted(used - known)}"


# --- alerts --------------------------------------------------------------------------------


def rules_file(tmp_path: Path, *sets: str) -> Path:
    rule = next(
        o
        for o in render("prometheusRule.enabled=true", *sets, api=MONITORING)
        if o["kind"] == "PrometheusRule"
    )
    path = tmp_path / "phalanx-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: apt-get install prometheus", pytrace=False)
    return found


EXPECTED_ALERTS = {
    "PhalanxOperatorDown",
    "PhalanxOperatorNoLeader",
    "PhalanxReconcileErrors",
    "PhalanxGangsStuckQueued",
    "PhalanxGangsStuckStarting",
    "PhalanxTrainJobRestartingRepeatedly",
    "PhalanxTrainJobStalled",
    "PhalanxCheckpointTooOld",
    "PhalanxTrainJobLowGoodput",
    "PhalanxInferenceTTFTBudgetBurn",
    "PhalanxInferenceLatencyBudgetBurn",
    "PhalanxInferenceKVCacheNearFull",
    "PhalanxInferenceQueueGrowing",
    "PhalanxInferenceRejecting",
}


def test_promtool_checks_the_rules_and_they_query_real_metrics(tmp_path: Path) -> None:
    path = rules_file(tmp_path)
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rules = [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    known = exported_names()
    for rule in rules:
        used = set(re.findall(METRIC_NAME, rule["expr"]))
        assert used, rule["alert"]
        assert used <= known, f"{rule['alert']}: unknown metrics {sorted(used - known)}"


TRAIN = 'namespace="ml",llmtrainjob="gpt",pod="gpt-0",rank="0"'
SERVE = 'namespace="ml",inferenceservice="chat",pod="chat-0",model_name="m"'

# promtool unit tests: each alert fires on the series that should trip it, and stays quiet on
# healthy ones. Series are written as the exporters and the workload scrape label them.
ALERT_TESTS: list[dict[str, Any]] = [
    {
        "interval": "1m",
        "input_series": [{"series": "up", "values": "1x30"}],
        "alert_rule_test": [
            {
                "eval_time": "15m",
                "alertname": "PhalanxOperatorDown",
                "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
            }
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": "phalanx_gpus_allocated", "values": "8x30"},
            # Two replicas standing by, then one takes the Lease.
            {"series": 'phalanx_operator_leader{pod="a"}', "values": "0x30"},
            {"series": 'phalanx_operator_leader{pod="b"}', "values": "0x10 1x20"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "8m",
                "alertname": "PhalanxOperatorNoLeader",
                "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
            },
            {"eval_time": "25m", "alertname": "PhalanxOperatorNoLeader", "exp_alerts": []},
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": "phalanx_gpus_allocated", "values": "8x30"},
            {
                "series": 'controller_runtime_reconcile_total{controller="llmtrainjob",result="error"}',
                "values": "0+5x40",
            },
            {
                "series": 'controller_runtime_reconcile_total{controller="inferenceservice",result="error"}',
                "values": "0x40",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "15m", "alertname": "PhalanxOperatorDown", "exp_alerts": []},
            {
                "eval_time": "30m",
                "alertname": "PhalanxReconcileErrors",
                "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "controller": "llmtrainjob"}}
                ],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": 'phalanx_trainjobs{phase="Queued"}', "values": "2x60"},
            {"series": "phalanx_gang_admission_wait_seconds_count", "values": "0+1x10 10x50"},
            {"series": 'phalanx_trainjobs{phase="Starting"}', "values": "1x20 0x40"},
        ],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "PhalanxGangsStuckQueued", "exp_alerts": []},
            {
                "eval_time": "50m",
                "alertname": "PhalanxGangsStuckQueued",
                "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
            },
            {
                "eval_time": "17m",
                "alertname": "PhalanxGangsStuckStarting",
                "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
            },
            {"eval_time": "30m", "alertname": "PhalanxGangsStuckStarting", "exp_alerts": []},
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {
                "series": 'phalanx_trainjob_restarts_total{llmtrainjob_namespace="ml",llmtrainjob="gpt"}',
                "values": "0 1 1 2 2 3 3 3",
            },
            {
                "series": 'phalanx_trainjob_restarts_total{llmtrainjob_namespace="ml",llmtrainjob="ok"}',
                "values": "0 1 1 1 1 1 1 1",
            },
        ],
        "alert_rule_test": [
            {
                "eval_time": "7m",
                "alertname": "PhalanxTrainJobRestartingRepeatedly",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "llmtrainjob_namespace": "ml",
                            "llmtrainjob": "gpt",
                        }
                    }
                ],
            }
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            # Steps until minute 10, then nothing: stalled from minute 25 on.
            {"series": f"phalanx_train_step{{{TRAIN}}}", "values": "0+10x10 100x30"},
            {"series": f"phalanx_train_total_steps{{{TRAIN}}}", "values": "1000x40"},
            # A finished job stops stepping too: not stalled.
            {
                "series": 'phalanx_train_step{namespace="ml",llmtrainjob="done",pod="done-0",rank="0"}',
                "values": "1000x40",
            },
            {
                "series": 'phalanx_train_total_steps{namespace="ml",llmtrainjob="done",pod="done-0",rank="0"}',
                "values": "1000x40",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "PhalanxTrainJobStalled", "exp_alerts": []},
            {
                "eval_time": "30m",
                "alertname": "PhalanxTrainJobStalled",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "namespace": "ml",
                            "llmtrainjob": "gpt",
                            "pod": "gpt-0",
                            "rank": "0",
                        }
                    }
                ],
            },
        ],
    },
    {
        "interval": "10m",
        "input_series": [
            {"series": f"phalanx_train_step{{{TRAIN}}}", "values": "0+10x30"},
            {"series": f"phalanx_train_total_steps{{{TRAIN}}}", "values": "10000x30"},
            # Saved every 10 minutes for the first hour, then never again.
            {"series": f"phalanx_checkpoint_save_seconds_count{{{TRAIN}}}", "values": "0+1x6 6x24"},
        ],
        "alert_rule_test": [
            {"eval_time": "2h", "alertname": "PhalanxCheckpointTooOld", "exp_alerts": []},
            {
                "eval_time": "3h30m",
                "alertname": "PhalanxCheckpointTooOld",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "namespace": "ml",
                            "llmtrainjob": "gpt",
                            "pod": "gpt-0",
                            "rank": "0",
                        }
                    }
                ],
            },
        ],
    },
    {
        "interval": "5m",
        "input_series": [
            # Rising from 0.5 towards 0.7: low for the whole hour.
            {
                "series": 'phalanx_trainjob_ettr{llmtrainjob_namespace="ml",llmtrainjob="gpt"}',
                "values": "0.5+0.01x20",
            },
            # Queued (0) and finished (constant), neither losing time now.
            {
                "series": 'phalanx_trainjob_ettr{llmtrainjob_namespace="ml",llmtrainjob="queued"}',
                "values": "0x20",
            },
            {
                "series": 'phalanx_trainjob_ettr{llmtrainjob_namespace="ml",llmtrainjob="done"}',
                "values": "0.6x20",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "PhalanxTrainJobLowGoodput", "exp_alerts": []},
            {
                "eval_time": "1h",
                "alertname": "PhalanxTrainJobLowGoodput",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "llmtrainjob_namespace": "ml",
                            "llmtrainjob": "gpt",
                        }
                    }
                ],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            # 100 requests a minute; from minute 60 on, half of them over the 1 s threshold.
            {
                "series": f'phalanx_serve_time_to_first_token_seconds_bucket{{{SERVE},le="1.0"}}',
                "values": "0+100x60 6000+50x30",
            },
            {
                "series": f"phalanx_serve_time_to_first_token_seconds_count{{{SERVE}}}",
                "values": "0+100x90",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "55m", "alertname": "PhalanxInferenceTTFTBudgetBurn", "exp_alerts": []},
            {
                "eval_time": "90m",
                "alertname": "PhalanxInferenceTTFTBudgetBurn",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "critical",
                            "namespace": "ml",
                            "inferenceservice": "chat",
                        }
                    }
                ],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            # 10 requests a minute; from minute 60 on, 3 of them take longer than 30 s.
            {
                "series": f'phalanx_serve_e2e_request_latency_seconds_bucket{{{SERVE},le="30.0"}}',
                "values": "0+10x60 600+7x30",
            },
            {
                "series": f"phalanx_serve_e2e_request_latency_seconds_count{{{SERVE}}}",
                "values": "0+10x90",
            },
        ],
        "alert_rule_test": [
            {
                "eval_time": "55m",
                "alertname": "PhalanxInferenceLatencyBudgetBurn",
                "exp_alerts": [],
            },
            {
                "eval_time": "90m",
                "alertname": "PhalanxInferenceLatencyBudgetBurn",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "critical",
                            "namespace": "ml",
                            "inferenceservice": "chat",
                        }
                    }
                ],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": f"phalanx_serve_kv_cache_usage_perc{{{SERVE}}}", "values": "0.5x10 0.95x20"},
            {"series": f"phalanx_serve_num_requests_waiting{{{SERVE}}}", "values": "0+2x30"},
            {
                "series": f'phalanx_serve_request_rejected_total{{{SERVE},reason="queue_full"}}',
                "values": "0+20x30",
            },
            {"series": f"phalanx_serve_request_success_total{{{SERVE}}}", "values": "0+80x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "12m", "alertname": "PhalanxInferenceKVCacheNearFull", "exp_alerts": []},
            {
                "eval_time": "25m",
                "alertname": "PhalanxInferenceKVCacheNearFull",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "namespace": "ml",
                            "inferenceservice": "chat",
                        }
                    }
                ],
            },
            {
                "eval_time": "25m",
                "alertname": "PhalanxInferenceQueueGrowing",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "namespace": "ml",
                            "inferenceservice": "chat",
                        }
                    }
                ],
            },
            {
                "eval_time": "25m",
                "alertname": "PhalanxInferenceRejecting",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "namespace": "ml",
                            "inferenceservice": "chat",
                        }
                    }
                ],
            },
        ],
    },
]


# The value each firing alert's annotations print, as Prometheus' template functions write it.
ALERT_VALUES = {
    ("PhalanxReconcileErrors", "30m"): "83.33m",  # 5 errors a minute
    ("PhalanxGangsStuckQueued", "50m"): "2",
    ("PhalanxTrainJobStalled", "30m"): "100",
    ("PhalanxTrainJobLowGoodput", "1h"): "62%",
    # Half the requests of the window's last 30 minutes were slow (the rate's window holds 59
    # minutes of samples, so not exactly a quarter).
    ("PhalanxInferenceTTFTBudgetBurn", "90m"): "25.83%",
    ("PhalanxInferenceLatencyBudgetBurn", "90m"): "16.17%",  # 3 of 10 for 29 of 59 minutes
    ("PhalanxInferenceKVCacheNearFull", "25m"): "95%",
    ("PhalanxInferenceQueueGrowing", "25m"): "50",
    ("PhalanxInferenceRejecting", "25m"): "20%",
}


def with_annotations(tests: list[dict[str, Any]], rules: Path) -> list[dict[str, Any]]:
    """Fill each expected alert's annotations from the rule's templates ($labels and $value):
    promtool compares them too, so a broken template fails the test."""
    annotations = {
        r["alert"]: r.get("annotations", {})
        for g in yaml.safe_load(rules.read_text())["groups"]
        for r in g["rules"]
    }

    def expand(text: str, labels: dict[str, str], value: str | None) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        if "$value" in text:
            assert value is not None, f"no expected value for {text!r}"
            text = re.sub(r"\{\{ \$value( \| \w+)? \}\}", value, text)
        return text

    filled = json.loads(json.dumps(tests))
    for case in filled:
        for check in case["alert_rule_test"]:
            name = check["alertname"]
            value = ALERT_VALUES.get((name, check["eval_time"]))
            for alert in check["exp_alerts"]:
                labels = alert["exp_labels"]
                alert["exp_annotations"] = {
                    key: expand(text, labels, value) for key, text in annotations[name].items()
                }
    return filled


def test_promtool_unit_tests_of_every_alert(tmp_path: Path) -> None:
    rules = rules_file(tmp_path)
    tested = {t["alertname"] for case in ALERT_TESTS for t in case["alert_rule_test"]}
    assert tested == EXPECTED_ALERTS
    tests = tmp_path / "phalanx-rules-test.yaml"
    tests.write_text(
        yaml.safe_dump(
            {
                "rule_files": [rules.name],
                "evaluation_interval": "1m",
                "tests": with_annotations(ALERT_TESTS, rules),
            },
            sort_keys=False,
        )
    )
    result = subprocess.run(
        [promtool(), "test", "rules", str(tests)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_thresholds_follow_the_values(tmp_path: Path) -> None:
    path = rules_file(
        tmp_path,
        "prometheusRule.ttftSeconds=2.5",
        "prometheusRule.ttftObjective=0.9",
        "prometheusRule.restartsPerHour=7",
    )
    rules = {
        r["alert"]: r["expr"]
        for g in yaml.safe_load(path.read_text())["groups"]
        for r in g["rules"]
    }
    assert 'le="2.5"' in rules["PhalanxInferenceTTFTBudgetBurn"]
    assert "> 1.44" in rules["PhalanxInferenceTTFTBudgetBurn"]
    assert ">= 7" in rules["PhalanxTrainJobRestartingRepeatedly"]


if __name__ == "__main__":
    README.write_text(readme_with_table(README.read_text()))
    print(f"wrote {README}")
