"""Load benchmark of phalanx-serve, following vLLM's ``bench serve`` method.

Requests with fixed input/output lengths (random token-id prompts, ``ignore_eos``) are sent to a
server started here on 127.0.0.1, streamed, and timed per chunk: TTFT (arrival to first token),
TPOT ((e2e - TTFT) / (output tokens - 1)), ITL (gap between streamed chunks) and end-to-end
latency, as mean/p50/p90/p99, plus request and token throughput. Arrivals are Poisson at
``--request-rate`` (``inf``: all at once), bounded by the concurrency under test.

CPU (default): output throughput at 1 and 16 concurrent clients against Hugging Face
``generate`` on the same weights and prompts in the same run (batched, greedy, the same torch
threads), repeated, with min/median, the CPU time both used, and a check that every output
equals HF's. Then a prefix-shared workload (a 512-token shared system prompt): TTFT with
automatic prefix caching on vs off. Targets: >= 1.5x HF at 16 clients, >= 1.0x at 1 client,
TTFT >= 3x better with prefix caching.

CUDA (``--device cuda --model-preset 1b``): a random-weight Llama-architecture model in bf16;
batch-1 decode tokens/s against the memory-bandwidth roofline, and throughput of 64 concurrent
requests through the engine against Hugging Face ``generate`` on the same shapes.

Results go to ``bench/results/serve_load.json`` (with the command line and the load average);
a summary is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

RESULTS = Path(__file__).resolve().parent / "results" / "serve_load.json"


# -- client side: one timed streaming request ----------------------------------------------------


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""
    text: str = ""


async def timed_request(
    session: aiohttp.ClientSession, url: str, prompt: list[int], output_len: int
) -> RequestResult:
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last = start
    result = RequestResult(ok=False)
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                result.error = f"HTTP {r.status}"
                return result
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if not chunk.get("choices") or not chunk["choices"][0]["text"]:
                    continue
                result.text += chunk["choices"][0]["text"]
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.latency = time.perf_counter() - start
        result.ok = result.output_tokens > 0
    except aiohttp.ClientError as exc:
        result.error = repr(exc)
    return result


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    s = sorted(values)

    def pct(q: float) -> float:
        # Linear interpolation between closest ranks (numpy's default).
        pos = (len(s) - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    ms = 1000.0
    return {
        "mean": sum(s) / len(s) * ms,
        "p50": pct(0.5) * ms,
        "p90": pct(0.9) * ms,
        "p99": pct(0.99) * ms,
    }


async def run_load(
    url: str, prompts: list[list[int]], output_len: int, concurrency: int, rate: float, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    # aiohttp, as vLLM's benchmark client: the load generator shares this machine's CPUs with
    # the server, so it should cost as little as possible.
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(prompt: list[int]) -> RequestResult:
            async with gate:
                return await timed_request(session, url, prompt, output_len)

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(one(prompt)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start

    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "concurrency": concurrency,
        "request_rate": "inf" if not math.isfinite(rate) else rate,
        "num_prompts": len(prompts),
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": percentiles([r.ttft for r in done]),
        "tpot_ms": percentiles(tpots),
        "itl_ms": percentiles([x for r in done for x in r.itl]),
        "e2el_ms": percentiles([r.latency for r in done]),
        "texts": [r.text for r in results],
    }


# -- server side ------------------------------------------------------------------------------------


class ServerProcess:
    def __init__(
        self, model: str, max_batch_size: int, extra: list[str], source: Path | None = None
    ) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable, "-m", "phalanx_serve", "--model", model, "--host", "127.0.0.1",
            "--port", str(self.port), "--max-batch-size", str(max_batch_size),
            "--max-queue", "256", "--log-level", "warning", *extra,
        ]  # fmt: skip
        env = None
        if source is not None:  # another checkout's phalanx_serve (``--compare-source``)
            env = {**os.environ, "PYTHONPATH": str(source)}
        self.proc = subprocess.Popen(cmd, env=env)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def vocab_size(self) -> int:
        # Token ids below 256 exist in every byte-level vocabulary; stay well inside it.
        return 256

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def long_context_copy(model_dir: Path, max_len: int, out: Path) -> Path:
    """The same weights with a longer context: rotary positions have no learned table."""
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        target = out / f.name
        if not target.exists():
            target.symlink_to(f.resolve())
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = max_len
    (out / "config.json").unlink()
    (out / "config.json").write_text(json.dumps(config))
    return out


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants (Linux): the server's engine
    process included, to compare runs when wall time is noisy."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [
                    int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()
                ]
        except (FileNotFoundError, ProcessLookupError):
            pass  # exited meanwhile
    return total


def summary(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {"min": s[0], "median": s[len(s) // 2], "max": s[-1]}


class HFBaseline:
    """Hugging Face ``generate`` on the same weights: greedy, exactly output_len new tokens."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import torch
        from tokenizers import Tokenizer
        from transformers import LlamaForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def generate(self, prompts: list[list[int]], output_len: int) -> tuple[float, float, list[str]]:
        """(wall seconds, CPU seconds, texts) for one batched call over all prompts."""
        torch = self.torch
        ids = torch.tensor(prompts)
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=output_len,
                do_sample=False,
                # No end-of-sequence: the server's ignore_eos, so both produce output_len tokens.
                eos_token_id=None,
                pad_token_id=0,
            )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        texts = [self.tokenizer.decode(row[len(prompts[0]) :].tolist()) for row in out]
        return wall, cpu, texts


