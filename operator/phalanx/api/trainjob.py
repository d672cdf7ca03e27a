"""LLMTrainJob: a gang of pods running one distributed training run."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, TypedDict

from pydantic import Field, StringConstraints

from phalanx.constants import DEFAULT_MASTER_PORT, DEFAULT_METRICS_PORT, TRAINER_IMAGE

from .base import ApiModel, Rule, section
from .common import (
    Accelerator,
    ConditionList,
    DnsName,
    EnvList,
    PositiveQuantity,
    Topology,
    TrainerPodTemplate,
    conditions_field,
    env_field,
    reserved_env_rule,
)

Str = Annotated[str, StringConstraints(max_length=4096)]
ArgList = Annotated[list[Str], Field(max_length=256)]
AccessMode = Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod", "ReadOnlyMany"]


class TrainerSettings(ApiModel):
    """Settings for the Phalanx trainer image, turned into its command-line flags.

    Ignored when `command` or `args` are given.
    """

    checks = (
        Rule(
            cel="!has(self.tensorParallel) || self.tensorParallel == 1 || (has(self.parallelism) && self.parallelism == 'fsdp')",
            message="trainer.tensorParallel > 1 composes with FSDP2: set trainer.parallelism to fsdp.",
            field=".tensorParallel",
            check=lambda m: m.tensor_parallel == 1 or m.parallelism == "fsdp",
        ),
    )

    preset: Literal["nano", "gpt2-small", "1b"] = Field(
        default="nano", description="Model size preset of the built-in decoder-only transformer."
    )
    steps: int = Field(default=1000, ge=1, le=10_000_000, description="Optimizer steps to run.")
    batch_size: int = Field(
        default=8, ge=1, le=4096, description="Micro-batch size per process (sequences)."
    )
    seq_len: int = Field(default=256, ge=8, le=131072, description="Tokens per sequence.")
    grad_accum: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step."
    )
    learning_rate: float = Field(default=3e-4, ge=0, le=1, description="Peak AdamW learning rate.")
    parallelism: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="ddp replicates the model; fsdp shards it (FSDP2)."
    )
    tensor_parallel: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Tensor-parallel degree (needs parallelism fsdp): the trainer splits every block "
            "over this many consecutive ranks of one pod and shards over the rest, a mesh of "
            "(nodes x processesPerNode / tensorParallel) x tensorParallel. It must divide "
            "processesPerNode and the model's heads, kv heads and ffn size."
        ),
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto uses bf16 on GPUs and fp32 on CPUs."
    )
    compile: bool = Field(default=False, description="Compile the model with torch.compile.")
    data: Str = Field(
        default="builtin",
        description=(
            "Prepared token-shard directory (phalanx-data prepare): a relative path is under the "
            "checkpoint volume (checkpoint.mountPath), an absolute one is used as is; `builtin` "
            "for the shipped corpus."
        ),
    )
    checkpoint_every: int = Field(
        default=100, ge=1, le=10_000_000, description="Save a checkpoint every N steps."
    )
    export_every: int = Field(
        default=0,
        ge=0,
        le=10_000_000,
        description=(
            "Also export a servable model to exports/step-N every N steps (0: only the final "
            "export); an InferenceService serves one with model.fromTrainJob.step."
        ),
    )
    extra_args: ArgList = Field(
        default_factory=list, description="Extra flags appended to the trainer command line."
    )
    metrics_port: int = Field(
        default=DEFAULT_METRICS_PORT,
        ge=1024,
        le=65535,
        description="Port of rank 0's /metrics and /progress endpoints (polled by the operator).",
    )


class NcclSettings(ApiModel):
    """NCCL tuning passed to every process as NCCL_* variables (NCCL_ALGO is never set)."""

    socket_ifname: Str | None = Field(
        default=None, description="NCCL_SOCKET_IFNAME: interfaces for bootstrap, e.g. eth0."
    )
    ib_hca: Str | None = Field(default=None, description="NCCL_IB_HCA: InfiniBand HCAs to use.")
    ib_gid_index: int | None = Field(
        default=None, ge=0, le=255, description="NCCL_IB_GID_INDEX (RoCE needs this)."
    )
    cross_nic: Literal[0, 1, 2] | None = Field(
        default=None, description="NCCL_CROSS_NIC: 0, 1 or 2."
    )
    net_gdr_level: Str | None = Field(default=None, description="NCCL_NET_GDR_LEVEL.")
    debug: Literal["VERSION", "WARN", "INFO", "TRACE"] | None = Field(
        default=None, description="NCCL_DEBUG verbosity."
    )


class HcclSettings(ApiModel):
    """HCCL settings for Ascend NPUs."""

    connect_timeout_seconds: int = Field(
        default=1800, ge=120, le=7200, description="HCCL_CONNECT_TIMEOUT in seconds."
    )
    if_ip: Str | None = Field(default=None, description="HCCL_IF_IP: the NIC address HCCL binds.")


class Communication(ApiModel):
    """How the ranks talk to each other."""

    checks = (
        Rule(
            cel="!has(self.backend) || self.backend != 'hccl' || !has(self.nccl)",
            message="communication.nccl is only valid with backend nccl; remove it or change the backend.",
            field=".nccl",
            check=lambda m: m.backend != "hccl" or m.nccl is None,
        ),
        reserved_env_rule(".env"),
    )

    backend: Literal["nccl", "hccl", "gloo"] | None = Field(
        default=None,
        description="Collective backend; defaults to nccl (nvidia), hccl (ascend) or gloo (cpu).",
    )
    master_port: int = Field(
        default=DEFAULT_MASTER_PORT, ge=1024, le=65535, description="Rendezvous port on rank 0."
    )
    nccl: NcclSettings | None = Field(default=None, description="NCCL settings.")
    hccl: HcclSettings | None = Field(default=None, description="HCCL settings.")
    env: EnvList = env_field("Extra communication variables (e.g. NCCL_* not modelled above).")


class Checkpoint(ApiModel):
    """The volume that holds checkpoints and the exported model, shared by every rank."""

    checks = (
        Rule(
            cel="!has(self.existingClaim) || !has(self.storageClassName)",
            message="checkpoint.storageClassName applies only to a claim Phalanx creates; remove it when existingClaim is set.",
            field=".storageClassName",
            check=lambda m: m.existing_claim is None or m.storage_class_name is None,
        ),
    )

    enabled: bool = Field(
        default=True, description="Mount a checkpoint volume (false: an emptyDir per pod)."
    )
    existing_claim: DnsName | None = Field(
        default=None, description="Use this PersistentVolumeClaim instead of creating one."
    )
    size: PositiveQuantity = Field(
        default="100Gi", description="Size of the claim Phalanx creates."
    )
    storage_class_name: DnsName | None = Field(
        default=None, description="StorageClass of the claim Phalanx creates."
    )
    access_modes: Annotated[
        list[AccessMode],
        Field(min_length=1, max_length=4),
    ] = Field(
        default_factory=lambda: list[AccessMode](["ReadWriteMany"]),
        description="Access modes; every rank writes its shard, so multi-node jobs need ReadWriteMany.",
    )
    mount_path: Annotated[str, StringConstraints(pattern=r"^/.*", max_length=1024)] = Field(
        default="/checkpoints", description="Where the volume is mounted ($PHALANX_CHECKPOINT_DIR)."
    )
    keep: int = Field(
        default=3, ge=1, le=1000, description="Newest checkpoints kept by the trainer."
    )


class FailureRule(ApiModel):
    """What to do when a rank's container ends with one of these exit codes or reasons."""

    checks = (
        Rule(
            cel="(has(self.onExitCodes) && size(self.onExitCodes) > 0) || (has(self.onReasons) && size(self.onReasons) > 0)",
            message="failurePolicy.rules[]: give onExitCodes or onReasons (or both).",
            check=lambda m: len(m.on_exit_codes) + len(m.on_reasons) > 0,
        ),
    )

    action: Literal["RestartGang", "FailJob", "Ignore"] = Field(
        description="RestartGang recreates every pod; FailJob fails the job at once; Ignore treats the rank as succeeded."
    )
    on_exit_codes: Annotated[list[Annotated[int, Field(ge=1, le=255)]], Field(max_length=64)] = (
        Field(default_factory=list, description="Container exit codes this rule matches.")
    )
    on_reasons: Annotated[
        list[Annotated[str, StringConstraints(max_length=64)]], Field(max_length=16)
    ] = Field(
        default_factory=list,
        description="Termination or pod reasons this rule matches, e.g. OOMKilled, Evicted, NodeLost.",
    )


