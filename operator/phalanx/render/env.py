"""The environment contract of a training pod: rendezvous, ranks, checkpoint and wiring.

torchrun reads its flags from PET_*; the plain names serve other launchers. The operator owns
every name in `phalanx.constants.RESERVED_ENV`; users extend, never override, them.
"""

from __future__ import annotations

from phalanx.api.trainjob import LLMTrainJobSpec
from phalanx.constants import DEFAULT_METRICS_PORT, TERMINATION_LOG, TERMINATION_LOG_ENV

from .pod import downward_api_env

HCCL_DIR = "/etc/phalanx/hccl"
RANK_TABLE_PATH = f"{HCCL_DIR}/hccl.json"

Env = list[dict[str, object]]


def master_address(job: str, namespace: str) -> str:
    """Stable DNS name of rank 0: hostname + subdomain behind the job's headless Service."""
    return f"{job}-0.{job}.{namespace}.svc"


def _pairs(pairs: dict[str, object]) -> Env:
    return [{"name": name, "value": str(value)} for name, value in pairs.items()]


def rendezvous_env(
    job: str, namespace: str, spec: LLMTrainJobSpec, rank: int, generation: int
) -> Env:
    address = master_address(job, namespace)
    port = spec.communication.master_port
    return _pairs(
        {
            "PET_NNODES": spec.nodes,
            "PET_NPROC_PER_NODE": spec.nproc_per_node(),
            "PET_NODE_RANK": rank,
            "PET_MASTER_ADDR": address,
            "PET_MASTER_PORT": port,
            "MASTER_ADDR": address,
            "MASTER_PORT": port,
            "NNODES": spec.nodes,
            "NODE_RANK": rank,
            "PHALANX_JOB": job,
            "PHALANX_RESTART": generation - 1,
            "PHALANX_CHECKPOINT_DIR": spec.checkpoint.mount_path,
            "PHALANX_METRICS_PORT": spec.trainer.metrics_port or DEFAULT_METRICS_PORT,
            TERMINATION_LOG_ENV: TERMINATION_LOG,
        }
    )


def backend_env(spec: LLMTrainJobSpec) -> Env:
    """Variables of the collective backend; NCCL_ALGO is deliberately never set (NCCL tunes it)."""
    backend = spec.backend()
    comm = spec.communication
    if backend == "nccl":
        pairs: dict[str, object] = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": 3}
        if comm.nccl is not None:
            nccl = comm.nccl
            settings = {
                "NCCL_SOCKET_IFNAME": nccl.socket_ifname,
                "NCCL_IB_HCA": nccl.ib_hca,
                "NCCL_IB_GID_INDEX": nccl.ib_gid_index,
                "NCCL_CROSS_NIC": nccl.cross_nic,
                "NCCL_NET_GDR_LEVEL": nccl.net_gdr_level,
                "NCCL_DEBUG": nccl.debug,
            }
            pairs.update({k: v for k, v in settings.items() if v is not None})
        return _pairs(pairs)
    if backend == "hccl":
        hccl = comm.hccl
        pairs = {
            "RANK_TABLE_FILE": RANK_TABLE_PATH,
            "HCCL_CONNECT_TIMEOUT": hccl.connect_timeout_seconds if hccl else 1800,
        }
        if hccl is not None and hccl.if_ip:
            pairs["HCCL_IF_IP"] = hccl.if_ip
        return _pairs(pairs)
    return _pairs({"PHALANX_BACKEND": "gloo"})


def training_env(
    job: str, namespace: str, spec: LLMTrainJobSpec, rank: int, generation: int
) -> Env:
    """The full, ordered env of rank `rank`: ours first, then the user's additions."""
    user = [e.wire() for e in (*spec.communication.env, *spec.env)]
    return [
        *rendezvous_env(job, namespace, spec, rank, generation),
        *backend_env(spec),
        *downward_api_env(),
        *user,
    ]
