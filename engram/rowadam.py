"""Row-wise (sparse) Adam: `torch.optim.SparseAdam`'s update applied to explicit rows.

A leaf module (imports only torch) so that stores which keep their rows outside an
`nn.Parameter` (`engram.store.trainable`, `engram.store.sharded`) and the optimizer
(`engram.optim`, which re-exports both names) share one implementation without the store
layer importing the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


class RowSparseAdam(torch.optim.SparseAdam):
    """`torch.optim.SparseAdam` whose step touches the gradient's rows only.

    PyTorch's CPU SparseAdam reads and writes every row of the table on each step (its
    `sparse_mask` gathers and its dense += sparse additions go through full-table passes), so a
    step costs O(table) however few rows the batch touched (measured on the demo's 194,856 x 8
    table: 7.9 ms per step, 6 of them in those passes). This subclass computes the same update,
    operation for operation (`sparse_adam_rows`, same coalescing, same bits), on the touched
    rows gathered with `index_select` and written back with `index_copy_`. State and
    `state_dict` are SparseAdam's (keys `step`, `exp_avg`, `exp_avg_sq`), so checkpoints move
    freely between the two.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            maximize = group.get("maximize", False)
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError(
                        "SparseAdam does not support dense gradients, please consider Adam instead"
                    )
                if p.dim() != 2 or p.grad.sparse_dim() != 1:
                    raise ValueError(
                        f"RowSparseAdam updates (rows, dim) tables with row-sparse gradients, got a "
                        f"parameter of shape {tuple(p.shape)} with sparse_dim {p.grad.sparse_dim()}"
                    )
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                grad = (-p.grad if maximize else p.grad).coalesce()
                values = grad._values()  # (U, dim)
                if values.numel() == 0:
                    continue
                rows = grad._indices()[0]  # (U,) sorted unique row ids
                m, v = state["exp_avg"], state["exp_avg_sq"]
                w_new, m_new, v_new = sparse_adam_rows(
                    values, p.index_select(0, rows), m.index_select(0, rows),
                    v.index_select(0, rows), state["step"], lr, (beta1, beta2), group["eps"],
                )  # fmt: skip
                m.index_copy_(0, rows, m_new)
                v.index_copy_(0, rows, v_new)
                p.index_copy_(0, rows, w_new)
        return loss