class StragglerPolicy(ApiModel):
    """When a rank counts as a straggler, and what is done about it (docs/goodput.md)."""

    factor: float = Field(
        default=1.5,
        gt=1,
        le=100,
        description="A rank whose step time is above factor x the gang's median is slow.",
    )
    window_seconds: int = Field(
        default=300,
        ge=10,
        le=86400,
        description="A rank slow for this long is a straggler.",
    )
    action: Literal["Report", "Replace"] = Field(
        default="Report",
        description=(
            "Report: a Straggling condition, an event naming the node and a metric; Replace: "
            "also avoid the node and restart the gang from its newest checkpoint once the "
            "next checkpoint is written."
        ),
    )


class FailurePolicy(ApiModel):
    """How the gang reacts to failures."""

    max_restarts: int = Field(
        default=3, ge=0, le=1000, description="Gang restarts allowed before the job fails."
    )
    rules: Annotated[list[FailureRule], Field(max_length=32)] = Field(
        default_factory=list,
        description="Exit-code and reason rules, first match wins; unmatched failures restart the gang.",
    )
    gang_timeout_seconds: int = Field(
        default=300,
        ge=10,
        le=86400,
        description="A placed gang not fully running within this time is torn down and re-queued.",
    )
    node_lost_grace_seconds: int = Field(
        default=30,
        ge=0,
        le=3600,
        description=(
            "A rank whose node has been NotReady this long counts as lost (reason NodeLost) and "
            "its gang restarts; 0 reacts to the first NotReady."
        ),
    )
    hang_timeout_seconds: int | None = Field(
        default=None,
        ge=10,
        le=86400,
        description=(
            "A training gang whose step does not move for this long is restarted (reason "
            "Hang; failure rules match onReasons: [Hang]). Default: 10x the median time "
            "between observed steps, at least 300s, once three were timed."
        ),
    )
    stragglers: StragglerPolicy = section(StragglerPolicy, "Straggler detection.")
    spares: int = Field(
        default=0,
        ge=0,
        le=64,
        description=(
            "Room for this many more pods of the gang's shape (with one pod per node: whole "
            "nodes) kept free in the gang's domain while it runs, for its own recovery: the "
            "gang is admitted only where it fits with them, ordinary gangs keep off them, "
            "preemptible gangs may fill them and are preempted when the gang recovers. "
            "gangScheduler builtin only."
        ),
    )


