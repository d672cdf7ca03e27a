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
LABEL_JOB: Final = f"{GROUP}/job"
LABEL_RANK: Final = f"{GROUP}/rank"
LABEL_GENERATION: Final = f"{GROUP}/generation"
LABEL_SERVICE: Final = f"{GROUP}/inference-service"
LABEL_GROUP_INDEX: Final = f"{GROUP}/group"
LABEL_WORKER_INDEX: Final = f"{GROUP}/worker-index"
LABEL_HOSTNAME: Final = "kubernetes.io/hostname"

# Pods are created behind this gate and released only when their whole gang is placed.
GANG_GATE: Final = f"{GROUP}/gang"

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