class EngineAlone:
    """The engine in this process, without HTTP: how much of the server's time is the engine."""

    def __init__(self, model_dir: Path, max_batch: int) -> None:
        from phalanx_serve.engine import Engine, EngineConfig
        from phalanx_serve.loader import load_model
        from phalanx_serve.metrics import ServeMetrics

        loaded = load_model(str(model_dir), device="cpu", dtype="float32")
        cfg = loaded.config
        self.tokenizer = loaded.tokenizer
        self.engine = Engine(
            loaded.model, loaded.tokenizer,
            EngineConfig(max_batch_size=max_batch, max_model_len=cfg.max_seq_len),
            ServeMetrics("bench"), n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim, eos_token_ids=loaded.eos_token_ids,
        )  # fmt: skip
        self.engine.start()

    def generate(self, prompts: list[list[int]], output_len: int) -> tuple[float, list[str]]:
        from phalanx_serve.engine import RequestOutput
        from phalanx_serve.sampling import SamplingParams

        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        left = [len(prompts)]
        done = threading.Event()

        def sink(out: RequestOutput) -> None:
            if out.finished:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

        start = time.perf_counter()
        seqs = [self.engine.submit(f"b{i}", p, params, sink) for i, p in enumerate(prompts)]
        done.wait()
        wall = time.perf_counter() - start
        return wall, [self.tokenizer.decode(s.output_ids) for s in seqs]

    def stop(self) -> None:
        self.engine.shutdown()


