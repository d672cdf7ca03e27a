"""Server settings: one dataclass, filled from CLI flags with ``PHALANX_SERVE_*`` env defaults."""

from __future__ import annotations

from dataclasses import dataclass

# Set by the operator on every pod of a multi-pod group (LeaderWorkerSet-style).
LEADER_ADDRESS_ENV = "PHALANX_LEADER_ADDRESS"
GROUP_SIZE_ENV = "PHALANX_GROUP_SIZE"
WORKER_INDEX_ENV = "PHALANX_WORKER_INDEX"
DEFAULT_GROUP_PORT = 29500


@dataclass(frozen=True)
class GroupSettings:
    """Where this process stands in a tensor-parallel group of pods."""

    leader_address: str
    size: int
    index: int
    port: int = DEFAULT_GROUP_PORT

    @property
    def is_leader(self) -> bool:
        return self.index == 0


@dataclass(frozen=True)
class ServerSettings:
    model: str
    served_model_name: str | None = None
    host: str = "0.0.0.0"
    port: int = 8000
    max_batch_size: int = 16
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_queue: int = 64
    max_prefill_tokens: int = 2048
    block_size: int = 16
    # KV-cache capacity in tokens; None: max_batch_size sequences of max_model_len tokens.
    kv_cache_tokens: int | None = None
    enable_prefix_caching: bool = True
    dtype: str = "auto"
    device: str = "auto"
    api_key: str | None = None
    chat_template: str | None = None
    max_body_bytes: int = 2 * 2**20
    threads: int | None = None  # torch intra-op threads on CPU
    log_level: str = "info"
    # Also export every metric under vLLM's name (vllm:*), for dashboards written for vLLM.
    vllm_metrics: bool = False
    group: GroupSettings | None = None  # None: this process serves the model alone
    # Run the engine loop in a process of its own (engine_process.py); False: a thread here.
    engine_process: bool = False

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
