"""The paged engine: prefix caching, preemption and chunked prefill never change a token."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from phalanx_serve.engine import Engine, EngineConfig, RequestOutput, Sequence
from phalanx_serve.kv_cache import BlockManager
from phalanx_serve.loader import LoadedModel, load_model
from phalanx_serve.metrics import ServeMetrics
from phalanx_serve.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir), device="cpu", dtype="float64")


def _engine(loaded: LoadedModel, **config: object) -> Engine:
    cfg = loaded.config
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        EngineConfig(**{"max_model_len": 256, **config}),  # type: ignore[arg-type]
        ServeMetrics("test"),
        n_layers=cfg.n_layers,
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        eos_token_ids=loaded.eos_token_ids,
        dtype=loaded.dtype,
    )
    engine.start()
    return engine


@pytest.fixture
def engines(loaded: LoadedModel) -> Iterator[list[Engine]]:
    made: list[Engine] = []
    yield made
    for e in made:
        e.shutdown()


def _run(
    engine: Engine, prompts: list[list[int]], params: SamplingParams = GREEDY
) -> list[list[int]]:
    """Submit all prompts at once; return each one's generated token ids."""
    finished = _Countdown(len(prompts))
    seqs = [engine.submit(f"r{i}", p, params, finished.sink) for i, p in enumerate(prompts)]
    finished.wait()
    return [s.output_ids for s in seqs]


