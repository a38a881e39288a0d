"""Hyper-connections (Zhu et al. 2024, "Hyper-Connections"): static + dynamic, M branches.

Axes used in shape comments: B batch, T time, M branches (hc_mult), D d_model.

The residual stream is H (B, T, M, D). Around each sublayer f (attention or FFN):
    alpha = static_alpha + s_alpha * tanh(RMSNorm(H) @ W_alpha)     (B, T, M, M+1)
    beta  = static_beta  + s_beta  * tanh(RMSNorm(H) @ W_beta)      (B, T, M)
    mix   = alpha^T H, i.e. mix[j] = sum_m alpha[m, j] * H[m]       (B, T, M+1, D)
    x = mix[0] (the sublayer input, "width connection");  H_res = mix[1:] (residual mixing)
    H' = beta * f(x) + H_res                                         ("depth connection")

Design choices:
- Static init as the paper: column 0 of static_alpha is one-hot e_{layer_index mod M}, columns
  1..M the identity, static_beta ones; so at init sublayer `layer_index` reads branch
  layer_index mod M and its output is added to every branch. `layer_index` counts sublayers
  (block i's attention is 2i, its FFN 2i+1), as in the paper.
- Dynamic part: W_alpha, W_beta zero-initialised and learnable scales s_alpha = s_beta = 0.01, so
  at init the dynamic hyper-connection equals the static one. `dynamic=False` leaves them out.
- The module exposes `width(H) -> (x, ctx)` and `depth(y, ctx) -> H'` so the block can call a
  sublayer that returns extra outputs (the MoE's aux loss) in between; `forward(H, f)` chains them.
- The backbone uses this module only for M > 1; M == 1 is the plain residual h + f(norm(h)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class HCContext:
    """What `depth` needs from `width`: the mixed residual branches and the output weights."""

    residual: Tensor  # (B, T, M, D)
    beta: Tensor  # (B, T, M) dynamic, or (M,) static


class HyperConnection(nn.Module):
    """The width and depth connections of one sublayer over M residual branches."""

    def __init__(
        self,
        d_model: int,
        hc_mult: int,
        layer_index: int,
        dynamic: bool = True,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if hc_mult < 1:
            raise ValueError(f"hc_mult must be >= 1, got {hc_mult}")
        if layer_index < 0:
            raise ValueError(f"layer_index must be >= 0, got {layer_index}")
        self.d_model = d_model
        self.hc_mult = hc_mult
        self.layer_index = layer_index
        self.dynamic = dynamic
        M = hc_mult
        self.static_alpha = nn.Parameter(torch.empty(M, M + 1))
        self.static_beta = nn.Parameter(torch.empty(M))
        if dynamic:
            self.norm = nn.RMSNorm(d_model, eps=norm_eps)
            self.dynamic_alpha = nn.Parameter(torch.empty(d_model, M + 1))  # W_alpha
            self.dynamic_beta = nn.Parameter(torch.empty(d_model))  # W_beta
            self.alpha_scale = nn.Parameter(torch.empty(()))  # s_alpha
            self.beta_scale = nn.Parameter(torch.empty(()))  # s_beta
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        M = self.hc_mult
        self.static_alpha.zero_()
        self.static_alpha[self.layer_index % M, 0] = 1.0
        self.static_alpha[:, 1:] = torch.eye(M)
        self.static_beta.fill_(1.0)
        if self.dynamic:
            self.norm.reset_parameters()
            self.dynamic_alpha.zero_()
            self.dynamic_beta.zero_()
            self.alpha_scale.fill_(0.01)
            self.beta_scale.fill_(0.01)

    def coefficients(self, H: Tensor) -> tuple[Tensor, Tensor]:
        """alpha (B, T, M, M+1) and beta (B, T, M) for H (B, T, M, D); static: (M, M+1), (M,)."""
        if not self.dynamic:
            return self.static_alpha, self.static_beta
        M = self.hc_mult
        Hn = self.norm(H)  # (B, T, M, D)
        W = torch.cat([self.dynamic_alpha, self.dynamic_beta.unsqueeze(1)], dim=1)  # (D, M+2)
        proj = torch.tanh(Hn @ W)  # (B, T, M, M+2): one matmul for W_alpha and W_beta
        alpha = self.static_alpha + self.alpha_scale * proj[..., : M + 1]  # (B, T, M, M+1)
        beta = self.static_beta + self.beta_scale * proj[..., M + 1]  # (B, T, M)
        return alpha, beta

    def width(self, H: Tensor) -> tuple[Tensor, HCContext]:
        """H (B, T, M, D) -> (sublayer input x (B, T, D), context for `depth`)."""
        if H.dim() != 4 or H.shape[2] != self.hc_mult or H.shape[3] != self.d_model:
            raise ValueError(
                f"hyper-connection input must have shape (B, T, M, D) = "
                f"(B, T, {self.hc_mult}, {self.d_model}), got {tuple(H.shape)}"
            )
        alpha, beta = self.coefficients(H)
        if alpha.dim() == 2:
            mix = torch.einsum("btmd,mn->btnd", H, alpha)  # (B, T, M+1, D)
        else:
            mix = torch.einsum("btmd,btmn->btnd", H, alpha)  # (B, T, M+1, D)
        return mix[:, :, 0], HCContext(mix[:, :, 1:], beta)

    def depth(self, y: Tensor, ctx: HCContext) -> Tensor:
        """Sublayer output y (B, T, D) -> H' = beta * y + H_res  (B, T, M, D)."""
        return ctx.beta.unsqueeze(-1) * y.unsqueeze(2) + ctx.residual

    def forward(self, H: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        """H (B, T, M, D) -> H' (B, T, M, D) around `sublayer` (B, T, D) -> (B, T, D)."""
        x, ctx = self.width(H)
        return self.depth(sublayer(x), ctx)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, hc_mult={self.hc_mult}, "
            f"layer_index={self.layer_index}, dynamic={self.dynamic}"
        )