class RunPolicy(ApiModel):
    """Scheduling and lifetime of the job."""

    checks = (
        Rule(
            cel="!has(self.queueName) || self.gangScheduler in ['kueue', 'volcano']",
            message="runPolicy.queueName is only used by gangScheduler kueue or volcano; remove it or change the scheduler.",
            field=".queueName",
            check=lambda m: m.queue_name is None or m.gang_scheduler in ("kueue", "volcano"),
        ),
    )

    suspend: bool = Field(
        default=False, description="Delete the pods but keep the checkpoint; false resumes."
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Fail the job (DeadlineExceeded) once it has been active this long, counted as a "
            "Job counts it: from the first admission of its gang (time queued for capacity is "
            "not counted), through restarts, and afresh after each resume from suspension."
        ),
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the finished job after this many seconds."
    )
    priority_class_name: DnsName | None = Field(
        default=None, description="PriorityClass of the pods."
    )
    priority: int = Field(
        default=0,
        ge=-1_000_000,
        le=1_000_000,
        description="Admission order among queued gangs: higher first, then oldest first.",
    )
    preemptible: bool = Field(
        default=False,
        description=(
            "The gang may run on the spare nodes the operator keeps for recovery (operator "
            "setting spares) and yields them when a recovering gang needs them: it is "
            "re-queued (reason Preempted), not failed, and no restart is counted."
        ),
    )
    gang_scheduler: Literal["builtin", "none", "volcano", "coscheduling", "kueue"] = Field(
        default="builtin",
        description=(
            "builtin: Phalanx places whole gangs; none: plain kube-scheduler (no gang guarantee); "
            "volcano, coscheduling, kueue: emit that system's objects and labels instead."
        ),
    )
    scheduler_name: DnsName | None = Field(
        default=None, description="schedulerName of the pods (defaults per gangScheduler)."
    )
    queue_name: DnsName | None = Field(
        default=None, description="Kueue LocalQueue or Volcano queue name."
    )


