"""Feed-forward layers: a dense SwiGLU and a DeepSeek-V3-style mixture of experts.

Axes used in shape comments: B batch, T time, D d_model, N = B*T tokens, E routed experts,
k experts per token (top-k), F an expert's hidden size.

Design choices:
- `SwiGLU` is `w2(silu(w1 x) * w3 x)` with no biases, so a routed expert has exactly
  3*D*d_expert parameters and "inactive parameters" per MoE layer are exactly (E-k)*3*D*d_expert.
- Routing: scores = softmax or sigmoid of the router logits; the per-expert `router_bias` is added
  to the scores ONLY to choose the top-k experts; the mixing weights are gathered from the
  unbiased scores (sigmoid: renormalised over the k chosen to sum to 1; softmax: used as is).
  This is DeepSeek-V3's auxiliary-loss-free balancing: the bias is training state (a persistent
  buffer, in the state dict) updated outside autograd by `bias += rate * sign(mean_load - load)`
  from the loads counted during training forwards (`load_counts`, a non-persistent buffer).
- Optional Switch-style balance loss coef * E * sum_i f_i * P_i, with f_i the fraction of the N*k
  assignments sent to expert i (not differentiable) and P_i the mean normalised score of expert i.
  It equals coef at perfect balance.
- Dispatch for CPU and small GPUs without custom kernels: sort the N*k assignments by expert,
  take the per-expert counts with ONE host sync (`bincount(...).tolist()`), run each non-empty
  expert on its contiguous slice, and `index_add_` the weighted outputs back. Deterministic on
  CPU (stable sort, sequential index_add_).
- Shared experts are one SwiGLU of hidden size n_shared*d_expert: the same function and the same
  parameter count as n_shared separate experts whose outputs are summed.
- Distributed training must all-reduce `load_counts` before `update_router_bias`, and may set
  `count_reducer` (a function summing a tensor over the data-parallel ranks, installed from
  outside by `engram.parallel`): the balance loss then uses the global batch's f_i, and with
  equal-sized rank batches the mean of the ranks' losses (what DDP's gradient averaging sees)
  is exactly the single-process loss on the whole batch. The model itself knows no ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engram.model.config import ModelConfig


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): gate w1, up w3, down w2; no biases."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)  # up
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) -> (..., D)."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass
class Routing:
    """The router's decision for N tokens."""

    indices: Tensor  # (N, k) chosen experts, by descending biased score
    weights: Tensor  # (N, k) mixing weights from the UNBIASED scores
    scores: Tensor  # (N, E) unbiased scores (softmax or sigmoid of the logits)


class MoE(nn.Module):
    """Routed SwiGLU experts (top-k) plus always-on shared experts.

    `forward(x (B, T, D)) -> (y (B, T, D), aux_loss scalar)`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, E = cfg.d_model, cfg.n_routed_experts
        self.d_model = D
        self.n_experts = E
        self.top_k = cfg.moe_top_k
        self.score_fn = cfg.router_score
        self.aux_loss_coef = float(cfg.aux_loss_coef)
        self.track_load = cfg.router_bias_update > 0
        self.router = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(SwiGLU(D, cfg.d_expert) for _ in range(E))
        self.shared: SwiGLU | None = (
            SwiGLU(D, cfg.n_shared_experts * cfg.d_expert) if cfg.n_shared_experts > 0 else None
        )
        # Training state (persistent): selection-only bias of DeepSeek-V3's balancing.
        self.register_buffer("router_bias", torch.zeros(E))
        # Tokens routed to each expert since the last bias update (training forwards only).
        self.register_buffer("load_counts", torch.zeros(E), persistent=False)
        # Sums per-expert counts over data-parallel ranks for the balance loss (None: this
        # process's batch is the whole batch).
        self.count_reducer: Callable[[Tensor], Tensor] | None = None

    def route(self, x: Tensor) -> Routing:
        """x (N, D) -> the top-k experts per token and their mixing weights."""
        logits = self.router(x).float()  # (N, E)
        scores = logits.softmax(dim=-1) if self.score_fn == "softmax" else logits.sigmoid()
        choice = scores.detach() + self.router_bias  # (N, E), selection only
        indices = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, indices)  # (N, k)
        if self.score_fn == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(indices, weights, scores)

    def aux_loss(self, routing: Routing, counts: Tensor) -> Tensor:
        """coef * E * sum_i f_i * P_i (a scalar; 0 when the coefficient is 0)."""
        scores = routing.scores
        if self.aux_loss_coef == 0 or scores.shape[0] == 0:
            return scores.new_zeros(())
        N, k = routing.indices.shape
        if self.count_reducer is None:
            f = counts.float() / (N * k)  # (E,) fraction of assignments
        else:  # the global batch's fractions
            total = self.count_reducer(counts)  # (E,) summed over ranks
            f = total.float() / total.sum()
        probs = scores if self.score_fn == "softmax" else scores / scores.sum(-1, keepdim=True)
        P = probs.mean(dim=0)  # (E,)
        return self.aux_loss_coef * self.n_experts * (f * P).sum()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, T, D) -> (y (B, T, D), aux_loss scalar tensor)."""
        shape = x.shape
        x = x.reshape(-1, self.d_model)  # (N, D)
        routing = self.route(x)
        k = self.top_k
        flat_expert = routing.indices.reshape(-1)  # (N*k,)
        flat_weight = routing.weights.reshape(-1).to(x.dtype)  # (N*k,)
        order = torch.argsort(flat_expert, stable=True)  # (N*k,) assignments grouped by expert
        counts = torch.bincount(flat_expert, minlength=self.n_experts)  # (E,)
        if self.training and self.track_load:
            self.load_counts += counts.detach().to(self.load_counts.dtype)

        y = torch.zeros_like(x)  # (N, D)
        start = 0
        for e, count in enumerate(counts.tolist()):  # the one host sync
            if count == 0:
                continue
            assignment = order[start : start + count]  # (n_e,)
            start += count
            token = assignment // k  # (n_e,)
            out = self.experts[e](x[token])  # (n_e, D)
            y.index_add_(0, token, out * flat_weight[assignment, None])
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(shape), self.aux_loss(routing, counts)

    @torch.no_grad()
    def update_router_bias(self, rate: float) -> None:
        """bias += rate * sign(mean_load - load) from the counted loads, then zero the counts.

        Under-loaded experts get a larger bias (chosen more often), over-loaded a smaller one.
        No-op (counts kept) if no token was counted since the last update.
        """
        load = self.load_counts
        if float(load.sum()) == 0:
            return
        self.router_bias += rate * torch.sign(load.mean() - load)
        load.zero_()

    def extra_repr(self) -> str:
        return (
            f"n_experts={self.n_experts}, top_k={self.top_k}, score={self.score_fn}, "
            f"aux_loss_coef={self.aux_loss_coef}"
        )
