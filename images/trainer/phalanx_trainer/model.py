"""The decoder-only transformer shared by training and serving.

Architecture (Llama family, so exports load as Hugging Face ``LlamaForCausalLM``):
pre-norm RMSNorm, rotary position embeddings in the ``rotate_half`` (non-interleaved)
convention, grouped-query attention through ``scaled_dot_product_attention``, SwiGLU MLP
``w2(silu(w1(x)) * w3(x))``, no biases, optional tied input/output embeddings.

Weight init: every linear and embedding weight ~ N(0, 0.02); the two projections that write
into the residual stream (``attention.wo`` and ``feed_forward.w2``) use std
``0.02 / sqrt(2 * n_layers)`` so the residual variance stays roughly constant with depth
(GPT-2 / nanoGPT practice). RMSNorm weights start at 1.

KV-cache protocol (implemented by the inference engine, not here): in layer ``i``, after RoPE,
with ``k`` and ``v`` shaped ``[B, n_kv_heads, T, head_dim]``, the layer calls
``k, v, mask = kv_cache.update(i, k, v)``. The cache returns the full keys/values to attend to
and a boolean mask broadcastable to ``[B, n_heads, T, S]`` (True = attend) or None; attention
then runs with ``attn_mask=mask, is_causal=False``. Without a cache attention is causal.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from phalanx_trainer.loss import DEFAULT_CHUNK_TOKENS, linear_cross_entropy


class KVCache(Protocol):
    """What ``Transformer.forward`` needs from a cache object."""

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)

    def num_params(self, *, exclude_embedding: bool = False) -> int:
        """Parameter count computed from the config (equals ``sum(p.numel())`` of the model).

        ``exclude_embedding`` drops the input embedding table unless it is tied to the
        output projection (a tied table is used by the output matmul, so it costs FLOPs).
        """
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        mlp = 3 * d * self.ffn_dim
        per_layer = attn + mlp + 2 * d
        embed = self.vocab_size * d
        output = 0 if self.tie_embeddings else self.vocab_size * d
        total = self.n_layers * per_layer + d + embed + output
        if exclude_embedding and not self.tie_embeddings:
            total -= embed
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT style.

        ``6 * N`` covers the matmuls over all weights (2 FLOPs per multiply-add, times 3 for
        forward plus the two backward matmuls), with N excluding the embedding lookup, which
        is a gather. ``12 * n_layers * dim * seq_len`` is the attention score and value
        matmuls (QK^T and AV, non-causal count, as in PaLM) for one token at ``seq_len``.
        """
        n = self.num_params(exclude_embedding=True)
        return 6.0 * n + 12.0 * self.n_layers * self.dim * seq_len


PRESETS: dict[str, dict[str, Any]] = {
    # ~1M parameters: runs a few hundred steps a minute on a laptop CPU.
    "nano": dict(
        vocab_size=2048,
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=384,
        max_seq_len=256,
        tie_embeddings=True,
    ),
    # GPT-2 small sized (124M): ffn 2048 keeps the SwiGLU MLP at GPT-2's 8*dim^2 weights.
    # vocab 50304 = 50257 rounded up to a multiple of 64 for efficient matmuls.
    "gpt2-small": dict(
        vocab_size=50304,
        dim=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=12,
        ffn_dim=2048,
        max_seq_len=1024,
        tie_embeddings=True,
    ),
    # Llama-3.2-1B shapes. The original uses llama3 rope scaling to reach 128k context;
    # we train at the unscaled 8k length instead.
    "1b": dict(
        vocab_size=128256,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=8192,
        max_seq_len=8192,
        rope_theta=500000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
    ),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 even under bf16 autocast: the mean of squares loses too much precision otherwise.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[B, 1, T, head_dim]`` for absolute ``positions`` ``[B, T]`` (fp32)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos()[:, None], angles.sin()[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        mask: torch.Tensor | None = None
        is_causal = True
        if kv_cache is not None:
            k, v, mask = kv_cache.update(self.layer_id, k, v)
            is_causal = False
        if self.n_kv_heads != self.n_heads:
            k, v = repeat_kv(k, self.n_heads), repeat_kv(v, self.n_heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        projected: torch.Tensor = self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))
        return projected


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Repeat each kv head consecutively, ``[B, kvh, S, D] -> [B, n_heads, S, D]``.

    Done by hand rather than with SDPA's ``enable_gqa`` because not every backend (CPU math,
    older flash kernels) supports it.
    """
    bsz, kvh, s, d = x.shape
    rep = n_heads // kvh
    return x[:, :, None].expand(bsz, kvh, rep, s, d).reshape(bsz, n_heads, s, d)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down: torch.Tensor = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return down


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.attention = Attention(cfg, layer_id)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, kv_cache)
        out: torch.Tensor = h + self.feed_forward(self.ffn_norm(h))
        return out


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output: nn.Linear | None = None
        if not cfg.tie_embeddings:
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Recompute each block's activations in backward instead of storing them.
        self.activation_checkpointing = False
        # Tokens per chunk of the training loss (0 = plain cross-entropy over full logits).
        self.loss_chunk = DEFAULT_CHUNK_TOKENS
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; also used after materialising a meta-device model."""
        std = 0.02
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith(("attention.wo", "feed_forward.w2"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, vocab]``; with ``targets``, the mean fp32 training loss instead.

        The loss is computed here, inside the module's forward, so that under FSDP the
        output weight is still unsharded, and chunked so that full logits never exist.
        """
        bsz, seqlen = tokens.shape
        if positions is None:
            positions = torch.arange(seqlen, device=tokens.device).expand(bsz, seqlen)
        cos, sin = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        h = self.tok_embeddings(tokens)
        use_checkpointing = self.activation_checkpointing and self.training and kv_cache is None
        for layer in self.layers:
            if use_checkpointing:
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin, kv_cache)
        h = self.norm(h)
        if targets is not None:
            weight = self.tok_embeddings.weight if self.output is None else self.output.weight
            return linear_cross_entropy(h, weight, targets, chunk=self.loss_chunk)
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        logits: torch.Tensor = self.output(h)
        return logits
