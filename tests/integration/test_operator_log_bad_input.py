"""Specs the API server accepts but that cannot run, side by side under one operator: each gets
a condition saying why, and the operator's log carries no traceback for any of them (a
traceback is a crash of a reconcile the operator did not expect, however it recovers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jobkit import BAD_AFFINITY, GPU_1, GPU_NODE, Jobs, Services

from phalanx.constants import Reason
from phalanx.devcluster.testing import Kubectl

# A pod template only a privileged namespace may run (this one is restricted, the default).
ROOT = {"spec": {"securityContext": {"runAsUser": 0}}}


def test_accepted_specs_that_cannot_run_get_conditions_and_no_traceback(
    kubectl: Kubectl, namespace: str, run_operator: Callable[..., Any]
) -> None:
    jobs, services = Jobs(kubectl, namespace), Services(kubectl, namespace)
    with run_operator() as runner:
        jobs.apply(
            "refused",
            nodes=2,
            accelerator=GPU_NODE,
            podTemplate={"spec": {"affinity": BAD_AFFINITY}},
        )
        jobs.apply("huge", nodes=500, accelerator=GPU_NODE, topology={"required": "rack"})
        jobs.apply("nolevel", nodes=1, accelerator=GPU_NODE, topology={"required": "superpod"})
        jobs.apply("root", nodes=1, accelerator=GPU_NODE, podTemplate=ROOT)
        services.apply("noclaim", model={"claim": {"name": "missing"}}, accelerator=GPU_1)
        services.apply("nojob", model={"fromTrainJob": {"name": "missing"}}, accelerator=GPU_1)
        services.apply(
            "nofit",
            nodesPerReplica=2,
            accelerator={"type": "nvidia", "perNode": 8},
            topology={"required": "host"},
        )
        services.apply(
            "refusedsvc", accelerator=GPU_1, podTemplate={"spec": {"affinity": BAD_AFFINITY}}
        )
        for name, reason in (
            ("refused", Reason.POD_CREATE_REJECTED),
            ("huge", Reason.GANG_EXCEEDS_DOMAIN_CAPACITY),
            ("nolevel", Reason.UNKNOWN_TOPOLOGY_LEVEL),
            ("root", Reason.POD_SECURITY_LEVEL),
        ):
            condition = jobs.wait_condition(name, "Admitted", "False", reason, timeout=60)
            assert condition["message"], (name, condition)
        for name, reason in (
            ("noclaim", Reason.CLAIM_NOT_FOUND),
            ("nojob", Reason.TRAIN_JOB_NOT_FOUND),
            ("nofit", Reason.GANG_EXCEEDS_DOMAIN_CAPACITY),
            ("refusedsvc", Reason.POD_CREATE_REJECTED),
        ):
            condition = services.wait_condition(name, "Ready", "False", reason, timeout=60)
            assert condition["message"], (name, condition)
    assert "phalanx operator started" in runner.output, runner.output[-2000:]
    assert "Traceback" not in runner.output, runner.output[-6000:]