class LLMTrainJobSpec(ApiModel):
    """The desired training run."""

    checks = (
        reserved_env_rule(".env"),
        Rule(
            cel="self.accelerator.type != 'cpu' || !has(self.communication.backend) || self.communication.backend == 'gloo'",
            message="communication.backend must be gloo for accelerator.type cpu; remove it or set gloo.",
            field=".communication.backend",
            check=lambda m: (
                m.accelerator.type != "cpu" or m.communication.backend in (None, "gloo")
            ),
        ),
        Rule(
            cel="self.accelerator.type != 'ascend' || !has(self.communication.backend) || self.communication.backend != 'nccl'",
            message="communication.backend nccl cannot drive Ascend NPUs; use hccl (or leave it unset).",
            field=".communication.backend",
            check=lambda m: m.accelerator.type != "ascend" or m.communication.backend != "nccl",
        ),
        Rule(
            cel="self.accelerator.type != 'nvidia' || !has(self.communication.backend) || self.communication.backend != 'hccl'",
            message="communication.backend hccl needs accelerator.type ascend; use nccl for NVIDIA GPUs.",
            field=".communication.backend",
            check=lambda m: m.accelerator.type != "nvidia" or m.communication.backend != "hccl",
        ),
        Rule(
            cel="!has(self.processesPerNode) || self.accelerator.type == 'cpu' || self.processesPerNode <= self.accelerator.perNode",
            message="processesPerNode cannot exceed accelerator.perNode (one process per device); lower it.",
            field=".processesPerNode",
            check=lambda m: (
                m.processes_per_node is None
                or m.accelerator.type == "cpu"
                or m.processes_per_node <= m.accelerator.per_node
            ),
        ),
        Rule(
            cel=(
                "!(self.runPolicy.gangScheduler in ['none', 'volcano', 'coscheduling']) "
                "|| (!has(self.topology.required) && !has(self.topology.preferred))"
            ),
            message=(
                "topology.required and topology.preferred are honoured by gangScheduler builtin "
                "(Phalanx placement) and kueue (topology-aware scheduling) only; remove them or "
                "change runPolicy.gangScheduler."
            ),
            field=".topology",
            check=lambda m: (
                m.run_policy.gang_scheduler not in ("none", "volcano", "coscheduling")
                or (m.topology.required is None and m.topology.preferred is None)
            ),
        ),
        Rule(
            cel="self.runPolicy.gangScheduler == 'builtin' || self.failurePolicy.spares == 0",
            message=(
                "failurePolicy.spares is kept by gangScheduler builtin only (Phalanx placement); "
                "set it to 0 or change runPolicy.gangScheduler."
            ),
            field=".failurePolicy.spares",
            check=lambda m: (
                m.run_policy.gang_scheduler == "builtin" or m.failure_policy.spares == 0
            ),
        ),
        Rule(
            cel=(
                "self.runPolicy.gangScheduler == 'builtin' "
                "|| self.topology.preferredWaitSeconds == 60"
            ),
            message=(
                "topology.preferredWaitSeconds is used by gangScheduler builtin only; leave it "
                "at its default (60)."
            ),
            field=".topology.preferredWaitSeconds",
            check=lambda m: (
                m.run_policy.gang_scheduler == "builtin" or m.topology.preferred_wait_seconds == 60
            ),
        ),
        Rule(
            cel=(
                "self.runPolicy.gangScheduler != 'kueue' "
                "|| !has(self.topology.required) || !has(self.topology.preferred)"
            ),
            message=(
                "with gangScheduler kueue give topology.required or topology.preferred, not "
                "both: Kueue takes one topology request per pod set."
            ),
            field=".topology",
            check=lambda m: (
                m.run_policy.gang_scheduler != "kueue"
                or m.topology.required is None
                or m.topology.preferred is None
            ),
        ),
    )

    image: Annotated[str, StringConstraints(min_length=1, max_length=1024)] = Field(
        default=TRAINER_IMAGE, description="Container image of every rank."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Image pull policy."
    )
    command: ArgList | None = Field(
        default=None, description="Entrypoint override; default: the trainer image's torchrun."
    )
    args: ArgList | None = Field(
        default=None, description="Arguments; default: derived from `trainer`."
    )
    env: EnvList = env_field("Extra environment variables for every rank.")
    trainer: TrainerSettings = section(
        TrainerSettings, "Settings for the Phalanx trainer image (ignored with command/args)."
    )
    nodes: int = Field(default=1, ge=1, le=4096, description="Pods in the gang: one per node rank.")
    processes_per_node: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="torchrun processes per pod; defaults to accelerator.perNode (1 for cpu).",
    )
    accelerator: Accelerator = section(Accelerator, "Accelerators of each pod.")
    topology: Topology = section(Topology, "Topology constraints of the gang.")
    communication: Communication = section(Communication, "Collective communication wiring.")
    checkpoint: Checkpoint = section(Checkpoint, "Checkpoint volume.")
    failure_policy: FailurePolicy = section(FailurePolicy, "Failure handling.")
    run_policy: RunPolicy = section(RunPolicy, "Scheduling and lifetime.")
    pod_template: TrainerPodTemplate | None = Field(
        default=None, description="Overlay merged into every pod."
    )

    def nproc_per_node(self) -> int:
        if self.processes_per_node is not None:
            return self.processes_per_node
        return max(1, self.accelerator.count())

    def backend(self) -> str:
        from phalanx.constants import DEFAULT_BACKEND

        return self.communication.backend or DEFAULT_BACKEND[self.accelerator.type]


