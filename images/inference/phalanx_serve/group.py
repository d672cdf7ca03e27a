"""Multi-pod groups: one model served tensor-parallel by ``size`` processes.

The operator starts every pod of a group with the same command and tells each where it stands:
``PHALANX_LEADER_ADDRESS`` (worker 0's stable DNS name), ``PHALANX_GROUP_SIZE`` and
``PHALANX_WORKER_INDEX``. Worker 0, the leader, serves the HTTP API and runs the engine
(scheduling, sampling, detokenising); before every forward pass it broadcasts the step — token
ids and the plain-data description of the KV view — and every process runs its shard of the
same step, joined by two all-reduces per layer (see ``model_runner``). Workers hold their heads'
slice of the weights and of the KV cache, and answer only ``/health``.

Transport: torch.distributed, rendezvous at ``leader:group_port``; the backend follows the
device the model runs on (``group_backend``): NCCL for CUDA, gloo (TCP) otherwise. On CPU this
suits groups where a model's weights or KV cache do not fit one host; every layer costs two
network round trips per step, so it trades latency for capacity. The NCCL path is exercised only
where a GPU group runs; the tests here run gloo.
"""

from __future__ import annotations

import datetime
import logging
import threading
from typing import Any

import torch
import torch.distributed as dist

from phalanx_serve.kv_cache import PagedKVCache, view_from_spec
from phalanx_serve.loader import load_model
from phalanx_serve.model_runner import ServingModel
from phalanx_serve.settings import GroupSettings, ServerSettings
from phalanx_trainer.model import Transformer

log = logging.getLogger(__name__)

# An idle server sends nothing for as long as no request comes; the group must not time out.
IDLE_TIMEOUT = datetime.timedelta(days=3650)


def group_backend(device: torch.device) -> str:
    """The torch.distributed backend for a group whose model runs on ``device``."""
    if device.type == "cuda":
        if not dist.is_nccl_available():
            raise RuntimeError(
                "this torch build has no NCCL, which a tensor-parallel group on CUDA needs; "
                "use a CUDA build of torch or serve the group on CPU"
            )
        return "nccl"
    return "gloo"


class GroupComm:
    """The process group, plus the two collectives the serving forward needs."""

    def __init__(self, group: GroupSettings, device: torch.device | None = None) -> None:
        self.group = group
        device = device or torch.device("cpu")
        self.backend = group_backend(device)
        if self.backend == "nccl":
            # NCCL collectives (and broadcast_object_list's staging) use the current device.
            torch.cuda.set_device(device)
        log.info(
            "joining group of %d at %s:%d as worker %d (%s)",
            group.size,
            group.leader_address,
            group.port,
            group.index,
            self.backend,
        )
        dist.init_process_group(
            self.backend,
            init_method=f"tcp://{group.leader_address}:{group.port}",
            rank=group.index,
            world_size=group.size,
            timeout=IDLE_TIMEOUT,
        )

    def all_reduce(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor)

    def broadcast(self, message: Any = None) -> Any:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def attach_leader(model: ServingModel, comm: GroupComm) -> None:
    """Make every forward on the leader announce its step to the workers first."""

    def announce(tokens: torch.Tensor, view: object) -> None:
        comm.broadcast(("step", tokens.tolist(), view.spec()))  # type: ignore[attr-defined]

    model.before_forward = announce


def send_cache_layout(comm: GroupComm, num_blocks: int, block_size: int) -> None:
    comm.broadcast(("init", num_blocks, block_size))


def send_stop(comm: GroupComm) -> None:
    comm.broadcast(("stop",))


class Worker:
    """A non-leader process: receives steps, runs its shard, until the leader says stop."""

    def __init__(
        self, model: ServingModel, comm: GroupComm, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.model = model
        self.comm = comm
        self.dtype = dtype
        self.device = device
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.steps = 0

    def run(self) -> None:
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as exc:  # the group is broken; the pod must restart
            self.error = exc
            log.exception("group worker stopped")
            raise

    def _loop(self) -> None:
        kind, num_blocks, block_size = self.comm.broadcast()
        assert kind == "init", kind
        cfg = self.model.cfg
        cache = PagedKVCache(
            n_layers=cfg.n_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            n_kv_heads=self.model.n_kv_heads,
            head_dim=cfg.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.ready.set()
        while True:
            message = self.comm.broadcast()
            if message[0] == "stop":
                return
            _, tokens, spec = message
            view = view_from_spec(cache, spec)
            ids = torch.tensor(tokens, device=self.device)
            self.model(ids, positions=view.positions(), kv_cache=view)
            self.steps += 1


def serve_worker(settings: ServerSettings) -> int:
    """A worker pod: load its shard, join the group, run steps; ``/health`` for the probes."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    group = settings.group
    assert group is not None
    assert not group.is_leader
    if settings.threads:
        torch.set_num_threads(settings.threads)
    loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype)
    comm = GroupComm(group, loaded.device)
    assert isinstance(loaded.model, Transformer)
    shard = ServingModel(
        loaded.model, rank=group.index, size=group.size, all_reduce=comm.all_reduce
    )
    loaded.model = shard  # the full weights are no longer needed
    worker = Worker(shard, comm, dtype=loaded.dtype, device=loaded.device)
    app = FastAPI(title="Phalanx inference group worker")

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = worker.ready.is_set() and worker.error is None and thread.is_alive()
        return JSONResponse(
            {"status": "ready" if ok else "loading"}, status_code=200 if ok else 503
        )

    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    )

    def run() -> None:
        try:
            worker.run()
        finally:
            server.should_exit = True  # the group ended (stop or failure): so does this pod

    thread = threading.Thread(target=run, name="phalanx-group-worker", daemon=True)
    thread.start()
    server.run()
    thread.join(timeout=5)
    comm.close()
    return 1 if worker.error is not None else 0
