"""Pod security levels: what each namespace level lets a pod template unlock, the pods the
renderer makes at each level (checked against the Pod Security Standards' own rules, not
only compared), the operator's refusal below the level, and `phalanx validate --pod-security`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from builders import TINY, make_job, make_service
from typer.testing import CliRunner

from phalanx.api.pod_security import level_of, refusal_message, refused
from phalanx.api.trainjob import LLMTrainJobSpec
from phalanx.api.validate import validate_object
from phalanx.cli import app
from phalanx.constants import POD_SECURITY_LABEL, POD_SECURITY_LEVELS
from phalanx.render.inference import ServiceRef, render_group_pod
from phalanx.render.trainjob import JobRef, render_pod

# --- the Pod Security Standards, as https://kubernetes.io/docs/concepts/security/pod-security-standards/
# lists them for Linux pods (the checks a pod of ours could trip) -----------------------------

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    return [*(spec.get("initContainers") or []), *spec["containers"]]


def baseline_violations(pod: dict[str, Any]) -> list[str]:
    spec = pod["spec"]
    found = [f"spec.{h}" for h in ("hostNetwork", "hostPID", "hostIPC") if spec.get(h)]
    found += [f"volume {v['name']}: hostPath" for v in spec.get("volumes") or [] if "hostPath" in v]
    pod_sc = spec.get("securityContext") or {}
    if (pod_sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        found.append("pod seccomp Unconfined")
    for c in _containers(pod):
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            found.append(f"{c['name']}: privileged")
        extra = set((sc.get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES
        if extra:
            found.append(f"{c['name']}: capabilities {sorted(extra)}")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            found.append(f"{c['name']}: hostPort")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            found.append(f"{c['name']}: seccomp Unconfined")
        if sc.get("procMount") not in (None, "Default"):
            found.append(f"{c['name']}: procMount")
    return found


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    spec = pod["spec"]
    found = baseline_violations(pod)
    for v in spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {v['name']}: {sorted(kinds - RESTRICTED_VOLUMES)}")
    pod_sc = spec.get("securityContext") or {}
    if pod_sc.get("runAsUser") == 0:
        found.append("pod runAsUser 0")
    for c in _containers(pod):
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{c['name']}: allowPrivilegeEscalation not false")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            found.append(f"{c['name']}: runAsNonRoot not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            found.append(f"{c['name']}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{c['name']}: seccomp {seccomp}")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            found.append(f"{c['name']}: capabilities not dropped")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"{c['name']}: capabilities added")
    return found


def pss_violations(pod: dict[str, Any], level: str) -> list[str]:
    return {
        "restricted": restricted_violations,
        "baseline": baseline_violations,
        "privileged": lambda _: [],
    }[level](pod)


def below(level: str) -> str | None:
    i = POD_SECURITY_LEVELS.index(level)
    return POD_SECURITY_LEVELS[i - 1] if i else None


# --- what each level unlocks, with the use case --------------------------------------------


def trainer(**security: Any) -> dict[str, Any]:
    return {"containers": [{"name": "trainer", "securityContext": security}]}


RDMA = {
    "hostNetwork": True,
    "securityContext": {"runAsUser": 0},
    "volumes": [{"name": "ib", "hostPath": {"path": "/dev/infiniband", "type": "Directory"}}],
    "containers": [
        {
            "name": "trainer",
            "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}},
            "volumeMounts": [{"name": "ib", "mountPath": "/dev/infiniband"}],
        }
    ],
}
CASES = {
    # A web port below 1024 is fine for anyone (restricted allows NET_BIND_SERVICE).
    "bind-low-port": ("restricted", trainer(capabilities={"add": ["NET_BIND_SERVICE"]})),
    # Vendor images that must run as root (NGC containers, pip install at start).
    "root-image": ("baseline", {"securityContext": {"runAsUser": 0}}),
    # A dataset on a filer, mounted without a PersistentVolume.
    "nfs-dataset": (
        "baseline",
        {"volumes": [{"name": "data", "nfs": {"server": "filer", "path": "/datasets"}}]},
    ),
    "chown-capability": ("baseline", trainer(capabilities={"add": ["CHOWN", "SETUID"]})),
    "setuid-binaries": ("baseline", trainer(allowPrivilegeEscalation=True)),
    # InfiniBand/RoCE: locked memory for RDMA, the HCA devices, the host's network.
    "rdma": ("privileged", RDMA),
    "privileged-container": ("privileged", trainer(privileged=True)),
}


def job_with(template_spec: dict[str, Any]) -> LLMTrainJobSpec:
    return make_job(nodes=2, podTemplate={"spec": template_spec}).build()


def ref_at(level: str) -> JobRef:
    return JobRef("gpt", "ml", "uid-1", level)  # type: ignore[arg-type]


@pytest.mark.parametrize("level", POD_SECURITY_LEVELS)
def test_a_plain_job_renders_the_same_restricted_pod_at_every_level(level: str) -> None:
    """The level only unlocks what a template asks for; it never loosens the defaults."""
    spec = make_job(nodes=2).build()
    pod = render_pod(ref_at(level), spec, 1, 1)
    assert pod == render_pod(JobRef("gpt", "ml", "uid-1"), spec, 1, 1)
    assert restricted_violations(pod) == []


@pytest.mark.parametrize(("needed", "template"), CASES.values(), ids=CASES)
def test_each_unlocked_field_is_refused_below_its_level_and_allowed_from_it(
    needed: str, template: dict[str, Any]
) -> None:
    overlay = job_with(template).pod_template
    for level in POD_SECURITY_LEVELS:
        found = refused(overlay, level)
        allowed = POD_SECURITY_LEVELS.index(level) >= POD_SECURITY_LEVELS.index(needed)
        assert (found == []) is allowed, (level, found)
        # The highest level any refused field needs is the one the case names.
        assert max((POD_SECURITY_LEVELS.index(r.level) for r in found), default=None) == (
            None if allowed else POD_SECURITY_LEVELS.index(needed)
        )


@pytest.mark.parametrize(("needed", "template"), CASES.values(), ids=CASES)
def test_pods_rendered_at_the_needed_level_meet_it_and_carry_the_field(
    needed: str, template: dict[str, Any]
) -> None:
    spec = job_with(template)
    pod = render_pod(ref_at(needed), spec, 1, 1)
    assert pss_violations(pod, needed) == []
    lower = below(needed)
    if lower is not None:
        # The unlocked field made it into the pod: the level below would refuse this pod.
        assert pss_violations(pod, lower) != []


@pytest.mark.parametrize(("needed", "template"), CASES.values(), ids=CASES)
def test_below_the_level_the_renderer_reimposes_restricted(
    needed: str, template: dict[str, Any]
) -> None:
    """The second line: a template that reached the renderer anyway yields restricted pods."""
    spec = job_with(template)
    pod = render_pod(ref_at("restricted"), spec, 1, 1)
    assert restricted_violations(pod) == []


def test_an_rdma_job_in_a_privileged_namespace_gets_exactly_what_it_asked_for() -> None:
    spec = job_with(RDMA)
    plain = render_pod(ref_at("restricted"), job_with({}), 1, 1)
    pod = render_pod(ref_at("privileged"), spec, 1, 1)

    want = copy.deepcopy(plain)
    want["spec"]["securityContext"] = {
        **plain["spec"]["securityContext"], "runAsUser": 0, "runAsNonRoot": False,
    }  # fmt: skip
    [container] = want["spec"]["containers"]
    container["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]},
        "runAsNonRoot": False,
    }
    container["volumeMounts"] = [
        *container["volumeMounts"], {"name": "ib", "mountPath": "/dev/infiniband"},
    ]  # fmt: skip
    want["spec"]["volumes"] = [
        *plain["spec"]["volumes"],
        {"name": "ib", "hostPath": {"path": "/dev/infiniband", "type": "Directory"}},
    ]
    want["spec"]["hostNetwork"] = True
    # Rank addresses are cluster DNS names: a host-network pod needs this policy to resolve them.
    want["spec"]["dnsPolicy"] = "ClusterFirstWithHostNet"
    assert pod == want


def test_a_privileged_container_may_escalate_as_the_pod_api_requires() -> None:
    pod = render_pod(ref_at("privileged"), job_with(trainer(privileged=True)), 0, 1)
    security = pod["spec"]["containers"][0]["securityContext"]
    # The pod API refuses allowPrivilegeEscalation: false beside privileged: true.
    assert security == {
        "allowPrivilegeEscalation": True,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "privileged": True,
    }


def test_baseline_keeps_root_and_nfs_but_not_the_host_network_or_a_host_path() -> None:
    spec = job_with({**RDMA, "volumes": [*RDMA["volumes"], CASES["nfs-dataset"][1]["volumes"][0]]})
    pod = render_pod(ref_at("baseline"), spec, 0, 1)
    assert baseline_violations(pod) == []
    assert pod["spec"]["securityContext"]["runAsUser"] == 0
    assert [v["name"] for v in pod["spec"]["volumes"]][-1] == "data"
    assert "ib" not in [v["name"] for v in pod["spec"]["volumes"]]
    assert "hostNetwork" not in pod["spec"]
    assert "add" not in pod["spec"]["containers"][0]["securityContext"]["capabilities"]


@pytest.mark.parametrize("level", POD_SECURITY_LEVELS)
def test_inference_pods_follow_their_namespace_level(level: str) -> None:
    template = {
        "spec": {
            "securityContext": {"runAsUser": 0},
            "containers": [
                {"name": "server", "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}}}
            ],
        }
    }
    spec = make_service(podTemplate=template)
    pod = render_group_pod(ServiceRef("chat", "ml", "uid-9", level), spec, TINY, 0, 0, "r1")  # type: ignore[arg-type]
    assert pss_violations(pod, level) == []
    added = pod["spec"]["containers"][0]["securityContext"]["capabilities"].get("add")
    assert added == (["IPC_LOCK"] if level == "privileged" else None)
    assert (pod["spec"]["securityContext"]["runAsUser"] == 0) is (level != "restricted")
    at = "spec.podTemplate.spec"
    assert [r.field for r in refused(spec.pod_template, level)] == {
        "restricted": [
            f"{at}.securityContext.runAsUser",
            f"{at}.containers[0].securityContext.capabilities.add[0]",
        ],
        "baseline": [f"{at}.containers[0].securityContext.capabilities.add[0]"],
        "privileged": [],
    }[level]


# --- the namespace label and the refusal ---------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "level"),
    [
        (None, "restricted"),
        ({}, "restricted"),
        ({POD_SECURITY_LABEL: "baseline"}, "baseline"),
        ({POD_SECURITY_LABEL: "privileged"}, "privileged"),
        # A typo never widens what pods may do.
        ({POD_SECURITY_LABEL: "Privileged"}, "restricted"),
        # Pod Security Admission's own label is the cluster's enforcement, not our opt-out.
        ({"pod-security.kubernetes.io/enforce": "privileged"}, "restricted"),
    ],
    ids=["no-labels", "unlabelled", "baseline", "privileged", "typo", "psa-label-only"],
)
def test_a_namespace_level_comes_from_its_label(labels: dict[str, str] | None, level: str) -> None:
    assert level_of(labels) == level


def test_the_refusal_names_the_fields_the_namespace_and_the_label_to_set() -> None:
    overlay = job_with(RDMA).pod_template
    message = refusal_message("team-a", "baseline", refused(overlay, "baseline"))
    assert message == (
        "Namespace team-a is at pod security level baseline (label phalanx.dev/pod-security): "
        "spec.podTemplate.spec.hostNetwork: sharing the node's network needs pod security "
        "level privileged, and the namespace allows baseline; a cluster admin can label the "
        "namespace phalanx.dev/pod-security=privileged, or remove the field; "
        "spec.podTemplate.spec.volumes[0].hostPath: a hostPath volume needs pod security level "
        "privileged, and the namespace allows baseline; a cluster admin can label the namespace "
        "phalanx.dev/pod-security=privileged, or remove the field; "
        "spec.podTemplate.spec.containers[0].securityContext.capabilities.add[0]: the "
        "capability IPC_LOCK needs pod security level privileged, and the namespace allows "
        "baseline; a cluster admin can label the namespace phalanx.dev/pod-security=privileged, "
        "or remove the field. No pods were created."
    )


# --- phalanx validate --pod-security --------------------------------------------------------


def rdma_manifest() -> dict[str, Any]:
    return make_job("rdma", nodes=2, podTemplate={"spec": RDMA}).manifest()


def test_the_api_admits_the_typed_fields_and_validate_refuses_them_below_the_level() -> None:
    manifest = rdma_manifest()
    assert validate_object(manifest) == []  # what the API server says (CEL cannot see labels)
    assert validate_object(manifest, "privileged") == []
    errors = validate_object(manifest, "restricted")
    assert [e.path for e in errors] == [
        "spec.podTemplate.spec.securityContext.runAsUser",
        "spec.podTemplate.spec.hostNetwork",
        "spec.podTemplate.spec.volumes[0].hostPath",
        "spec.podTemplate.spec.containers[0].securityContext.capabilities.add[0]",
    ]
    # The offline check says what the operator's condition says, field by field.
    overlay = LLMTrainJobSpec.model_validate(manifest["spec"]).pod_template
    condition = refusal_message("ml", "restricted", refused(overlay, "restricted"))
    for error in errors:
        assert str(error) in condition


@pytest.mark.parametrize(
    ("args", "code"),
    [([], 1), (["--pod-security", "baseline"], 1), (["--pod-security", "privileged"], 0)],
    ids=["default-restricted", "baseline", "privileged"],
)
def test_cli_validate_pod_security(tmp_path: Path, args: list[str], code: int) -> None:
    path = tmp_path / "rdma.yaml"
    path.write_text(yaml.safe_dump(rdma_manifest()), encoding="utf-8")
    result = CliRunner().invoke(app, ["validate", str(path), *args])
    assert result.exit_code == code, result.output
    if code:
        assert (
            "spec.podTemplate.spec.hostNetwork: sharing the node's network needs pod security "
            "level privileged" in result.output
        )
        assert f"{POD_SECURITY_LABEL}=privileged" in result.output
    else:
        assert "LLMTrainJob/rdma valid" in result.output


def test_cli_validate_refuses_an_unknown_level(tmp_path: Path) -> None:
    path = tmp_path / "rdma.yaml"
    path.write_text(yaml.safe_dump(rdma_manifest()), encoding="utf-8")
    result = CliRunner().invoke(app, ["validate", str(path), "--pod-security", "root"])
    assert result.exit_code == 2
    assert "--pod-security" in result.output


def test_cli_render_at_a_level_renders_its_pods(tmp_path: Path) -> None:
    path = tmp_path / "rdma.yaml"
    path.write_text(yaml.safe_dump(rdma_manifest()), encoding="utf-8")
    refused_here = CliRunner().invoke(app, ["render", str(path)])
    assert refused_here.exit_code == 1
    assert "spec.podTemplate.spec.hostNetwork" in refused_here.output
    result = CliRunner().invoke(app, ["render", str(path), "--pod-security", "privileged"])
    assert result.exit_code == 0, result.output
    pods = [d for d in yaml.safe_load_all(result.output) if d["kind"] == "Pod"]
    assert [p["spec"]["hostNetwork"] for p in pods] == [True, True]