class Placement(ApiModel):
    """Where the current gang runs."""

    level: Str = Field(default="", description="Topology level of the chosen domain.")
    domain: Str = Field(default="", description="The domain (label value) holding every pod.")
    nodes: Annotated[list[Str], Field(max_length=4096)] = Field(
        default_factory=list, description="Node of each rank, in rank order."
    )
    generation: int | None = Field(default=None, description="The gang generation placed.")
    spare_nodes: Annotated[list[Str], Field(max_length=4096)] = Field(
        default_factory=list,
        description="Nodes of the room kept for failurePolicy.spares, one per spare pod.",
    )


class Preemption(ApiModel):
    """The last time this job's gang yielded spare nodes to a recovering gang."""

    by: Str = Field(default="", description="The recovering job (namespace/name).")
    nodes: Annotated[list[Str], Field(max_length=4096)] = Field(
        default_factory=list, description="The spare nodes it needed."
    )
    generation: int | None = Field(default=None, description="The gang generation preempted.")
    at: datetime | None = Field(default=None, description="When it was preempted.")


class Progress(ApiModel):
    """Training progress reported by rank 0 (see docs/progress-contract.md)."""

    step: int = Field(default=0, description="Optimizer steps completed.")
    total_steps: int = Field(default=0, description="Optimizer steps planned.")
    percent: Str = Field(default="", description="step / totalSteps, for printing.")
    loss: float | None = Field(default=None, description="Most recent training loss.")
    tokens_per_second: float | None = Field(default=None, description="Global training throughput.")
    mfu: float | None = Field(default=None, description="Model FLOPs utilisation, 0..1.")
    last_checkpoint_step: int | None = Field(
        default=None, description="Newest complete checkpoint."
    )
    eta_seconds: float | None = Field(default=None, description="Estimated seconds to completion.")
    val_loss: float | None = Field(
        default=None, description="Most recent loss on the held-out validation set."
    )
    val_perplexity: float | None = Field(
        default=None, description="exp(valLoss): the validation perplexity."
    )


