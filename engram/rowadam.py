"""Row-wise (sparse) Adam: `torch.optim.SparseAdam`'s update applied to explicit rows.

A leaf module (imports only torch) so that stores which keep their rows outside an
`nn.Parameter` (`engram.store.trainable`, `engram.store.sharded`) and the optimizer
(`engram.optim`, which re-exports both names) share one implementation without the store
layer importing the optimizer.
"""

from __future__ import annotations

import math

import torch


def coalesce_rows(
    rows: torch.Tensor, grads: torch.Tensor, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ids (N,) and their gradients (N, dim) -> sorted unique ids (U,) and summed rows (U, dim).

    Duplicates are summed exactly as SparseAdam does (coalescing a sparse gradient); the sparse
    tensor's size `num_rows` is logical only, nothing of that size is allocated.
    """
    sparse = torch.sparse_coo_tensor(
        rows.unsqueeze(0), grads, (num_rows, grads.shape[1]), check_invariants=False
    ).coalesce()
    return sparse.indices()[0], sparse.values()


@torch.no_grad()
def sparse_adam_rows(
    grad: torch.Tensor,
    weight: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`torch.optim.SparseAdam`'s update of some rows, operation for operation: new (w, m, v).

    All inputs are (U, dim) rows of coalesced gradient, value and both moments; `step` is the
    table's step count after this update (bias correction). Tables that keep their rows outside
    an `nn.Parameter` (on disk, sharded across ranks) share this one implementation.
    """
    beta1, beta2 = betas
    m_upd = grad.sub(exp_avg).mul_(1 - beta1)
    v_upd = grad.pow(2).sub_(exp_avg_sq).mul_(1 - beta2)
    m_new, v_new = exp_avg + m_upd, exp_avg_sq + v_upd
    numer = m_upd.add_(exp_avg)
    denom = v_upd.add_(exp_avg_sq).sqrt_().add_(eps)
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    step_size = lr * math.sqrt(bc2) / bc1
    w_new = weight + (-step_size * numer.div_(denom))
    return w_new, m_new, v_new
