"""Fused, chunked output layer + cross-entropy: the loss without materialising (N, V) logits.

Axes: N tokens (B*T flattened), D hidden size, V vocabulary, C tokens per chunk.

Why: with GPT-2's 50,257-word vocabulary and a small backbone, the output layer is most of a
training step on a CPU, and of that, a large share is memory traffic on the (N, V) logits:
writing them, `log_softmax`, its backward (another full pass reading two (N, V) tensors), and
zero-filling gradient buffers. This function walks the tokens in chunks of C and, per chunk,
computes the logits, the loss, and the gradients with respect to the hidden states and the output
weight right away (softmax minus one-hot, in place), so only a (C, V) buffer ever exists and the
log-softmax backward pass disappears. The same three matmuls run as in the unfused version.

Design choices:
- Gradients are computed in the forward when autograd needs them (as Liger-Kernel's fused linear
  cross-entropy does) and stored for `backward`, which only scales them by the incoming gradient.
  Without grad (evaluation) it is a plain chunked loss.
- Everything is computed in float32 (inputs are upcast), chunk order is fixed, so results are
  deterministic on CPU. Targets equal to `ignore_index` contribute neither loss nor gradient; the
  mean is over the other targets, exactly like `F.cross_entropy(..., ignore_index=...)`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, h: Tensor, weight: Tensor, targets: Tensor, chunk: int, ignore_index: int
    ) -> Tensor:
        with torch.autocast(device_type=h.device.type, enabled=False):
            return _LinearCrossEntropy._run(ctx, h, weight, targets, chunk, ignore_index)

    @staticmethod
    def _run(
        ctx: Any, h: Tensor, weight: Tensor, targets: Tensor, chunk: int, ignore_index: int
    ) -> Tensor:
        h32 = h.float()  # (N, D)
        w32 = weight.float()  # (V, D)
        N = h32.shape[0]
        valid = targets != ignore_index  # (N,)
        n_valid = valid.sum().clamp_min(1).to(torch.float32)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h32) if need_h else None
        grad_w = torch.zeros_like(w32) if need_w else None
        total = h32.new_zeros(())
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            hc, tc, vc = h32[s:e], targets[s:e], valid[s:e]
            logits = hc @ w32.T  # (C, V)
            safe_t = torch.where(vc, tc, 0)
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)  # (C,)
            peak = logits.amax(dim=-1, keepdim=True)  # (C, 1)
            expd = logits.sub_(peak).exp_()  # (C, V) in place: exp(logit - max)
            norm = expd.sum(dim=-1, keepdim=True)  # (C, 1)
            lse = (peak + norm.log()).squeeze(1)  # (C,)
            total = total + ((lse - picked) * vc).sum()
            if need_h or need_w:
                scale = vc.to(expd.dtype)[:, None] / n_valid  # (C, 1): d(mean)/d(token loss)
                probs = expd.mul_(scale / norm)  # (C, V) scaled softmax, in place
                rows = torch.arange(e - s, device=probs.device)
                probs[rows, safe_t] -= scale.squeeze(1)  # minus the scaled one-hot
                if need_h:
                    torch.mm(probs, w32, out=grad_h[s:e])  # (C, D)
                if need_w:
                    grad_w.addmm_(probs.T, hc)  # (V, D)
        ctx.save_for_backward(
            grad_h if grad_h is not None else h32.new_empty(0),
            grad_w if grad_w is not None else w32.new_empty(0),
        )
        ctx.dtypes = (h.dtype, weight.dtype)
        return total / n_valid

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_h * grad_out).to(h_dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_out).to(w_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def linear_cross_entropy(
    h: Tensor, weight: Tensor, targets: Tensor, *, chunk: int = 256, ignore_index: int = -1
) -> Tensor:
    """Mean cross-entropy of `h @ weight.T` against `targets`, never building all the logits.

    h (N, D), weight (V, D) (an `nn.Linear(D, V, bias=False)` weight), targets (N,) int64.
    Equal to `F.cross_entropy(h @ weight.T, targets, ignore_index=ignore_index)` (float32).
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected h (N, D) and weight (V, D), got {tuple(h.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != (h.shape[0],):
        raise ValueError(f"targets must have shape ({h.shape[0]},), got {tuple(targets.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _LinearCrossEntropy.apply(h, weight, targets, chunk, ignore_index)