class Goodput(ApiModel):
    """Where the job's wall-clock time went, kept by the operator (docs/goodput.md)."""

    ettr: float = Field(
        default=0,
        description=(
            "Effective training time ratio: productiveSeconds / (startingSeconds + "
            "trainingSeconds + restartSeconds); 0 before the first gang was placed."
        ),
    )
    state: (
        Literal["Queued", "Starting", "Training", "Restarting", "Suspended", "Finished"] | None
    ) = Field(default=None, description="What the job is doing now.")
    since: datetime | None = Field(default=None, description="When the job entered state.")
    accounted_at: datetime | None = Field(
        default=None, description="When the seconds below were last brought up to date."
    )
    queued_seconds: float = Field(default=0, description="The first gang waiting for placement.")
    starting_seconds: float = Field(
        default=0, description="The first gang placed, before its step moved."
    )
    training_seconds: float = Field(
        default=0, description="A gang's step moving (checkpoint stalls and lost work included)."
    )
    checkpoint_seconds: float = Field(
        default=0, description="Training time the trainer was blocked saving checkpoints."
    )
    restart_seconds: float = Field(
        default=0, description="From each failure observed until the new gang's step moved."
    )
    suspended_seconds: float = Field(default=0, description="Time suspended (not in ettr).")
    lost_seconds: float = Field(
        default=0, description="Training time whose work restarts threw away."
    )
    productive_seconds: float = Field(
        default=0, description="trainingSeconds - checkpointSeconds - lostSeconds."
    )
    lost_steps: int = Field(
        default=0, description="Steps recomputed after restarts (past the newest checkpoint)."
    )
    recoveries: int = Field(default=0, description="Restarts after which the gang trained again.")
    last_recovery_seconds: float | None = Field(
        default=None, description="The newest recovery: failure observed to training again."
    )
    failed_at: datetime | None = Field(
        default=None, description="The failure the job is recovering from, while it does."
    )
    generation: int | None = Field(default=None, description="The gang these figures follow.")
    last_step: int | None = Field(default=None, description="The gang's newest reported step.")
    last_step_at: datetime | None = Field(default=None, description="When lastStep was seen.")
    gang_start_step: int | None = Field(default=None, description="The gang's first step seen.")
    checkpoint_step: int | None = Field(default=None, description="The newest checkpoint.")
    step_seconds: float | None = Field(default=None, description="Seconds per step, reported.")
    gang_training_seconds: float | None = Field(
        default=None, description="trainingSeconds of the current gang."
    )
    gang_stall_seconds: float | None = Field(
        default=None, description="The current gang's reported checkpoint stall total."
    )