def cpu_vs_hf(args: argparse.Namespace) -> dict[str, Any]:
    from phalanx_serve.builtin import ensure_builtin_model, is_builtin

    model_dir = ensure_builtin_model(args.model) if is_builtin(args.model) else Path(args.model)
    rng = random.Random(args.seed)
    extra = ["--device", "cpu", "--dtype", "float32", "--threads", str(args.threads)]
    hf = HFBaseline(model_dir, args.threads)
    alone = EngineAlone(model_dir, args.max_batch_size)
    vocab = 256  # ids below 256 exist in every byte-level vocabulary
    levels: list[dict[str, Any]] = []
    server = ServerProcess(
        str(model_dir), args.max_batch_size, [*extra, *shlex.split(args.server_flags)]
    )
    compare = None
    if args.compare_source is not None or args.compare_flags:
        compare = ServerProcess(
            str(model_dir),
            args.max_batch_size,
            [*extra, *shlex.split(args.compare_flags)],
            args.compare_source,
        )
    try:
        server.wait_ready()
        asyncio.run(run_load(server.url, [[1, 2, 3]], 4, 1, math.inf, args.seed))  # warm-up
        if compare is not None:
            compare.wait_ready()
            asyncio.run(run_load(compare.url, [[1, 2, 3]], 4, 1, math.inf, args.seed))
        for c in args.concurrency:
            prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(c)]
            hf.generate(prompts[:1], 4)  # warm-up
            hf_runs, srv_runs, cmp_runs, mismatches = [], [], [], 0
            engine_tps: list[float] = []
            alone.generate(prompts[:1], 4)  # warm-up
            for _ in range(args.repeats):
                wall, cpu, hf_texts = hf.generate(prompts, args.output_len)
                hf_runs.append({"wall_s": wall, "cpu_s": cpu})
                e_wall, e_texts = alone.generate(prompts, args.output_len)
                engine_tps.append(c * args.output_len / e_wall)
                mismatches += sum(a != b for a, b in zip(e_texts, hf_texts, strict=True))
                before = proc_cpu_seconds(server.proc.pid)
                run = asyncio.run(
                    run_load(server.url, prompts, args.output_len, c, math.inf, args.seed)
                )
                srv_cpu = proc_cpu_seconds(server.proc.pid) - before
                mismatches += sum(a != b for a, b in zip(run.pop("texts"), hf_texts, strict=True))
                srv_runs.append({**run, "server_cpu_s": srv_cpu})
                if compare is not None:
                    before = proc_cpu_seconds(compare.proc.pid)
                    other = asyncio.run(
                        run_load(compare.url, prompts, args.output_len, c, math.inf, args.seed)
                    )
                    other["server_cpu_s"] = proc_cpu_seconds(compare.proc.pid) - before
                    texts = other.pop("texts")
                    mismatches += sum(a != b for a, b in zip(texts, hf_texts, strict=True))
                    cmp_runs.append(other)
            tokens = c * args.output_len
            hf_tps = [tokens / r["wall_s"] for r in hf_runs]
            srv_tps = [r["output_throughput"] for r in srv_runs]
            ratios = [a / b for a, b in zip(srv_tps, hf_tps, strict=True)]
            # CPU seconds for the same tokens: steadier than wall time on a shared machine.
            cpu_ratios = [
                h["cpu_s"] / max(r["server_cpu_s"], 1e-9)
                for h, r in zip(hf_runs, srv_runs, strict=True)
            ]
            level = {
                "clients": c,
                "prompts": c,
                "hf_generate_batch": c,
                "hf_output_tokens_per_s": summary(hf_tps),
                "server_output_tokens_per_s": summary(srv_tps),
                "speedup_vs_hf": summary(ratios),
                "engine_alone_output_tokens_per_s": summary(engine_tps),
                "engine_alone_speedup_vs_hf": summary(
                    [a / b for a, b in zip(engine_tps, hf_tps, strict=True)]
                ),
                "cpu_efficiency_vs_hf": summary(cpu_ratios),
                "hf_cpu_s": summary([r["cpu_s"] for r in hf_runs]),
                "server_cpu_s": summary([r["server_cpu_s"] for r in srv_runs]),
                "server_ttft_ms_p50": summary([r["ttft_ms"]["p50"] for r in srv_runs]),
                "server_tpot_ms_p50": summary([r["tpot_ms"]["p50"] for r in srv_runs]),
                "outputs_equal_hf": mismatches == 0,
                "mismatched_outputs": mismatches,
                "failed_requests": sum(r["failed"] for r in srv_runs),
            }
            if cmp_runs:
                # The same load on the other checkout's server, interleaved with this one's in
                # every repeat: a before/after comparison that machine load cannot skew.
                level["compare_source"] = str(args.compare_source or "this checkout")
                level["compare_flags"] = args.compare_flags
                level["server_flags"] = args.server_flags
                level["compare_speedup_vs_hf"] = summary(
                    [r["output_throughput"] / t for r, t in zip(cmp_runs, hf_tps, strict=True)]
                )
                level["compare_cpu_efficiency_vs_hf"] = summary(
                    [
                        h["cpu_s"] / max(r["server_cpu_s"], 1e-9)
                        for h, r in zip(hf_runs, cmp_runs, strict=True)
                    ]
                )
                level["compare_server_cpu_s"] = summary([r["server_cpu_s"] for r in cmp_runs])
            levels.append(level)
            print(
                f"clients={c:<3} HF {level['hf_output_tokens_per_s']['median']:8.1f} tok/s  "
                f"server {level['server_output_tokens_per_s']['median']:8.1f} tok/s  "
                f"ratio min/median {level['speedup_vs_hf']['min']:.2f}/"
                f"{level['speedup_vs_hf']['median']:.2f}  engine alone median "
                f"{level['engine_alone_speedup_vs_hf']['median']:.2f}  CPU-time ratio median "
                f"{level['cpu_efficiency_vs_hf']['median']:.2f}  outputs equal: {mismatches == 0}",
                flush=True,
            )
            if cmp_runs:
                print(
                    f"clients={c:<3} compared server ({level['compare_source']} "
                    f"{args.compare_flags}): ratio min/median "
                    f"{level['compare_speedup_vs_hf']['min']:.2f}/"
                    f"{level['compare_speedup_vs_hf']['median']:.2f}  CPU-time ratio median "
                    f"{level['compare_cpu_efficiency_vs_hf']['median']:.2f}",
                    flush=True,
                )
    finally:
        server.stop()
        if compare is not None:
            compare.stop()
        alone.stop()
    prefix = prefix_workload(args, model_dir, rng)
    return {
        "suite": "cpu-vs-hf",
        "model": args.model,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "threads": args.threads,
        "repeats": args.repeats,
        "levels": levels,
        "targets": {"speedup_at_16_clients": 1.5, "speedup_at_1_client": 1.0, "prefix_ttft": 3.0},
        "prefix_caching": prefix,
    }


