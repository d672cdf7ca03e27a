"""Cross-entropy over the output projection without materialising ``[tokens, vocab]`` logits.

The plain loss computes fp32 logits for every token at once: for the ``1b`` preset at 8k
context that is 8192 x 128256 x 4 bytes = 4.2 GB per sequence, plus as much again for its
gradient. ``linear_cross_entropy`` walks the tokens in chunks; for each chunk it computes the
logits, the loss, and at once the gradients of the hidden states and of the projection
weight (softmax minus one-hot), then frees the chunk. Backward only scales the stored
gradients, so nothing is recomputed: the matmuls are the same three as the plain loss's.
Peak extra memory is one chunk of logits plus gradients the size of the inputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_TOKENS = 4096
# Automatic chunks hold about this many logits (256 MiB in fp32) whatever the vocabulary:
# 32768 tokens for nano's 2048 entries, 523 for the 1b preset's 128256.
AUTO_CHUNK_LOGITS = 2**26
IGNORE_INDEX = -100  # targets equal to this count for nothing (as in F.cross_entropy)


def auto_chunk_tokens(vocab_size: int) -> int:
    return max(1, AUTO_CHUNK_LOGITS // vocab_size)


def plain_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The reference: full logits, loss in fp32 (mean over tokens)."""
    logits = F.linear(hidden, weight)
    return F.cross_entropy(
        logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX
    )


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        flat_h = hidden.reshape(-1, hidden.shape[-1])
        flat_t = targets.reshape(-1)
        # The mean is over counted tokens; a tensor, so that no step waits on the device.
        n = (flat_t != IGNORE_INDEX).sum().clamp(min=1).to(torch.float32)
        w = weight.to(compute_dtype)
        needs_grad = hidden.requires_grad or weight.requires_grad
        grad_h = torch.empty_like(flat_h) if hidden.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, flat_h.shape[0], chunk):
            h = flat_h[start : start + chunk].to(compute_dtype)
            t = flat_t[start : start + chunk]
            counted = (t != IGNORE_INDEX).to(torch.float32)
            t = t.clamp(min=0)
            logits = (h @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, t[:, None]).squeeze(1)) * counted).sum()
            if needs_grad:
                # d(sum of losses)/d(logits) = softmax - onehot; scaled by 1/n for the mean.
                # In place: the chunk's logits buffer becomes its gradient.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                dlogits = probs.mul_((counted / n)[:, None]).to(compute_dtype)
                if grad_h is not None:
                    grad_h[start : start + chunk] = (dlogits @ w).to(grad_h.dtype)
                if weight.requires_grad:
                    grad_w += (dlogits.t() @ h).float()
        ctx.save_for_backward(
            grad_h.view_as(hidden) if grad_h is not None else None,
            grad_w.to(weight.dtype) if weight.requires_grad else None,
        )
        return total / n

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, in fp32, chunked.

    Targets equal to ``IGNORE_INDEX`` are left out of the loss and of the mean.

    ``hidden`` is ``[..., dim]``, ``weight`` ``[vocab, dim]``, ``targets`` ``[...]``. Under
    autocast the matmuls run in the autocast dtype, as ``F.linear`` would; the logits are
    upcast to fp32 before the softmax. ``chunk <= 0`` computes the plain loss.
    """
    if chunk <= 0:
        return plain_cross_entropy(hidden, weight, targets)
    device_type = hidden.device.type
    compute_dtype = (
        torch.get_autocast_dtype(device_type)
        if torch.is_autocast_enabled(device_type)
        else hidden.dtype
    )
    with torch.autocast(device_type, enabled=False):
        loss: torch.Tensor = _LinearCrossEntropy.apply(
            hidden, weight, targets, chunk, compute_dtype
        )
    return loss