class QueueStatus(ApiModel):
    """Where a queued gang stands (docs/goodput.md#why-am-i-waiting)."""

    position: int = Field(description="Place in the admission queue; 1 is next.")
    estimated_start_time: datetime | None = Field(
        default=None,
        description=(
            "When it would be placed once running jobs end as their ETAs say (absent: no "
            "running job's ETA frees enough capacity)."
        ),
    )
    after: Str | None = Field(
        default=None, description="The running job (namespace/name) whose end lets it in."
    )


class StragglerStatus(ApiModel):
    """A rank slower than its peers for the straggler window."""

    rank: int = Field(description="Global rank.")
    pod: Str = Field(default="", description="Its pod.")
    node: Str = Field(default="", description="Its node.")
    step_seconds: float = Field(
        description="Its own seconds per step (ownStepSeconds where reported, else stepSeconds)."
    )
    median_step_seconds: float = Field(description="The gang's median of the same.")
    checkpoint_step: int | None = Field(
        default=None,
        description="The newest checkpoint when it was found (Replace waits for a newer one).",
    )


Phase = Literal[
    "Pending",
    "Queued",
    "Starting",
    "Running",
    "Restarting",
    "Suspended",
    "Succeeded",
    "Failed",
    "Invalid",
]


class LLMTrainJobStatus(ApiModel):
    """The observed state of the training run, written by the operator."""

    phase: Phase | None = Field(
        default=None, description="Summary of the conditions, for printing."
    )
    conditions: ConditionList = conditions_field()
    observed_generation: int | None = Field(
        default=None, description="Last .metadata.generation acted on."
    )
    placement: Placement | None = Field(default=None, description="Where the gang runs.")
    recover_from: Placement | None = Field(
        default=None,
        description=(
            "Where the gang ran before a restart after failures, until the new gang is placed: "
            "with spares its replacement is placed in the same domain first."
        ),
    )
    preemption: Preemption | None = Field(
        default=None, description="The last preemption of this preemptible job from spares."
    )
    accelerators: int | None = Field(default=None, description="Accelerators held by the gang.")
    restarts: int = Field(default=0, description="Gang restarts after rank failures so far.")
    gang_generation: int | None = Field(
        default=None,
        description="Generation of the current gang: 1 at first, +1 on every restart or re-queue.",
    )
    queued_at: datetime | None = Field(
        default=None, description="When the current gang was queued."
    )
    admitted_at: datetime | None = Field(
        default=None, description="When the current gang was placed."
    )
    start_time: datetime | None = Field(
        default=None, description="When the job's pods were first created."
    )
    active_since: datetime | None = Field(
        default=None,
        description=(
            "When the job became active (its gang first admitted, or admitted again after a "
            "resume): runPolicy.activeDeadlineSeconds counts from here."
        ),
    )
    completion_time: datetime | None = Field(default=None, description="When the job finished.")
    progress: Progress | None = Field(default=None, description="Live progress from rank 0.")
    export_path: Str | None = Field(
        default=None,
        description=(
            "The final export inside the checkpoint volume, as the trainer reported it "
            "(rank 0's /progress or termination message); never assumed."
        ),
    )
    export_steps: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=10000)] = Field(
        default_factory=list,
        description=(
            "Steps whose exports/step-N snapshot the trainer reported complete and kept, "
            "ascending; an InferenceService serves one with model.fromTrainJob.step."
        ),
    )
    goodput: Goodput | None = Field(
        default=None, description="Where the job's time went: the ETTR timeline."
    )
    queue: QueueStatus | None = Field(
        default=None, description="While queued: position and estimated start."
    )
    stragglers: Annotated[list[StragglerStatus], Field(max_length=4096)] = Field(
        default_factory=list, description="Ranks slower than their peers for the window."
    )
    avoided_nodes: Annotated[list[Str], Field(max_length=4096)] = Field(
        default_factory=list,
        description=(
            "Nodes this job's new gangs keep off: a rank failed there for a node's reason "
            "(NodeLost, eviction, node shutdown, kubelet admission), kube-scheduler would not "
            "bind a placed pod there by the gang timeout, or a straggler was replaced there."
        ),
    )
    gang_timeouts: int = Field(
        default=0,
        description=(
            "Gang timeouts in a row since the gang last ran; at 3 the job fails "
            "(GangTimeoutLimitExceeded)."
        ),
    )