def prefix_workload(
    args: argparse.Namespace, model_dir: Path, rng: random.Random
) -> dict[str, Any]:
    """TTFT of requests sharing a long system prompt, prefix caching on vs off."""
    import tempfile

    shared = [rng.randrange(256) for _ in range(args.prefix_len)]
    prompts = [
        shared + [rng.randrange(256) for _ in range(args.input_len)]
        for _ in range(args.prefix_requests)
    ]
    max_len = args.prefix_len + args.input_len + args.prefix_output_len + 16
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        long_dir = long_context_copy(model_dir, max(max_len, 256), Path(tmp) / "model")
        for label, flag in (("on", "true"), ("off", "false")):
            extra = [
                "--device", "cpu", "--dtype", "float32", "--threads", str(args.threads),
                "--max-model-len", str(max_len), "--enable-prefix-caching", flag,
            ]  # fmt: skip
            server = ServerProcess(str(long_dir), 4, extra)
            try:
                server.wait_ready()
                # The first request with the prefix fills the cache (when caching is on).
                asyncio.run(run_load(server.url, [[*shared, 7]], 2, 1, math.inf, args.seed))
                runs = []
                for _ in range(args.repeats):
                    run = asyncio.run(
                        run_load(server.url, prompts, args.prefix_output_len, 1, math.inf, 0)
                    )
                    runs.append(run)
                results[label] = {
                    "ttft_ms_p50": summary([r["ttft_ms"]["p50"] for r in runs]),
                    "ttft_ms_mean": summary([r["ttft_ms"]["mean"] for r in runs]),
                    "texts": runs[0]["texts"],
                }
            finally:
                server.stop()
    ratio = results["off"]["ttft_ms_p50"]["median"] / results["on"]["ttft_ms_p50"]["median"]
    same = results["on"].pop("texts") == results["off"].pop("texts")
    print(
        f"prefix {args.prefix_len} tokens: TTFT p50 on {results['on']['ttft_ms_p50']['median']:.1f} ms,"
        f" off {results['off']['ttft_ms_p50']['median']:.1f} ms -> {ratio:.2f}x, outputs equal: {same}",
        flush=True,
    )
    return {
        "shared_prefix_tokens": args.prefix_len,
        "unique_tokens": args.input_len,
        "output_len": args.prefix_output_len,
        "requests": args.prefix_requests,
        "concurrency": 1,
        **results,
        "ttft_improvement_median": ratio,
        "outputs_equal_on_off": same,
    }


