"""What pods, Service, claim and rank table does a job get? Rendering is pure: compare objects."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from builders import make_job

from phalanx.constants import GANG_GATE, RESERVED_ENV
from phalanx.render.hccl import DEVICE_ANNOTATION, rank_table
from phalanx.render.overlay import merge
from phalanx.render.trainjob import (
    JobRef,
    render_checkpoint_claim,
    render_pod,
    render_pod_group,
    render_pods,
    render_service,
)

REF = JobRef("gpt", "ml", "uid-1")
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<ref>") for e in pod["spec"]["containers"][0]["env"]}


def test_four_node_nccl_job_env_contract() -> None:
    spec = make_job(
        nodes=4, communication={"nccl": {"socketIfname": "eth0", "ibHca": "mlx5", "debug": "WARN"}}
    ).build()
    pods = render_pods(REF, spec, generation=2)
    assert [p["metadata"]["name"] for p in pods] == ["gpt-0", "gpt-1", "gpt-2", "gpt-3"]
    env = env_of(pods[2])
    assert {
        k: env[k]
        for k in (
            "PET_NNODES",
            "PET_NPROC_PER_NODE",
            "PET_NODE_RANK",
            "PET_MASTER_ADDR",
            "PET_MASTER_PORT",
        )
    } == {
        "PET_NNODES": "4",
        "PET_NPROC_PER_NODE": "8",
        "PET_NODE_RANK": "2",
        "PET_MASTER_ADDR": "gpt-0.gpt.ml.svc",
        "PET_MASTER_PORT": "29500",
    }
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["NNODES"], env["NODE_RANK"]) == (
        "gpt-0.gpt.ml.svc",
        "29500",
        "4",
        "2",
    )
    assert (env["PHALANX_JOB"], env["PHALANX_RESTART"], env["PHALANX_CHECKPOINT_DIR"]) == (
        "gpt",
        "1",
        "/checkpoints",
    )
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert (env["NCCL_SOCKET_IFNAME"], env["NCCL_IB_HCA"], env["NCCL_DEBUG"]) == (
        "eth0",
        "mlx5",
        "WARN",
    )
    assert "NCCL_ALGO" not in env


def test_pod_shape_gate_dns_resources_and_security() -> None:
    pod = render_pod(REF, make_job(nodes=2).build(), rank=1, generation=1)
    spec = pod["spec"]
    assert spec["schedulingGates"] == [{"name": GANG_GATE}]
    assert (spec["hostname"], spec["subdomain"], spec["restartPolicy"]) == ("gpt-1", "gpt", "Never")
    assert spec["terminationGracePeriodSeconds"] >= 300
    container = spec["containers"][0]
    assert container["resources"] == {
        "requests": {"nvidia.com/gpu": "8"},
        "limits": {"nvidia.com/gpu": "8"},
    }
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert pod["metadata"]["labels"]["phalanx.dev/rank"] == "1"
    assert pod["metadata"]["labels"]["phalanx.dev/generation"] == "1"
    assert pod["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "phalanx"
    owner = pod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("LLMTrainJob", "uid-1", True)
    assert container["command"] == ["torchrun", "-m", "phalanx_trainer"]
    # The default accelerator is NVIDIA: the trainer must find CUDA or fail, never use the CPU.
    assert container["args"][:6] == ["--device", "cuda", "--preset", "nano", "--steps", "1000"]


@pytest.mark.parametrize(
    ("scheduler", "gates", "scheduler_name", "labels"),
    [
        ("builtin", True, None, {}),
        ("none", False, None, {}),
        (
            "coscheduling",
            False,
            "scheduler-plugins-scheduler",
            {"scheduling.x-k8s.io/pod-group": "gpt"},
        ),
        ("volcano", False, "volcano", {}),
    ],
    ids=["builtin", "none", "coscheduling", "volcano"],
)
def test_gang_scheduler_wiring(
    scheduler: str, gates: bool, scheduler_name: str | None, labels: dict[str, str]
) -> None:
    spec = make_job(nodes=2, runPolicy={"gangScheduler": scheduler}).build()
    pod = render_pod(REF, spec, 0, 1)
    assert ("schedulingGates" in pod["spec"]) is gates
    assert pod["spec"].get("schedulerName") == scheduler_name
    for key, value in labels.items():
        assert pod["metadata"]["labels"][key] == value
    group = render_pod_group(REF, spec)
    assert (group is not None) is (scheduler in ("volcano", "coscheduling"))
    if group is not None:
        assert group["spec"]["minMember"] == 2


def test_cpu_job_has_no_accelerator_and_uses_gloo() -> None:
    spec = make_job(nodes=2).accelerator(type="cpu", cpu="2", memory="4Gi").build()
    pod = render_pod(REF, spec, 0, 1)
    assert pod["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"memory": "4Gi"},
    }
    assert "tolerations" not in pod["spec"]
    env = env_of(pod)
    assert env["PET_NPROC_PER_NODE"] == "1"
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in env


def test_checkpoint_volume_claim_and_mount() -> None:
    spec = make_job(
        checkpoint={"size": "50Gi", "storageClassName": "fast", "mountPath": "/ckpt"}
    ).build()
    pod = render_pod(REF, spec, 0, 1)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["checkpoint"]["persistentVolumeClaim"] == {"claimName": "gpt-checkpoint"}
    assert {"name": "checkpoint", "mountPath": "/ckpt"} in pod["spec"]["containers"][0][
        "volumeMounts"
    ]
    claim = render_checkpoint_claim(REF, spec)
    assert claim is not None
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "50Gi"}},
        "storageClassName": "fast",
    }
    existing = make_job(checkpoint={"existingClaim": "shared"}).build()
    assert render_checkpoint_claim(REF, existing) is None
    assert render_pod(REF, existing, 0, 1)["spec"]["volumes"][0]["persistentVolumeClaim"] == {
        "claimName": "shared"
    }


def test_headless_service_publishes_not_ready_addresses() -> None:
    service = render_service(REF, make_job().build())
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"phalanx.dev/job": "gpt"}


def test_overlay_merges_and_cannot_detach_the_gang() -> None:
    spec = make_job(
        podTemplate={
            "metadata": {"labels": {"team": "llm", "phalanx.dev/job": "other"}},
            "spec": {
                "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                "nodeSelector": {"pool": "a"},
                "containers": [{"name": "trainer", "env": [{"name": "EXTRA", "value": "1"}]}],
            },
        }
    ).build()
    pod = render_pod(REF, spec, 0, 1)
    assert pod["metadata"]["labels"]["team"] == "llm"
    assert pod["metadata"]["labels"]["phalanx.dev/job"] == "gpt"
    assert len(pod["spec"]["tolerations"]) == 2
    assert pod["spec"]["nodeSelector"] == {"pool": "a"}
    env = env_of(pod)
    assert env["EXTRA"] == "1"
    assert env["PET_NODE_RANK"] == "0"


@pytest.mark.parametrize(
    ("base", "overlay", "expected"),
    [
        ({"a": {"b": 1}}, {"a": {"c": 2}}, {"a": {"b": 1, "c": 2}}),
        (
            {"containers": [{"name": "x", "image": "a"}]},
            {"containers": [{"name": "x", "image": "b"}, {"name": "y"}]},
            {"containers": [{"name": "x", "image": "b"}, {"name": "y"}]},
        ),
        ({"args": [1, 2]}, {"args": [3]}, {"args": [3]}),
    ],
    ids=["deep-map", "containers-by-name", "plain-list-replaced"],
)
def test_merge(base: dict[str, Any], overlay: dict[str, Any], expected: dict[str, Any]) -> None:
    assert merge(base, overlay) == expected


def test_user_env_follows_ours_and_reserved_names_are_ours() -> None:
    spec = make_job(env=[{"name": "WANDB_MODE", "value": "offline"}]).build()
    names = [e["name"] for e in render_pod(REF, spec, 0, 1)["spec"]["containers"][0]["env"]]
    assert names[-1] == "WANDB_MODE"
    assert {"PET_NNODES", "PHALANX_RESTART"} <= set(names) <= set(names) | set(RESERVED_ENV)


def ascend_pod(rank: int, devices: int) -> dict[str, Any]:
    annotation = {
        "pod_name": f"a-{rank}",
        "server_id": f"10.0.0.{rank}",
        "devices": [
            {"device_id": str(i), "device_ip": f"192.168.{rank}.{i}"} for i in range(devices)
        ],
    }
    return {
        "metadata": {
            "name": f"a-{rank}",
            "annotations": {DEVICE_ANNOTATION: json.dumps(annotation)},
        },
        "status": {"hostIP": f"10.0.0.{rank}", "podIP": f"10.1.0.{rank}"},
    }


def test_hccl_rank_table_completed_with_global_rank_ids() -> None:
    table = rank_table([ascend_pod(0, 8), ascend_pod(1, 8)], devices_per_pod=8)
    assert table["status"] == "completed"
    assert table["server_count"] == "2"
    second = table["server_list"][1]
    assert second["server_id"] == "10.0.0.1"
    assert [d["rank_id"] for d in second["device"]] == [str(8 + i) for i in range(8)]
    assert second["device"][3] == {"device_id": "3", "device_ip": "192.168.1.3", "rank_id": "11"}


@pytest.mark.parametrize(
    "pods",
    [
        [ascend_pod(0, 8), None],
        [ascend_pod(0, 8), {"metadata": {"name": "a-1"}}],
        [ascend_pod(0, 8), ascend_pod(1, 4)],
    ],
    ids=["pod-missing", "annotation-missing", "wrong-device-count"],
)
def test_hccl_rank_table_initializing_until_every_device_known(pods: list[Any]) -> None:
    assert rank_table(pods, 8)["status"] == "initializing"


def test_hccl_job_mounts_rank_table_and_sets_env() -> None:
    spec = (
        make_job(nodes=2, communication={"hccl": {"ifIp": "10.9.9.9"}})
        .accelerator(type="ascend")
        .build()
    )
    pod = render_pod(REF, spec, 1, 1)
    env = env_of(pod)
    assert env["RANK_TABLE_FILE"] == "/etc/phalanx/hccl/hccl.json"
    assert (env["HCCL_CONNECT_TIMEOUT"], env["HCCL_IF_IP"]) == ("1800", "10.9.9.9")
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {"huawei.com/Ascend910": "8"}
    assert {"name": "hccl", "configMap": {"name": "gpt-hccl"}} in pod["spec"]["volumes"]


def test_trainer_container_carries_the_termination_contract() -> None:
    pod = render_pod(REF, make_job(nodes=1).build(), 0, 1)
    container = pod["spec"]["containers"][0]
    assert (container["terminationMessagePath"], container["terminationMessagePolicy"]) == (
        "/dev/termination-log",
        "File",
    )
    assert env_of(pod)["PHALANX_TERMINATION_LOG"] == "/dev/termination-log"
    assert "PHALANX_TERMINATION_LOG" in RESERVED_ENV


def test_phalanx_render_and_the_operator_share_one_list_of_children() -> None:
    from phalanx.plan.trainjob import World, plan_trainjob
    from phalanx.render.trainjob import render_children, render_job_objects

    manifest = make_job("npu", nodes=2, accelerator={"type": "ascend", "perNode": 8}).manifest()
    printed = render_job_objects(manifest)
    assert [(o["kind"], o["metadata"]["name"]) for o in printed] == [
        ("Service", "npu"),
        ("PersistentVolumeClaim", "npu-checkpoint"),
        ("ConfigMap", "npu-hccl"),
        ("Pod", "npu-0"),
        ("Pod", "npu-1"),
    ]
    ref = JobRef("npu", "ml", "uid-1")
    spec = make_job("npu", nodes=2, accelerator={"type": "ascend", "perNode": 8}).build()
    plan = plan_trainjob(ref, spec, 1, {}, World([], frozenset()), NOW)
    assert plan.children == render_children(ref, spec) == printed[:3]
    table = json.loads(plan.children[2]["data"]["hccl.json"])
    assert table == {
        "status": "initializing",
        "version": "1.0",
        "server_count": "0",
        "server_list": [],
    }


@pytest.mark.parametrize(
    ("accelerator", "device"),
    [("nvidia", "cuda"), ("ascend", "npu"), ("cpu", "cpu")],
)
def test_the_trainer_is_told_the_device_the_pod_was_given(accelerator: str, device: str) -> None:
    from phalanx.api.trainjob import LLMTrainJobSpec
    from phalanx.render.trainjob import trainer_args

    spec = LLMTrainJobSpec.model_validate({"accelerator": {"type": accelerator}})
    args = trainer_args(spec)
    assert args[args.index("--device") + 1] == device


def test_an_overlay_that_got_past_the_api_cannot_break_the_pod_invariants() -> None:
    """The renderer re-imposes what the API's allow-list promises, whatever reaches it."""
    from phalanx.render.overlay import merge as merge_overlay
    from phalanx.render.pod import enforce_invariants

    spec = make_job(nodes=2).build()
    rendered = render_pod(REF, spec, 1, 1)
    hostile = {
        "hostNetwork": True,
        "hostPID": True,
        "serviceAccountName": "admin",
        "schedulingGates": [],
        "nodeName": "n-7",
        "securityContext": {"runAsUser": 0, "runAsNonRoot": False, "fsGroup": 2000},
        "automountServiceAccountToken": True,
        "volumes": [
            {"name": "root", "hostPath": {"path": "/"}},
            {"name": "checkpoint", "hostPath": {"path": "/var"}},
            {"name": "shards", "persistentVolumeClaim": {"claimName": "shards"}},
        ],
        "containers": [
            {
                "name": "trainer",
                "image": "evil",
                "securityContext": {"privileged": True},
                "env": [
                    {"name": "MASTER_ADDR", "value": "evil"},
                    {"name": "HF_HOME", "value": "/x"},
                ],
                "resources": {"limits": {"nvidia.com/gpu": "0", "cpu": "4"}},
            },
            {"name": "sidecar", "image": "evil"},
        ],
    }
    merged = {**rendered, "spec": merge_overlay(rendered["spec"], hostile)}

    pod = enforce_invariants(merged, rendered, rendered["metadata"]["labels"])

    spec_out = pod["spec"]
    for field in ("hostNetwork", "hostPID", "serviceAccountName", "nodeName"):
        assert field not in spec_out, field
    assert spec_out["schedulingGates"] == [{"name": GANG_GATE}]
    assert spec_out["securityContext"] == {**rendered["spec"]["securityContext"], "fsGroup": 2000}
    assert spec_out["automountServiceAccountToken"] is True  # allowed: asked for explicitly
    assert [v["name"] for v in spec_out["volumes"]] == ["checkpoint", "dshm", "shards"]
    assert spec_out["volumes"][0] == rendered["spec"]["volumes"][0]
    [trainer] = spec_out["containers"]
    assert trainer["image"] == rendered["spec"]["containers"][0]["image"]
    assert trainer["securityContext"] == rendered["spec"]["containers"][0]["securityContext"]
    env = env_of(pod)
    assert env["MASTER_ADDR"] == "gpt-0.gpt.ml.svc"
    assert env["HF_HOME"] == "/x"
    assert trainer["resources"]["limits"] == {"nvidia.com/gpu": "8", "cpu": "4"}


def test_workload_pods_do_not_mount_the_service_account_token_unless_asked() -> None:
    assert (
        render_pod(REF, make_job().build(), 0, 1)["spec"]["automountServiceAccountToken"] is False
    )
    asked = make_job(podTemplate={"spec": {"automountServiceAccountToken": True}}).build()
    assert render_pod(REF, asked, 0, 1)["spec"]["automountServiceAccountToken"] is True


@pytest.mark.parametrize(
    ("data", "mount", "flag"),
    [
        ("shards/web", "/checkpoints", "/checkpoints/shards/web"),
        ("shards", "/mnt/ckpt", "/mnt/ckpt/shards"),
        ("/datasets/web", "/checkpoints", "/datasets/web"),
        ("builtin", "/checkpoints", None),
    ],
    ids=["relative", "relative-custom-mount", "absolute", "builtin"],
)
def test_trainer_data_is_resolved_under_the_checkpoint_volume(
    data: str, mount: str, flag: str | None
) -> None:
    spec = make_job(trainer={"data": data}, checkpoint={"mountPath": mount}).build()
    args = render_pod(REF, spec, 0, 1)["spec"]["containers"][0]["args"]
    given = args[args.index("--data") + 1] if "--data" in args else None
    assert given == flag