class PlacementFields(TypedDict, total=False):
    level: str
    domain: str
    nodes: list[str]
    generation: int | None
    spareNodes: list[str]


class PreemptionFields(TypedDict, total=False):
    by: str
    nodes: list[str]
    generation: int | None
    at: str


class LLMTrainJobStatusFields(TypedDict, total=False):
    """`LLMTrainJobStatus` as the wire dict the planner fills (a unit test keeps the keys equal
    to the model's aliases), so a misspelt status field is a type error, not a silent no-op."""

    phase: str
    conditions: list[dict[str, Any]]
    observedGeneration: int | None
    placement: PlacementFields
    recoverFrom: PlacementFields
    preemption: PreemptionFields
    accelerators: int
    restarts: int
    gangGeneration: int
    queuedAt: str
    admittedAt: str
    startTime: str
    activeSince: str
    completionTime: str
    progress: dict[str, Any]
    exportPath: str
    exportSteps: list[int]
    goodput: dict[str, Any]
    queue: dict[str, Any]
    stragglers: list[dict[str, Any]]
    avoidedNodes: list[str]
    gangTimeouts: int


class LLMTrainJob(ApiModel):
    """A distributed training run: N pods that start together or not at all."""

    api_version: Literal["phalanx.dev/v1alpha1"] = "phalanx.dev/v1alpha1"
    kind: Literal["LLMTrainJob"] = "LLMTrainJob"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: LLMTrainJobSpec = Field(default_factory=LLMTrainJobSpec)
    status: LLMTrainJobStatus | None = None


# Immutable while pods exist: the placement and rendezvous are computed from these.
GANG_SHAPE_RULE = Rule(
    cel=(
        "!has(oldSelf.status) || !has(oldSelf.status.phase) || "
        "!(oldSelf.status.phase in ['Queued', 'Starting', 'Running', 'Restarting']) || "
        "(self.spec.nodes == oldSelf.spec.nodes && self.spec.accelerator == oldSelf.spec.accelerator"
        " && self.spec.topology == oldSelf.spec.topology"
        " && (has(self.spec.processesPerNode) == has(oldSelf.spec.processesPerNode))"
        " && (!has(self.spec.processesPerNode) || self.spec.processesPerNode == oldSelf.spec.processesPerNode))"
    ),
    message=(
        "spec.nodes, spec.processesPerNode, spec.accelerator and spec.topology are immutable while "
        "the job is queued or running; suspend the job (spec.runPolicy.suspend: true) first, or "
        "create a new job."
    ),
    field=".spec",
    reason="FieldValueForbidden",
)

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "State", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Nodes", "type": "integer", "jsonPath": ".spec.nodes"},
    {"name": "GPUs", "type": "integer", "jsonPath": ".status.accelerators"},
    {"name": "Domain", "type": "string", "jsonPath": ".status.placement.domain"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.percent"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "ValLoss", "type": "number", "jsonPath": ".status.progress.valLoss", "priority": 1},
    {
        "name": "Tokens/s",
        "type": "number",
        "jsonPath": ".status.progress.tokensPerSecond",
        "priority": 1,
    },
    {"name": "ETA(s)", "type": "number", "jsonPath": ".status.progress.etaSeconds", "priority": 1},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "ETTR", "type": "number", "jsonPath": ".status.goodput.ettr", "priority": 1},
    {"name": "Queue", "type": "integer", "jsonPath": ".status.queue.position", "priority": 1},
    {
        "name": "Start(est)",
        "type": "string",
        "jsonPath": ".status.queue.estimatedStartTime",
        "priority": 1,
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
