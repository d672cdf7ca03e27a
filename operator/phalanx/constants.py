"""Names shared by the API, the renderers and the handlers: group, labels, gates, env."""

from __future__ import annotations

from typing import Final

GROUP: Final = "phalanx.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"

TRAINJOB_KIND: Final = "LLMTrainJob"
TRAINJOB_PLURAL: Final = "llmtrainjobs"
INFERENCE_KIND: Final = "InferenceService"
INFERENCE_PLURAL: Final = "inferenceservices"

# Images we build; a cluster operator overrides them through the Helm chart.
TRAINER_IMAGE: Final = "ghcr.io/phalanx-dev/trainer:0.1.0"
SERVER_IMAGE: Final = "ghcr.io/phalanx-dev/inference:0.1.0"

# Labels and annotations on child objects.
# Kueue's pod integration: a pod group admitted as one Workload, and its topology request.
KUEUE_QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP_LABEL: Final = "kueue.x-k8s.io/pod-group-name"
KUEUE_POD_GROUP_COUNT_ANNOTATION: Final = "kueue.x-k8s.io/pod-group-total-count"
KUEUE_RETRIABLE_IN_GROUP_ANNOTATION: Final = "kueue.x-k8s.io/retriable-in-group"
KUEUE_REQUIRED_TOPOLOGY_ANNOTATION: Final = "kueue.x-k8s.io/podset-required-topology"
KUEUE_PREFERRED_TOPOLOGY_ANNOTATION: Final = "kueue.x-k8s.io/podset-preferred-topology"
LABEL_JOB: Final = f"{GROUP}/job"
LABEL_RANK: Final = f"{GROUP}/rank"
LABEL_GENERATION: Final = f"{GROUP}/generation"
LABEL_SERVICE: Final = f"{GROUP}/inference-service"
LABEL_GROUP_INDEX: Final = f"{GROUP}/group"
LABEL_WORKER_INDEX: Final = f"{GROUP}/worker-index"
LABEL_HOSTNAME: Final = "kubernetes.io/hostname"
# A pod (ours or anyone's) that may run on spare nodes and be preempted from them ("true").
LABEL_PREEMPTIBLE: Final = f"{GROUP}/preemptible"

# Pods are created behind this gate and released only when their whole gang is placed.
GANG_GATE: Final = f"{GROUP}/gang"

# A namespace label, set by an admin, naming the Pod Security Standard level Phalanx renders
# that namespace's workload pods for (restricted when absent); see docs/operator.md.
POD_SECURITY_LABEL: Final = f"{GROUP}/pod-security"
POD_SECURITY_LEVELS: Final = ("restricted", "baseline", "privileged")

# Default accelerator resource names per accelerator type.
ACCELERATOR_RESOURCES: Final = {
    "nvidia": "nvidia.com/gpu",
    "ascend": "huawei.com/Ascend910",
    "cpu": "",
}
# Communication backend implied by each accelerator type.
DEFAULT_BACKEND: Final = {"nvidia": "nccl", "ascend": "hccl", "cpu": "gloo"}

DEFAULT_MASTER_PORT: Final = 29500
DEFAULT_METRICS_PORT: Final = 9400
DEFAULT_SERVER_PORT: Final = 8000

# Environment the operator owns in every training pod; users may not override these.
RESERVED_ENV: Final = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NNODES",
    "NODE_RANK",
    "WORLD_SIZE",
    "RANK",
    "PHALANX_JOB",
    "PHALANX_RESTART",
    "PHALANX_CHECKPOINT_DIR",
    "RANK_TABLE_FILE",
    "PHALANX_LEADER_ADDRESS",
    "PHALANX_GROUP_SIZE",
    "PHALANX_WORKER_INDEX",
    "PHALANX_TERMINATION_LOG",
)

# The termination contract (docs/progress-contract.md): the trainer writes its classified end
# to this file, which the kubelet copies into the container's terminated.message.
TERMINATION_LOG: Final = "/dev/termination-log"
TERMINATION_LOG_ENV: Final = "PHALANX_TERMINATION_LOG"
# Classes of a trainer's end that retrying cannot fix: they fail the job at once unless a
# failurePolicy rule says otherwise.
PERMANENT_REASONS: Final = frozenset({"InvalidConfig", "DataError", "CheckpointError"})
# Waiting reasons that cannot clear by waiting: the image name itself is malformed.
PERMANENT_START_REASONS: Final = frozenset({"InvalidImageName"})

# Canonical topology level names, coarsest first. The operator's topology configuration
# picks a subset (a preset or an explicit list); CEL uses this order to compare levels.
LEVEL_ORDER: Final = (
    "zone",
    "layer1",
    "block",
    "layer2",
    "subblock",
    "layer3",
    "rack",
    "clique",
    "host",
)