def _print_run(r: dict[str, Any]) -> None:
    print(
        f"{r['server']:<26} c={r['concurrency']:<3} n={r['num_prompts']:<4} "
        f"req/s={r['request_throughput']:7.2f}  out tok/s={r['output_throughput']:8.1f}  "
        f"TTFT p50={r['ttft_ms']['p50']:8.1f}ms  TPOT p50={r['tpot_ms']['p50']:7.2f}ms  "
        f"ITL p99={r['itl_ms']['p99']:7.2f}ms  E2E p50={r['e2el_ms']['p50']:8.1f}ms  failed={r['failed']}",
        flush=True,
    )


# -- GPU: roofline and HF generate ------------------------------------------------------------------


class NullDecoder:
    """The engine needs text; the roofline measures the model, so text is skipped."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


def memory_bandwidth(device: Any) -> float:
    """Achievable bytes/s, from timing a large device-to-device copy (read + write)."""
    import torch

    n = 256 * 2**20 if device.type == "cuda" else 32 * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * n * reps / (time.perf_counter() - t)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def roofline(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from phalanx_serve.engine import Engine, EngineConfig, RequestOutput
    from phalanx_serve.metrics import ServeMetrics
    from phalanx_serve.sampling import SamplingParams
    from phalanx_trainer.model import ModelConfig, Transformer

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig.preset(args.model_preset)
    max_len = args.input_len + args.output_len
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights()  # random weights: only the shapes matter for speed
    model.to(dtype).eval()

    def make_engine(batch: int) -> Engine:
        return Engine(
            model, NullDecoder(), EngineConfig(max_batch_size=batch, max_model_len=max_len, max_queue=batch),
            ServeMetrics("bench"), n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
            dtype=dtype, device=device,
        )  # fmt: skip

    def generate(engine: Engine, n: int) -> tuple[float, float, int]:
        """Submit n requests at once; return (seconds, seconds to all first tokens, tokens)."""
        done = threading.Event()
        remaining = [n]
        firsts: list[float] = []
        lock = threading.Lock()

        def sink(out: RequestOutput) -> None:
            with lock:
                if out.completion_tokens == 1 and not out.finished:
                    firsts.append(time.perf_counter())
                if out.finished:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

        gen = torch.Generator().manual_seed(args.seed)
        params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        for i in range(n):
            prompt = torch.randint(0, cfg.vocab_size, (args.input_len,), generator=gen).tolist()
            engine.submit(f"r{i}", prompt, params, sink)
        done.wait()
        elapsed = time.perf_counter() - t
        return elapsed, (max(firsts) - t) if firsts else 0.0, n * args.output_len

    bandwidth = memory_bandwidth(device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # Per decoded token at batch 1: every weight once (the embedding table only for the output
    # projection when tied; the input lookup is one row) plus the KV cache at mean context.
    mean_ctx = args.input_len + args.output_len / 2
    kv_bytes = (
        2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * mean_ctx * torch.finfo(dtype).bits / 8
    )
    embed_bytes = (
        0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim * torch.finfo(dtype).bits / 8
    )
    bytes_per_token = param_bytes - embed_bytes + kv_bytes
    roofline_tps = bandwidth / bytes_per_token

    single = make_engine(1)
    single.start()
    generate(single, 1)  # warm-up
    seconds, ttft, tokens = generate(single, 1)
    single.shutdown()
    decode_tps = (tokens - 1) / max(seconds - ttft, 1e-9)

    batch = args.gpu_concurrency
    batched = make_engine(batch)
    batched.start()
    generate(batched, min(batch, 4))  # warm-up
    b_seconds, _, b_tokens = generate(batched, batch)
    batched.shutdown()
    del batched, single
    model.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()

    hf_tps = hf_generate_throughput(cfg, device, dtype, batch, args) if not args.skip_hf else None
    result = {
        "suite": "roofline",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "model_preset": args.model_preset,
        "dtype": str(dtype),
        "params": cfg.num_params(),
        "measured_copy_bandwidth_GBps": bandwidth / 1e9,
        "bytes_per_decoded_token": bytes_per_token,
        "batch1_decode_tokens_per_s": decode_tps,
        "batch1_roofline_tokens_per_s": roofline_tps,
        "batch1_fraction_of_roofline": decode_tps / roofline_tps,
        f"engine_output_tokens_per_s_at_{batch}": b_tokens / b_seconds,
        f"hf_generate_output_tokens_per_s_at_{batch}": hf_tps,
        "speedup_vs_hf_generate": (b_tokens / b_seconds) / hf_tps if hf_tps else None,
        "input_len": args.input_len,
        "output_len": args.output_len,
    }
    for k, v in result.items():
        print(f"{k:<44} {v}")
    return result


def hf_generate_throughput(
    cfg: Any, device: Any, dtype: Any, batch: int, args: argparse.Namespace
) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from phalanx_trainer.hf import config_to_hf

    hf_cfg = LlamaConfig(
        **{k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "torch_dtype")}
    )
    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg).to(dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, args.input_len), device=device)
    kwargs = dict(
        max_new_tokens=args.output_len,
        min_new_tokens=args.output_len,
        do_sample=False,
        pad_token_id=0,
    )
    with torch.no_grad():
        model.generate(
            ids[:, :8], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4}
        )  # warm-up
        _sync(device)
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        _sync(device)
    return batch * args.output_len / (time.perf_counter() - t)


# -- entry point ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--suite", choices=["hf", "roofline"], help="default: hf on cpu, roofline on cuda"
    )
    p.add_argument("--model", default="builtin:tiny", help="model served by the scaling suite")
    p.add_argument("--model-preset", default="1b", help="trainer preset for the roofline suite")
    p.add_argument("--concurrency", default="1,16", help="comma-separated client counts")
    p.add_argument("--repeats", type=int, default=3, help="measurements per level (min/median)")
    p.add_argument("--prefix-len", type=int, default=512, help="shared system prompt tokens")
    p.add_argument("--prefix-requests", type=int, default=8)
    p.add_argument("--prefix-output-len", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--prompts-per-client", type=int, default=4)
    p.add_argument("--min-prompts", type=int, default=8)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="Poisson rate (req/s); inf = all at once",
    )
    p.add_argument("--gpu-concurrency", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the CPU server")
    p.add_argument(
        "--skip-hf", action="store_true", help="roofline suite without the HF generate baseline"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compare-source",
        type=Path,
        help="directory holding another phalanx_serve package (e.g. `git archive <rev> "
        "images/inference` unpacked, then its images/inference): its server runs the same load "
        "in every repeat, interleaved, and is reported next to this one",
    )
    p.add_argument(
        "--server-flags", default="", help="extra phalanx-serve flags of the measured server"
    )
    p.add_argument(
        "--compare-flags",
        default="",
        help="extra flags of a second server (this checkout unless --compare-source), run in "
        "every repeat next to the first, e.g. '--engine-process true'",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    suite = args.suite or ("roofline" if args.device == "cuda" else "hf")
    if suite == "roofline" and args.device == "cuda":
        args.input_len, args.output_len = max(args.input_len, 128), max(args.output_len, 128)

    load_at_start = os.getloadavg()[0]
    result = roofline(args) if suite == "roofline" else cpu_vs_hf(args)
    result["command"] = shlex.join(["python", "bench/serve_load.py", *(argv or sys.argv[1:])])
    result["host"] = {
        # Runnable processes per core far above 1 make every wall-time figure here noise:
        # the CPU-time ratios are the steadier comparison then.
        "load_average_1m_at_start": load_at_start,
        "load_average_1m_at_end": os.getloadavg()[0],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    result["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
