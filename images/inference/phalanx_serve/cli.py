"""``phalanx-serve``: start the OpenAI-compatible server for one model.

Every flag has an environment default ``PHALANX_SERVE_<FLAG>`` (e.g. ``PHALANX_SERVE_API_KEY``),
so a pod spec can configure the server without rewriting its command line.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import Any

from phalanx_serve.settings import (
    DEFAULT_GROUP_PORT,
    GROUP_SIZE_ENV,
    LEADER_ADDRESS_ENV,
    WORKER_INDEX_ENV,
    GroupSettings,
    ServerSettings,
)

ENV_PREFIX = "PHALANX_SERVE_"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phalanx-serve",
        description="Serve a Llama-format model (trainer export or HF checkpoint) over an "
        "OpenAI-compatible HTTP API with continuous batching.",
    )

    def add(flag: str, *, type_: Any = str, default: Any = None, help_: str) -> None:
        env_name = ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")
        # argparse converts string defaults with ``type``, so a bad env value is a usage error.
        value = os.environ.get(env_name, default)
        p.add_argument(flag, type=type_, default=value, help=f"{help_} [env {env_name}]")

    add("--model", help_="model directory, or builtin:tiny for a small model made locally")
    add("--served-model-name", help_="name clients pass as 'model' (default: --model)")
    add("--host", default="0.0.0.0", help_="address to listen on")
    add("--port", type_=int, default=8000, help_="port to listen on")
    add("--max-batch-size", type_=int, default=16, help_="sequences decoded together (KV slots)")
    add("--max-model-len", type_=int, help_="context length per sequence (default: the model's)")
    add("--max-queue", type_=int, default=64, help_="requests allowed to wait; beyond that 429")
    add("--max-prefill-tokens", type_=int, default=2048, help_="prompt tokens prefilled per step")
    add("--block-size", type_=int, default=16, help_="tokens per KV-cache block")
    add(
        "--kv-cache-tokens",
        type_=int,
        help_="KV-cache capacity in tokens (default: max-batch-size x max-model-len)",
    )
    add(
        "--enable-prefix-caching",
        type_=_boolean,
        default="true",
        help_="reuse cached KV blocks of shared prompt prefixes (true/false)",
    )
    add("--dtype", default="auto", help_="auto, float32, bfloat16, float16 or float64")
    add("--device", default="auto", help_="auto (cuda if available), cpu, cuda, cuda:N")
    add("--api-key", help_="require 'Authorization: Bearer <key>' on /v1 routes")
    add("--chat-template", help_="Jinja chat template, as a file path or inline text")
    add("--max-body-bytes", type_=int, default=2 * 2**20, help_="largest request body accepted")
    add("--threads", type_=int, help_="torch CPU threads (default: torch's choice)")
    add("--log-level", default="info", help_="debug, info, warning or error")
    add(
        "--vllm-metrics",
        type_=_boolean,
        default="false",
        help_="also export every /metrics series under vLLM's name (vllm:*, label model_name), "
        "so dashboards and alerts written for vLLM work unchanged (true/false)",
    )
    add(
        "--engine-process",
        type_=_boolean,
        default="false",
        help_="run the engine loop in a process of its own, so HTTP work runs beside it on "
        "another core instead of taking its time; it costs some CPU for the hand-over, so it "
        "pays only where the server has a spare core (true/false; false: a thread of the "
        "server process)",
    )
    group = p.add_argument_group("tensor-parallel groups (set by the operator)")
    group.add_argument(
        "--group-size",
        type=int,
        default=int(os.environ.get(GROUP_SIZE_ENV) or 1),
        help=f"processes serving one model together [env {GROUP_SIZE_ENV}]",
    )
    group.add_argument(
        "--worker-index",
        type=int,
        default=int(os.environ.get(WORKER_INDEX_ENV) or 0),
        help=f"this process's place in the group; 0 leads [env {WORKER_INDEX_ENV}]",
    )
    group.add_argument(
        "--leader-address",
        default=os.environ.get(LEADER_ADDRESS_ENV),
        help=f"host name of worker 0 [env {LEADER_ADDRESS_ENV}]",
    )
    add(
        "--group-port", type_=int, default=DEFAULT_GROUP_PORT, help_="rendezvous port on the leader"
    )
    return p


def _boolean(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def settings_from_args(argv: Sequence[str] | None = None) -> ServerSettings:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("--model (or PHALANX_SERVE_MODEL) is required")
    for name in (
        "max_batch_size",
        "max_queue",
        "max_prefill_tokens",
        "max_body_bytes",
        "block_size",
    ):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            parser.error(f"--{name.replace('_', '-')} is out of range")
    if args.max_model_len is not None and args.max_model_len < 2:
        parser.error("--max-model-len must be at least 2")
    group = None
    if args.group_size > 1:
        if not args.leader_address:
            parser.error(f"a group of {args.group_size} needs --leader-address")
        if not 0 <= args.worker_index < args.group_size:
            parser.error(f"--worker-index {args.worker_index} is outside the group")
        group = GroupSettings(
            args.leader_address, args.group_size, args.worker_index, args.group_port
        )
    return ServerSettings(
        model=args.model,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        max_model_len=args.max_model_len,
        max_queue=args.max_queue,
        max_prefill_tokens=args.max_prefill_tokens,
        block_size=args.block_size,
        kv_cache_tokens=args.kv_cache_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        dtype=args.dtype,
        device=args.device,
        api_key=args.api_key or None,
        chat_template=args.chat_template,
        max_body_bytes=args.max_body_bytes,
        threads=args.threads,
        log_level=args.log_level,
        vllm_metrics=args.vllm_metrics,
        group=group,
        engine_process=args.engine_process,
    )


# The exit code of a server whose model cannot load: retrying the same files cannot help, and a
# process that stays up answering 503 would look like a slow load forever. Exiting lets the
# kubelet restart it with back-off (CrashLoopBackOff), which the operator reports.
LOAD_FAILED_EXIT = 3


def _exit_when_loading_fails(runtime: Any) -> None:
    """End the process when the model fails to load, with the reason in the termination log."""
    import json
    import threading
    import time

    def watch() -> None:
        while runtime.status == "loading":
            time.sleep(0.2)
        if runtime.status != "failed":
            return
        path = os.environ.get("PHALANX_TERMINATION_LOG")
        if path:
            message = {
                "exitCode": LOAD_FAILED_EXIT,
                "reason": "ModelLoadFailed",
                "message": str(runtime.error)[:3500],
            }
            try:
                with open(path, "w") as log:
                    log.write(json.dumps(message))
            except OSError:
                pass
        logging.getLogger("phalanx_serve").error("model load failed: %s; exiting", runtime.error)
        logging.shutdown()
        os._exit(LOAD_FAILED_EXIT)

    threading.Thread(target=watch, name="phalanx-load-watch", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_from_args(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import uvicorn

        from phalanx_serve.api import create_app
        from phalanx_serve.group import serve_worker
        from phalanx_serve.metrics import ServeMetrics
        from phalanx_serve.runtime import ServerRuntime
    except ModuleNotFoundError as error:  # one line, not a traceback
        raise SystemExit(
            f"phalanx-serve needs the serve extra ({error.name} is missing): "
            "pip install 'phalanx[serve]'"
        ) from None
    if settings.group is not None and not settings.group.is_leader:
        return serve_worker(settings)

    runtime = ServerRuntime(settings, ServeMetrics.for_settings(settings))
    app = create_app(settings, runtime=runtime)
    _exit_when_loading_fails(runtime)
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False
    )
    return 0
