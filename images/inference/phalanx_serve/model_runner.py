"""The serving forward pass over a trainer ``Transformer``'s weights, optionally one shard of a
tensor-parallel group.

Same architecture and numerics as ``phalanx_trainer.model`` (its rotary tables and attention;
the same rotary and RMSNorm arithmetic), laid out for inference: the q/k/v projections are one
matmul, the SwiGLU gate and up projections another, and logits are computed only for the rows
the engine will read. Fewer, larger operations matter on CPUs, where per-operation overhead
dominates a small model's decode step. Weights are stored transposed (``[in, out]``) and applied
with ``torch.mm`` on the flattened rows: for the few-row products of a decode step CPU BLAS runs
that layout about 1.7x faster than ``F.linear``'s ``[out, in]``, with identical results from 2
rows up (a single row takes a matrix-vector kernel in ``F.linear``; both are float-exact sums
in a different order).

Tensor parallelism (Megatron-style): rank ``r`` of ``size`` holds heads
``[r*H/size, (r+1)*H/size)`` of the attention (its own slice of the KV cache) and the same slice
of the MLP's hidden units. The output projections are split by input columns, so each rank's
partial sums are added with one all-reduce after attention and one after the MLP. Embeddings,
norms and the output head are replicated. Every rank then holds the same hidden state and logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from phalanx_trainer.model import Transformer, TransformerBlock, rotary_cos_sin

# Positions up to which the rotary tables are precomputed (a few MiB at most).
ROTARY_TABLE_MAX_POSITIONS = 32768

AllReduce = Callable[[torch.Tensor], None]
# Called with (tokens, view) before every forward on the leader of a group, so that the
# workers run the same step.
StepHook = Callable[[torch.Tensor, object], None]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        # One fused operation instead of six, with the same float32 statistics.
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    # Otherwise the trainer's formula: float32 statistics whatever the dtype, as it trains.
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def _rotary_tables(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's cos/sin tables, once per step, with the sign of ``rotate_half`` folded into
    sin: ``rotate_half(x) * sin == roll(x, d/2) * signed_sin`` exactly (negation is exact)."""
    cos, sin = rotary_cos_sin(positions, head_dim, theta)
    half = head_dim // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.to(dtype), signed.to(dtype)