class _Countdown:
    """Set once ``n`` sequences finished; the sink runs on the engine thread, never blocks."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.errors: list[str] = []
        self.event = threading.Event()

    def sink(self, out: RequestOutput) -> None:
        if out.finished:
            if out.error is not None:
                self.errors.append(out.error)
            self.left -= 1
            if self.left == 0:
                self.event.set()

    def wait(self) -> None:
        assert self.event.wait(120), "generation did not finish"
        assert not self.errors


def _prompts(n: int, length: int, seed: int, prefix: list[int] | None = None) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    head = prefix or []
    return [head + torch.randint(3, 2000, (length,), generator=gen).tolist() for _ in range(n)]


def _reference(loaded: LoadedModel, prompt: list[int], steps: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(loaded.model(torch.tensor([prompt + out]))[0, -1].argmax()))
    return out


def test_prefix_cache_hits_and_gives_the_same_tokens(
    loaded: LoadedModel, engines: list[Engine]
) -> None:
    shared = _prompts(1, 40, seed=1)[0]
    first, later = _prompts(1, 5, 2, shared), _prompts(3, 7, 3, shared)
    cached = _engine(loaded, block_size=8)
    plain = _engine(loaded, block_size=8, prefix_caching=False)
    engines += [cached, plain]
    _run(cached, first)
    hits_before = cached.cache.blocks.hits
    got = _run(cached, later)
    assert cached.cache.blocks.hits - hits_before == 3 * 40  # five full blocks, three times
    assert got == _run(plain, later)
    assert plain.cache.blocks.hits == 0
    assert got[0] == _reference(loaded, later[0], 12)


def test_preemption_recomputes_and_gives_the_same_tokens(
    loaded: LoadedModel, engines: list[Engine]
) -> None:
    prompts = _prompts(6, 30, seed=4)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    # 70 tokens per sequence = 9 blocks of 8; 20 blocks hold two sequences, not six.
    tight = _engine(loaded, block_size=8, num_blocks=20, max_batch_size=6, max_model_len=80)
    roomy = _engine(loaded, block_size=8, max_batch_size=6)
    engines += [tight, roomy]
    got = _run(tight, prompts, params)
    assert tight.metrics.num_preemptions._value.get() > 0  # type: ignore[attr-defined]
    assert got == _run(roomy, prompts, params)
    assert tight.cache.blocks.num_used == 0


def test_seeded_sampling_survives_preemption(loaded: LoadedModel, engines: list[Engine]) -> None:
    prompts = _prompts(4, 30, seed=5)
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=7, ignore_eos=True)
    tight = _engine(loaded, block_size=8, num_blocks=18, max_batch_size=4, max_model_len=80)
    roomy = _engine(loaded, block_size=8, max_batch_size=4)
    engines += [tight, roomy]
    got = _run(tight, prompts, params)
    assert tight.metrics.num_preemptions._value.get() > 0  # type: ignore[attr-defined]
    assert got == _run(roomy, prompts, params)


def test_chunked_prefill_keeps_decoding_streams_going(
    loaded: LoadedModel, engines: list[Engine]
) -> None:
    engine = _engine(loaded, block_size=8, max_prefill_tokens=16)
    engines.append(engine)
    events: list[str] = []
    started = threading.Event()
    finished = _Countdown(2)

    def sink_for(name: str) -> object:
        def sink(out: RequestOutput) -> None:
            events.append(name)
            if name == "short" and out.completion_tokens == 2:
                started.set()
            finished.sink(out)

        return sink

    short = _prompts(1, 5, seed=6)[0]
    long = _prompts(1, 200, seed=7)[0]
    long_params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    short_params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    s = engine.submit("short", short, short_params, sink_for("short"))  # type: ignore[arg-type]
    started.wait(60)
    long_seq = engine.submit("long", long, long_params, sink_for("long"))  # type: ignore[arg-type]
    finished.wait()
    # 200 prompt tokens in chunks of 16 take 13 steps; the short stream decodes in each one.
    before_long = events.index("long")
    assert events[:before_long].count("short") >= 2 + 12
    assert long_seq.output_ids == _reference(loaded, long, 4)
    assert s.output_ids == _reference(loaded, short, 60)


def test_kv_cache_usage_is_blocks_used_over_blocks(
    loaded: LoadedModel, engines: list[Engine]
) -> None:
    engine = _engine(loaded, block_size=16, num_blocks=32)
    engines.append(engine)
    seen: list[tuple[float, int, int]] = []
    seqs: list[Sequence] = []

    def sink(out: RequestOutput) -> None:
        if out.completion_tokens == 1:  # called on the engine thread, between steps
            seen.append((engine.cache.usage, engine.cache.blocks.num_used, len(seqs[0].table)))

    done = threading.Event()

    def last(out: RequestOutput) -> None:
        sink(out)
        if out.finished:
            done.set()

    seqs.append(engine.submit("a", _prompts(1, 40, 8)[0], GREEDY, last))
    done.wait(60)
    usage, used, table = seen[0]
    assert used == table == 3  # 40 prompt tokens in blocks of 16
    assert usage == 3 / 32
    assert engine.cache.usage == 0.0


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        pytest.param([1, 2, 3, 4, 5, 6, 7, 8, 9], 2, id="two-full-blocks"),
        pytest.param([1, 2, 3, 4, 5, 6, 7, 8], 1, id="last-token-always-computed"),
        pytest.param([1, 2, 3, 4, 9, 9, 9, 9, 9], 1, id="diverges-in-second-block"),
        pytest.param([9, 2, 3, 4, 5, 6, 7, 8, 9], 0, id="diverges-at-once"),
    ],
)
def test_prefix_lookup_matches_whole_blocks_only(tokens: list[int], expected: int) -> None:
    blocks = BlockManager(8, 4)
    table = [blocks.allocate() for _ in range(3)]
    blocks.register(table, [1, 2, 3, 4, 5, 6, 7, 8, 0, 0], 10)
    blocks.release(table)  # cached blocks stay findable after their owner left
    assert blocks.lookup_prefix(tokens) == table[:expected]


def test_evicted_blocks_are_forgotten() -> None:
    blocks = BlockManager(2, 2)
    table = [blocks.allocate(), blocks.allocate()]
    blocks.register(table, [1, 2, 3, 4], 4)
    blocks.release(table)
    assert blocks.num_available == 2
    assert blocks.usage == 0.0
    reused = [blocks.allocate(), blocks.allocate()]  # evicts both, oldest first
    assert reused == table
    blocks.release(reused)
    assert blocks.lookup_prefix([1, 2, 3, 4, 5]) == []


def test_the_prefix_index_never_outgrows_the_cache() -> None:
    blocks = BlockManager(4, 2)
    for i in range(100):
        table = [blocks.allocate()]
        blocks.register(table, [i, i + 1], 2)
        blocks.release(table)
        assert blocks.num_cached <= 4
    assert blocks.lookup_prefix([99, 100, 0]) != []  # the most recent ones are still there
    assert blocks.lookup_prefix([0, 1, 0]) == []  # the oldest were evicted and forgotten