class Reason:
    """Every condition and event reason Phalanx writes (PascalCase, as in `kubectl describe`)."""

    # LLMTrainJob: admission and the gang
    QUEUED: Final = "Queued"
    WAITING_FOR_PREFERRED_DOMAIN: Final = "WaitingForPreferredDomain"
    INSUFFICIENT_CAPACITY: Final = "InsufficientCapacity"
    QUEUED_BEHIND_HIGHER_PRIORITY: Final = "QueuedBehindHigherPriority"
    GANG_EXCEEDS_DOMAIN_CAPACITY: Final = "GangExceedsDomainCapacity"
    POD_EXCEEDS_NODE_CAPACITY: Final = "PodExceedsNodeCapacity"
    UNKNOWN_TOPOLOGY_LEVEL: Final = "UnknownTopologyLevel"
    NO_MATCHING_NODES: Final = "NoMatchingNodes"
    GANG_ADMITTED: Final = "GangAdmitted"
    SCHEDULER_MANAGED: Final = "SchedulerManaged"
    GANG_TIMEOUT: Final = "GangTimeout"
    GANG_TIMEOUT_LIMIT_EXCEEDED: Final = "GangTimeoutLimitExceeded"
    GANG_RESTARTING: Final = "GangRestarting"
    # Spares: a preemptible gang yielded spare nodes; a recovery was placed on spares.
    PREEMPTED: Final = "Preempted"
    RECOVERED_ON_SPARES: Final = "RecoveredOnSpares"
    POD_CREATE_REJECTED: Final = "PodCreateRejected"
    INVALID_SPEC: Final = "InvalidSpec"
    # The pod template needs a higher pod security level than its namespace's label grants.
    POD_SECURITY_LEVEL: Final = "PodSecurityLevel"
    # LLMTrainJob: running and the end
    ALL_RANKS_RUNNING: Final = "AllRanksRunning"
    IMAGE_PULL_FAILED: Final = "ImagePullFailed"
    CONTAINER_CONFIG_ERROR: Final = "ContainerConfigError"
    CLAIM_NOT_BOUND: Final = "ClaimNotBound"  # a volume claim the pod needs is missing or unbound
    RANK_FAILED: Final = "RankFailed"
    GANG_RUNNING: Final = "GangRunning"
    SUSPENDED: Final = "Suspended"
    RESUMED: Final = "Resumed"
    COMPLETED: Final = "Completed"
    ALL_RANKS_SUCCEEDED: Final = "AllRanksSucceeded"
    RESTART_LIMIT_EXCEEDED: Final = "RestartLimitExceeded"
    PERMANENT_FAILURE: Final = "PermanentFailure"
    DEADLINE_EXCEEDED: Final = "DeadlineExceeded"
    # Why a rank can no longer finish, besides its container's own reasons
    NODE_LOST: Final = "NodeLost"
    POD_DELETED: Final = "PodDeleted"
    POD_MISSING: Final = "PodMissing"
    HANG: Final = "Hang"  # the step stopped moving (docs/goodput.md)
    # LLMTrainJob: stragglers
    STRAGGLER_DETECTED: Final = "StragglerDetected"
    NO_STRAGGLERS: Final = "NoStragglers"
    STRAGGLER_REPLACED: Final = "StragglerReplaced"
    # InferenceService: the model
    LOADED: Final = "Loaded"
    LOADING: Final = "Loading"
    EXPORT_NOT_READY: Final = "ExportNotReady"
    TRAIN_JOB_NOT_FOUND: Final = "TrainJobNotFound"
    TRAIN_JOB_INVALID: Final = "TrainJobInvalid"
    TRAIN_JOB_HAS_NO_CHECKPOINT: Final = "TrainJobHasNoCheckpoint"
    CLAIM_NOT_FOUND: Final = "ClaimNotFound"
    # InferenceService: groups, rollout, readiness
    ROLLING_UPDATE: Final = "RollingUpdate"
    SCALING: Final = "Scaling"
    ROLLOUT_COMPLETE: Final = "RolloutComplete"
    ROLLOUT_STALLED: Final = "RolloutStalled"
    GROUP_RECREATED: Final = "GroupRecreated"
    MINIMUM_REPLICAS_AVAILABLE: Final = "MinimumReplicasAvailable"
    GROUPS_STARTING: Final = "GroupsStarting"
    SCALED_TO_ZERO: Final = "ScaledToZero"
    UNSCHEDULABLE: Final = "Unschedulable"
    CRASH_LOOP_BACK_OFF: Final = "CrashLoopBackOff"
    # InferenceService: the autoscaler
    AUTOSCALING_DISABLED: Final = "AutoscalingDisabled"
    NO_METRICS: Final = "NoMetrics"
    METRICS_AVAILABLE: Final = "MetricsAvailable"
    SCALE_UP: Final = "ScaleUp"
    SCALE_DOWN: Final = "ScaleDown"
    SCALE_DOWN_STABILIZING: Final = "ScaleDownStabilizing"
    WITHIN_TARGET: Final = "WithinTarget"
    OUT_OF_BOUNDS: Final = "OutOfBounds"
    SCALED_UP: Final = "ScaledUp"
    SCALED_DOWN: Final = "ScaledDown"
    # Children
    CHILD_REJECTED: Final = "ChildRejected"