def _rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``, as the trainer computes it, in four operations."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _mm(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """``x @ weight_t`` over the last dimension of ``x`` (``[..., in]`` by ``[in, out]``)."""
    out = torch.mm(x.reshape(-1, x.shape[-1]), weight_t)
    return out.view(*x.shape[:-1], weight_t.shape[1])


class _Layer(nn.Module):
    def __init__(self, qkv: torch.Tensor, wo: torch.Tensor, gate_up: torch.Tensor,
                 w2: torch.Tensor, attn_norm: torch.Tensor, ffn_norm: torch.Tensor) -> None:  # fmt: skip
        super().__init__()
        self.qkv = nn.Parameter(qkv, requires_grad=False)
        self.wo = nn.Parameter(wo, requires_grad=False)
        self.gate_up = nn.Parameter(gate_up, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)
        self.attn_norm = nn.Parameter(attn_norm, requires_grad=False)
        self.ffn_norm = nn.Parameter(ffn_norm, requires_grad=False)


class ServingModel(nn.Module):
    def __init__(
        self,
        model: Transformer,
        *,
        rank: int = 0,
        size: int = 1,
        all_reduce: AllReduce | None = None,
    ) -> None:
        super().__init__()
        cfg = model.cfg
        check_shardable(cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, size)
        if size > 1 and all_reduce is None:
            raise ValueError("a tensor-parallel shard needs an all-reduce")
        self.cfg = cfg
        self.rank, self.size = rank, size
        self.all_reduce = all_reduce
        self.before_forward: StepHook | None = None
        hd = cfg.head_dim
        self.n_heads = cfg.n_heads // size
        self.n_kv_heads = cfg.n_kv_heads // size
        self.head_dim = hd
        ffn = cfg.ffn_dim // size

        def rows(w: torch.Tensor, n: int) -> torch.Tensor:
            return w.detach()[rank * n : (rank + 1) * n]

        def cols(w: torch.Tensor, n: int) -> torch.Tensor:
            return w.detach()[:, rank * n : (rank + 1) * n]

        layers = []
        for block in model.layers:
            assert isinstance(block, TransformerBlock)
            attn, mlp = block.attention, block.feed_forward
            q = rows(attn.wq.weight, self.n_heads * hd)
            k = rows(attn.wk.weight, self.n_kv_heads * hd)
            v = rows(attn.wv.weight, self.n_kv_heads * hd)
            layers.append(
                _Layer(
                    qkv=torch.cat([q, k, v]).t().contiguous(),
                    wo=cols(attn.wo.weight, self.n_heads * hd).t().contiguous(),
                    gate_up=torch.cat([rows(mlp.w1.weight, ffn), rows(mlp.w3.weight, ffn)])
                    .t()
                    .contiguous(),
                    w2=cols(mlp.w2.weight, ffn).t().contiguous(),
                    attn_norm=block.attention_norm.weight.detach(),
                    ffn_norm=block.ffn_norm.weight.detach(),
                )
            )
        self.layers = nn.ModuleList(layers)
        self._layers: list[_Layer] = layers  # typed view of the same modules
        self.embed = nn.Parameter(model.tok_embeddings.weight.detach(), requires_grad=False)
        head = model.output.weight if model.output is not None else model.tok_embeddings.weight
        self.head = nn.Parameter(head.detach().t().contiguous(), requires_grad=False)
        self.norm = nn.Parameter(model.norm.weight.detach(), requires_grad=False)
        self.q_size = self.n_heads * hd
        self.kv_size = self.n_kv_heads * hd
        self.ffn = ffn
        # The rotary tables of every position, computed once: a decode step then looks its
        # rows up (two indexing operations) instead of recomputing them (about ten). Contexts
        # too long for a small table keep the per-step computation.
        self._rotary_table: tuple[torch.Tensor, torch.Tensor] | None = None
        if cfg.max_seq_len <= ROTARY_TABLE_MAX_POSITIONS:
            dtype, device = self.embed.dtype, self.embed.device
            every = torch.arange(cfg.max_seq_len, device=device)[None]
            cos, sin = _rotary_tables(every, hd, cfg.rope_theta, dtype)
            self._rotary_table = (cos[0, 0], sin[0, 0])  # [positions, head_dim]

    def rotary(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin ``[B, 1, T, head_dim]`` for ``positions`` ``[B, T]``."""
        table = self._rotary_table
        if table is None or table[0].dtype != dtype or table[0].device != positions.device:
            return _rotary_tables(positions, self.head_dim, self.cfg.rope_theta, dtype)
        cos, sin = table
        return cos[positions][:, None], sin[positions][:, None]

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, kv_cache: object
    ) -> torch.Tensor:
        """Logits ``[B, T', V]``: every position, or only ``kv_cache.logit_rows`` of a packed
        single-row prefill when the view names them (then ``T'`` is their number)."""
        if self.before_forward is not None:
            self.before_forward(tokens, kv_cache)
        cfg = self.cfg
        bsz, seqlen = tokens.shape
        h = F.embedding(tokens, self.embed)
        cos, sin = self.rotary(positions, h.dtype)
        update = kv_cache.update  # type: ignore[attr-defined]
        gqa = self.n_heads != self.n_kv_heads
        qk_heads = self.n_heads + self.n_kv_heads
        heads = qk_heads + self.n_kv_heads
        for i, layer in enumerate(self._layers):
            x = _rms_norm(h, layer.attn_norm, cfg.norm_eps)
            qkv = _mm(x, layer.qkv).view(bsz, seqlen, heads, self.head_dim).transpose(1, 2)
            # Rotary embedding of queries and keys in one pass: it is per head and position.
            qk = _rotary(qkv[:, :qk_heads], cos, sin)
            q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
            v = qkv[:, qk_heads:]
            k, v, mask = update(i, k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
            attn = _mm(out.transpose(1, 2).reshape(bsz, seqlen, -1), layer.wo)
            if self.all_reduce is not None:
                self.all_reduce(attn)
            h = h + attn
            x = _rms_norm(h, layer.ffn_norm, cfg.norm_eps)
            gate_up = _mm(x, layer.gate_up)
            gate, up = gate_up[..., : self.ffn], gate_up[..., self.ffn :]
            mlp = _mm(F.silu(gate) * up, layer.w2)
            if self.all_reduce is not None:
                self.all_reduce(mlp)
            h = h + mlp
        rows = getattr(kv_cache, "logit_rows", None)
        if rows is not None:
            h = h[:, rows]
        return _mm(_rms_norm(h, self.norm, cfg.norm_eps), self.head)


def check_shardable(n_heads: int, n_kv_heads: int, ffn_dim: int, size: int) -> None:
    if size < 1:
        raise ValueError("a tensor-parallel group has at least one process")
    for name, value in (("attention heads", n_heads), ("key/value heads", n_kv_heads),
                        ("MLP hidden units", ffn_dim)):  # fmt: skip
        if value % size:
            raise ValueError(
                f"the model's {value} {name} do not split evenly over a group of {size}"
            )
