"""The Engram layer: hashed n-gram memory lookup, context-aware gate, value, short conv.

Axes used in shape comments throughout this file:
    B  batch                         T  time (positions in this call)
    M  branches (hc_mult; 1 for a single-stream backbone)
    D  hidden size of the backbone   H  sub-tables = (N-1)*K (orders 2..N times heads K)
    dh row width of one sub-table    E  memory width = H*dh
    C  conv channels = M*D           W  conv state width = (kernel_size-1)*dilation, dilation = N

Data flow (SPEC sections 1 and 4; the reference demo `engram_demo_v1.py`):
    rows (B,T,H) local ids --+offsets--> global ids --store.gather--> (B,T,H,dh) --> e (B,T,E)
    k_m = key_projs[m](e), v = value_proj(e)              (M key projections, ONE shared value)
    s_m = <norm1[m](k_m), norm2[m](h_m)> / sqrt(D)        (norm1: keys, norm2: queries, per branch)
    s_m <- sign(s_m) * sqrt(max(|s_m|, 1e-6))             (if signed_sqrt_gate; the demo's choice)
    a_m = sigmoid(s_m);  v~_m = a_m * v                   (B,T,M,D)
    Y = v~ + SiLU(conv(RMSNorm_m(v~)))                    (depthwise causal conv over C = M*D
                                                           channels, kernel 4, dilation N, no bias)

Design choices:
- The layer receives row ids that are LOCAL to their sub-table (what the hasher produces), adds
  the per-sub-table offsets (exclusive cumsum of `table_sizes`), and bounds-checks them itself so
  an error names the sub-table, the offending id and that sub-table's size. It never hashes and
  never knows which tier of the `RowStore` served a row; `lookup` is public so analysis code (and a
  caller that wants the gathered memory) can reuse it.
- `prefetch(rows, mask)` hands the store the global ids early (a tiered store starts reading);
  the layer remembers them, and a `lookup` of the SAME `rows` and `mask` objects, unchanged
  since (same version counters), reuses those ids instead of recomputing and re-checking them,
  so the store recognises its prefetch by identity. Any other call computes them afresh.
- Parameter names follow the demo (`key_projs`, `value_proj`, `norm1`, `norm2`,
  `short_conv.conv`, `short_conv.norms`) so its weights map one to one; the table lives in
  `store` (`store.weight` for the in-memory store). Projections carry a bias, as the demo's
  `nn.Linear` defaults do. The conv is zero-initialised (the paper), so at init Y == v~.
- Numerics follow the demo (docs/numerics.md lists every difference and its measurement): the
  gate's RMSNorms (`norm1`, `norm2`) use `nn.RMSNorm`'s default epsilon (None, i.e.
  `torch.finfo(dtype).eps`), as the demo builds them; the short conv's norms use 1e-5, the
  demo's `ShortConv(norm_eps=1e-5)`. Projections keep PyTorch's default `nn.Linear` init.
- Masking: `mask` (B,T) bool, True = live. A dead position's gate is forced to exactly 0 (so it
  feeds zeros into the conv and into the conv state), its output is exactly 0 (set with
  `torch.where`, so even non-finite hidden states there cannot leak), and its row ids are ignored
  (replaced by row 0 of each sub-table before the gather, never bounds-checked), so padding
  sentinels such as -1 are allowed under the mask. Because the conv is causal, masking a position
  never changes outputs at earlier positions.
- Streaming (decoding): the only state across calls is the conv's input history, the last W
  normalised gated values per sequence, as a plain tensor `ConvState` of shape (B, W, C) (channel
  index m*D + d). A plain tensor reorders with `state[idx]` for beam search and needs no class.
  `forward(..., conv_state=s)` returns `(Y, new_state)`; `s` is never modified in place. Without
  `conv_state` it returns just `Y` and behaves as if the history were zeros (the sequence start),
  so a full forward equals `init_conv_state` + any chunking of the same sequence (including one
  token at a time). With `use_short_conv=False` the state has width 0 and passes through.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engram.store.base import RowOutOfRangeError, RowStore
from engram.store.memory import MemoryRowStore

if TYPE_CHECKING:
    from engram.config import EngramConfig

# The conv's input history for streaming: (B, W, C), W = (kernel_size-1)*dilation, C = M*D.
ConvState = Tensor

_SIGNED_SQRT_FLOOR = 1e-6


def signed_sqrt(s: Tensor) -> Tensor:
    """sign(s) * sqrt(max(|s|, 1e-6)), exactly the demo's `gate.abs().clamp_min(1e-6).sqrt() * gate.sign()`."""
    return s.abs().clamp_min(_SIGNED_SQRT_FLOOR).sqrt() * s.sign()


class _CausalDepthwiseConv(torch.autograd.Function):
    """y[b, t, c] = sum_k w[c, k] * xs[b, t + k*dilation, c]: a depthwise dilated Conv1d on a
    channels-last input, as K shifted multiply-adds.

    Equal to `F.conv1d(xs.transpose(1, 2), w, dilation=dilation, groups=C).transpose(1, 2)` up
    to float rounding (the same products, summed in tap order). It exists for speed on CPU:
    PyTorch's depthwise conv1d transposes to channels-first and back and its backward is a
    generic convolution backward (measured 4.7 ms vs 2.3 ms forward + backward for the demo's
    16 x 128 x 128 layer); here every op reads contiguous (T, C) slabs, the backward is K more
    multiply-adds for the input and K products summed over (B, T) for the weight, and each
    output position depends only on its own window, so chunked calls give the full call's bits.
    """

    @staticmethod
    def forward(ctx: Any, xs: Tensor, weight: Tensor, dilation: int) -> Tensor:  # type: ignore[override]
        # xs (B, W+T, C), weight (C, 1, K) -> y (B, T, C)
        K = weight.shape[-1]
        T = xs.shape[1] - (K - 1) * dilation
        taps = weight[:, 0, :].t()  # (K, C)
        y = xs[:, :T] * taps[0]
        for k in range(1, K):
            y.addcmul_(xs[:, k * dilation : k * dilation + T], taps[k])
        ctx.save_for_backward(xs, weight)
        ctx.dilation = dilation
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        xs, weight = ctx.saved_tensors
        dilation = ctx.dilation
        K, T = weight.shape[-1], grad.shape[1]
        taps = weight[:, 0, :].t()  # (K, C)
        grad_xs = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_xs = xs.new_zeros(xs.shape)  # (B, W+T, C)
            for k in range(K):
                grad_xs[:, k * dilation : k * dilation + T].addcmul_(grad, taps[k])
        if ctx.needs_input_grad[1]:
            g2 = grad.reshape(-1, grad.shape[-1])  # (B*T, C)
            cols = [
                (g2 * xs[:, k * dilation : k * dilation + T].reshape(g2.shape)).sum(0)
                for k in range(K)
            ]  # K x (C,)
            grad_w = torch.stack(cols, dim=1).unsqueeze(1)  # (C, 1, K)
        return grad_xs, grad_w, None


class ShortConv(nn.Module):
    """Per-branch RMSNorm, then a depthwise causal dilated Conv1d over C = M*D channels, then SiLU.

    Zero-initialised, no bias. `forward(x, state)` prepends the state (the last W normalised inputs,
    zeros at a sequence start) instead of padding, so chunked calls equal one full call.
    """

    def __init__(
        self,
        hidden_size: int,
        hc_mult: int = 1,
        kernel_size: int = 4,
        dilation: int = 1,
        norm_eps: float = 1e-5,
        activation: bool = True,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or dilation < 1:
            raise ValueError(
                f"kernel_size and dilation must be >= 1, got {kernel_size}, {dilation}"
            )
        self.hidden_size = hidden_size
        self.hc_mult = hc_mult
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.activation = activation
        channels = hidden_size * hc_mult
        self.conv = nn.Conv1d(
            channels, channels, kernel_size, groups=channels, bias=False, dilation=dilation
        )
        self.norms = nn.ModuleList(nn.RMSNorm(hidden_size, eps=norm_eps) for _ in range(hc_mult))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.conv.weight)
        for norm in self.norms:
            norm.reset_parameters()

    @property
    def state_width(self) -> int:
        """W = (kernel_size - 1) * dilation: how many past inputs the causal conv reads."""
        return (self.kernel_size - 1) * self.dilation

    def forward(self, x: Tensor, state: ConvState | None = None) -> tuple[Tensor, ConvState]:
        """x (B, T, M, D), state (B, W, C) or None (zeros) -> (SiLU(conv(norm(x))) (B, T, M, D), new state)."""
        B, T, M, D = x.shape
        C, W = M * D, self.state_width
        if M == 1:
            x_norm = self.norms[0](x.reshape(B, T, D))  # (B, T, C)
        else:
            x_norm = torch.cat([self.norms[m](x[:, :, m, :]) for m in range(M)], dim=-1)
        if state is None:
            state = x_norm.new_zeros(B, W, C)
        else:
            state = state.to(device=x_norm.device, dtype=x_norm.dtype)
        xs = torch.cat([state, x_norm], dim=1)  # (B, W+T, C)
        weight = self.conv.weight.to(xs.dtype)  # (C, 1, K); a no-op outside autocast
        y = _CausalDepthwiseConv.apply(xs, weight, self.dilation)  # (B, T, C)
        if self.activation:
            y = F.silu(y)
        y = y.view(B, T, M, D)  # (B, T, M, D)
        new_state = xs[:, xs.shape[1] - W :, :].contiguous()  # (B, W, C)
        return y, new_state


def _versions(rows: Tensor, mask: Tensor | None) -> tuple[int, int] | None:
    """The version counters (bumped by in-place writes) of `rows` and `mask`; None for an
    inference tensor, which has none."""
    if rows.is_inference() or (mask is not None and mask.is_inference()):
        return None
    return rows._version, -1 if mask is None else mask._version


class Engram(nn.Module):
    """One Engram layer: lookup (via a `RowStore`), per-branch gate, shared value, short conv.

    Args:
        hidden_size: D, the backbone's hidden size.
        table_sizes: flat list of the H sub-table sizes (orders ascending, heads within).
        head_dim: dh, the width of one sub-table row.
        max_ngram_size: N; the short conv's dilation.
        hc_mult: M, the number of hyper-connection branches (1 for a single stream).
        kernel_size: the short conv's kernel size (4 in the paper).
        signed_sqrt_gate: apply sign(s)*sqrt(|s|) to the gate logit (the demo); False = the paper.
        use_short_conv: False gives Y = v~ (the paper's ablation).
        norm_eps: epsilon of the short conv's RMSNorms (the demo's ShortConv: 1e-5).
        gate_norm_eps: epsilon of the gate's RMSNorms `norm1`/`norm2`; None (the demo's
            `nn.RMSNorm(D)`) means `torch.finfo(dtype).eps`.
        store: where the rows live; default an in-memory `MemoryRowStore(sum(table_sizes), dh)`.
        seed, table_std, sparse: the default store's init seed, init std and gradient kind.
        check_rows: bounds-check row ids on every call (one reduction and host sync).
    """

    def __init__(
        self,
        hidden_size: int,
        table_sizes: Sequence[int],
        head_dim: int,
        max_ngram_size: int,
        hc_mult: int = 1,
        *,
        kernel_size: int = 4,
        signed_sqrt_gate: bool = True,
        use_short_conv: bool = True,
        norm_eps: float = 1e-5,
        gate_norm_eps: float | None = None,
        store: RowStore | None = None,
        seed: int = 0,
        table_std: float = 1.0,
        sparse: bool = True,
        check_rows: bool = True,
    ) -> None:
        super().__init__()
        sizes = [int(s) for s in table_sizes]
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(
                f"table_sizes must be a non-empty flat list of sizes >= 1, got {sizes}"
            )
        for name, value, low in (
            ("hidden_size", hidden_size, 1),
            ("head_dim", head_dim, 1),
            ("max_ngram_size", max_ngram_size, 1),
            ("hc_mult", hc_mult, 1),
            ("kernel_size", kernel_size, 1),
        ):
            if int(value) < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.hidden_size = int(hidden_size)
        self.table_sizes = tuple(sizes)
        self.head_dim = int(head_dim)
        self.max_ngram_size = int(max_ngram_size)
        self.hc_mult = int(hc_mult)
        self.kernel_size = int(kernel_size)
        self.signed_sqrt_gate = bool(signed_sqrt_gate)
        self.use_short_conv = bool(use_short_conv)
        self.check_rows = bool(check_rows)
        self._prefetched: tuple[Any, ...] | None = None  # (rows, mask, versions, global ids)
        self.n_subtables = len(sizes)
        self.memory_dim = self.n_subtables * self.head_dim  # E
        total_rows = sum(sizes)

        if store is None:
            # The layer's own per-sub-table check (check_rows) is stricter than the store's
            # global one, so the default store skips its duplicate reduction on the hot path.
            store = MemoryRowStore(
                total_rows, self.head_dim, std=table_std, seed=seed, sparse=sparse,
                check_bounds=False,
            )  # fmt: skip
        if store.num_rows != total_rows or store.dim != self.head_dim:
            raise ValueError(
                f"store has shape ({store.num_rows}, {store.dim}), expected "
                f"(sum(table_sizes), head_dim) = ({total_rows}, {self.head_dim})"
            )
        self.store = store  # registered as a submodule when it is an nn.Module

        offsets = [0]
        for s in sizes[:-1]:
            offsets.append(offsets[-1] + s)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("sizes", torch.tensor(sizes, dtype=torch.long), persistent=False)

        D, E, M = self.hidden_size, self.memory_dim, self.hc_mult
        self.value_proj = nn.Linear(E, D)
        self.key_projs = nn.ModuleList(nn.Linear(E, D) for _ in range(M))
        self.norm1 = nn.ModuleList(nn.RMSNorm(D, eps=gate_norm_eps) for _ in range(M))  # keys
        self.norm2 = nn.ModuleList(nn.RMSNorm(D, eps=gate_norm_eps) for _ in range(M))  # queries
        self.short_conv: ShortConv | None = (
            ShortConv(D, M, self.kernel_size, self.max_ngram_size, norm_eps)
            if use_short_conv
            else None
        )

    @classmethod
    def from_config(
        cls,
        cfg: EngramConfig,
        hidden_size: int,
        table_sizes: Sequence[int],
        hc_mult: int = 1,
        *,
        store: RowStore | None = None,
        seed: int | None = None,
        norm_eps: float = 1e-5,
        gate_norm_eps: float | None = None,
        table_std: float = 1.0,
        sparse: bool = True,
        check_rows: bool = True,
    ) -> Engram:
        """Build from an `EngramConfig` plus this layer's table sizes (from the hasher).

        `seed` defaults to `cfg.seed`; pass e.g. `cfg.seed + layer_id` for distinct tables per layer.
        """
        if len(table_sizes) != cfg.n_subtables:
            raise ValueError(
                f"config has (max_ngram_size-1)*n_head_per_ngram = {cfg.n_subtables} sub-tables, "
                f"got {len(table_sizes)} table sizes"
            )
        return cls(
            hidden_size,
            table_sizes,
            cfg.head_dim,
            cfg.max_ngram_size,
            hc_mult,
            kernel_size=cfg.kernel_size,
            signed_sqrt_gate=cfg.signed_sqrt_gate,
            use_short_conv=cfg.use_short_conv,
            norm_eps=norm_eps,
            gate_norm_eps=gate_norm_eps,
            store=store,
            seed=cfg.seed if seed is None else seed,
            table_std=table_std,
            sparse=sparse,
            check_rows=check_rows,
        )

    # ----------------------------------------------------------------------------- parameters
    def table_params(self) -> int:
        """Number of table values: sum(table_sizes) * head_dim."""
        return self.store.num_rows * self.store.dim

    def table_parameters(self) -> list[nn.Parameter]:
        """The store's autograd-trainable parameters (the optimizer's sparse table group)."""
        return list(self.store.trainable_parameters())

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        """All of this layer's parameters except the table's: projections, norms, conv."""
        table_ids = {id(p) for p in self.table_parameters()}
        for p in self.parameters():
            if id(p) not in table_ids:
                yield p

    def dense_params(self) -> int:
        """Number of dense (non-table) parameter values."""
        return sum(p.numel() for p in self.dense_parameters())

    # ---------------------------------------------------------------------------- streaming state
    @property
    def conv_state_width(self) -> int:
        """W = (kernel_size-1)*max_ngram_size with the short conv, else 0."""
        return self.short_conv.state_width if self.short_conv is not None else 0

    def init_conv_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ConvState:
        """Zeros of shape (B, W, M*D): the conv history at a sequence start."""
        ref = self.value_proj.weight
        return torch.zeros(
            batch_size,
            self.conv_state_width,
            self.hc_mult * self.hidden_size,
            device=ref.device if device is None else device,
            dtype=ref.dtype if dtype is None else dtype,
        )

    # --------------------------------------------------------------------------------- lookup
    def _check_rows(self, rows: Tensor, B: int | None = None, T: int | None = None) -> None:
        if not isinstance(rows, Tensor):
            raise TypeError(f"rows must be a torch.Tensor, got {type(rows).__name__}")
        if rows.dtype == torch.bool or rows.dtype.is_floating_point or rows.dtype.is_complex:
            raise TypeError(
                f"rows must be an integer tensor (int64 row ids), got dtype {rows.dtype}"
            )
        H = self.n_subtables
        expected = (B if B is not None else "B", T if T is not None else "T", H)
        if (
            rows.dim() != 3
            or rows.shape[2] != H
            or (B is not None and rows.shape[0] != B)
            or (T is not None and rows.shape[1] != T)
        ):
            raise ValueError(
                f"rows must have shape (B, T, H) = {expected} (H = number of sub-tables), "
                f"got {tuple(rows.shape)}"
            )

    def _check_mask(self, mask: Tensor, B: int, T: int) -> None:
        if mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be a bool tensor (True = live position), got dtype {mask.dtype}"
            )
        if tuple(mask.shape) != (B, T):
            raise ValueError(f"mask must have shape (B, T) = ({B}, {T}), got {tuple(mask.shape)}")

    def global_rows(self, rows: Tensor, mask: Tensor | None = None) -> Tensor:
        """Local row ids (B, T, H) -> the store's global ids (B, T, H), bounds-checked.

        Dead positions (mask False) read row 0 of each sub-table and are not bounds-checked.
        """
        self._check_rows(rows)
        B, T, _ = rows.shape
        rows = rows.to(device=self.offsets.device, dtype=torch.long)
        if mask is not None:
            self._check_mask(mask, B, T)
            rows = torch.where(mask.to(rows.device).unsqueeze(-1), rows, 0)  # (B, T, H)
        if self.check_rows and rows.numel():
            bad = (rows < 0) | (rows >= self.sizes)  # (B, T, H)
            if bool(bad.any()):
                b, t, h = (int(i) for i in bad.nonzero()[0].tolist())
                raise RowOutOfRangeError(
                    f"row id {int(rows[b, t, h])} for sub-table {h} (size {self.table_sizes[h]}) at "
                    f"batch {b}, position {t} is out of range [0, {self.table_sizes[h]}) "
                    f"({int(bad.sum())} offending id(s) in total)"
                )
        return rows + self.offsets  # (B, T, H)

    def lookup(self, rows: Tensor, mask: Tensor | None = None) -> Tensor:
        """Local row ids (B, T, H) -> concatenated memory e (B, T, H*dh)."""
        memo, self._prefetched = self._prefetched, None
        if (
            memo is not None
            and memo[0] is rows
            and memo[1] is mask
            and memo[2] == _versions(rows, mask)
        ):
            global_rows = memo[3]  # the very ids `prefetch` handed the store
        else:
            global_rows = self.global_rows(rows, mask)
        e = self.store.gather(global_rows)  # (B, T, H, dh)
        return e.flatten(start_dim=-2)  # (B, T, E)

    def prefetch(self, rows: Tensor, mask: Tensor | None = None) -> bool:
        """Ask the store to start fetching the rows a later `forward(.., rows, mask)` will read.

        Addresses depend on the tokens alone, so a caller that knows the next tokens can call
        this before the blocks below this layer run. A no-op (returns False) for a store without
        `prefetch`; the forward is correct either way.
        """
        prefetch = getattr(self.store, "prefetch", None)
        if prefetch is None:
            return False
        global_rows = self.global_rows(rows, mask)
        versions = _versions(rows, mask)
        self._prefetched = None if versions is None else (rows, mask, versions, global_rows)
        prefetch(global_rows)
        return True

    def set_store(self, store: RowStore) -> None:
        """Serve this layer's rows from `store` (same shape) instead of the current one."""
        if store.num_rows != sum(self.table_sizes) or store.dim != self.head_dim:
            raise ValueError(
                f"store has shape ({store.num_rows}, {store.dim}), expected "
                f"(sum(table_sizes), head_dim) = ({sum(self.table_sizes)}, {self.head_dim})"
            )
        if "store" in self._modules:
            del self._modules["store"]
        self.store = store

    # ----------------------------------------------------------------------------------- gate
    def _as_branches(self, hidden: Tensor) -> Tensor:
        """(B, T, D) with M == 1, or (B, T, M, D) -> (B, T, M, D), with clear shape errors."""
        D, M = self.hidden_size, self.hc_mult
        if not isinstance(hidden, Tensor):
            raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
        if not hidden.dtype.is_floating_point:
            raise TypeError(f"hidden must be a floating-point tensor, got dtype {hidden.dtype}")
        if hidden.dim() == 3:
            if M != 1:
                raise ValueError(
                    f"hidden of shape {tuple(hidden.shape)} is (B, T, D), but this layer has "
                    f"hc_mult M={M} branches: pass (B, T, M, D) = (B, T, {M}, {D})"
                )
            hidden = hidden.unsqueeze(2)  # (B, T, 1, D)
        elif hidden.dim() != 4:
            raise ValueError(
                f"hidden must have shape (B, T, M, D) = (B, T, {M}, {D})"
                f"{' or (B, T, D)' if M == 1 else ''}, got {tuple(hidden.shape)}"
            )
        if hidden.shape[2] != M:
            raise ValueError(
                f"hidden has {hidden.shape[2]} branches at dim 2 (shape {tuple(hidden.shape)}), "
                f"but this layer has hc_mult M={M}"
            )
        if hidden.shape[3] != D:
            raise ValueError(
                f"hidden size mismatch: expected last dim D={D}, got shape {tuple(hidden.shape)}"
            )
        return hidden

    def gate(self, hidden: Tensor, e: Tensor, mask: Tensor | None = None) -> Tensor:
        """Gate a in (0, 1) per branch: hidden (B, T, M, D) or (B, T, D), e (B, T, E) -> (B, T, M).

        Exactly 0 where `mask` is False.
        """
        h = self._as_branches(hidden)  # (B, T, M, D)
        e = e.to(self.value_proj.weight.dtype)
        scale = 1.0 / math.sqrt(self.hidden_size)
        logits = []
        for m in range(self.hc_mult):
            k = self.norm1[m](self.key_projs[m](e))  # (B, T, D)
            q = self.norm2[m](h[:, :, m, :])  # (B, T, D)
            logits.append((k * q).sum(dim=-1) * scale)  # (B, T)
        s = torch.stack(logits, dim=-1)  # (B, T, M)
        if self.signed_sqrt_gate:
            s = signed_sqrt(s)
        a = torch.sigmoid(s)  # (B, T, M)
        if mask is not None:
            a = torch.where(mask.to(a.device).unsqueeze(-1), a, 0.0)
        return a

    # -------------------------------------------------------------------------------- forward
    @overload
    def forward(
        self, hidden: Tensor, rows: Tensor, mask: Tensor | None = None, conv_state: None = None
    ) -> Tensor: ...

    @overload
    def forward(
        self,
        hidden: Tensor,
        rows: Tensor,
        mask: Tensor | None = None,
        *,
        conv_state: ConvState,
    ) -> tuple[Tensor, ConvState]: ...

    def forward(
        self,
        hidden: Tensor,
        rows: Tensor,
        mask: Tensor | None = None,
        conv_state: ConvState | None = None,
    ) -> Tensor | tuple[Tensor, ConvState]:
        """Y for hidden (B, T, M, D) [or (B, T, D) if M == 1] and local rows (B, T, H).

        Y has the rank of `hidden`. The caller adds it to the residual stream: h <- h + Y.
        With `conv_state` (B, W, M*D) (from `init_conv_state` or a previous call) returns
        `(Y, new_state)`; the input state is left untouched.
        """
        h = self._as_branches(hidden)  # (B, T, M, D)
        B, T, M, D = h.shape
        self._check_rows(rows, B, T)
        if mask is not None:
            self._check_mask(mask, B, T)
            mask = mask.to(h.device)
        if conv_state is not None:
            W, C = self.conv_state_width, M * D
            if tuple(conv_state.shape) != (B, W, C):
                raise ValueError(
                    f"conv_state must have shape (B, W, M*D) = ({B}, {W}, {C}), "
                    f"got {tuple(conv_state.shape)}; create it with init_conv_state({B})"
                )

        e = self.lookup(rows, mask)  # (B, T, E)
        e = e.to(device=h.device, dtype=self.value_proj.weight.dtype)
        a = self.gate(h, e, mask)  # (B, T, M)
        v = self.value_proj(e)  # (B, T, D)
        v_gated = a.unsqueeze(-1) * v.unsqueeze(2)  # (B, T, M, D)
        live = None if mask is None else mask.view(B, T, 1, 1)
        if live is not None:
            v_gated = torch.where(live, v_gated, 0.0)

        new_state = conv_state
        if self.short_conv is not None:
            c, new_state = self.short_conv(v_gated, conv_state)  # (B, T, M, D), (B, W, C)
            y = v_gated + c  # (B, T, M, D)
        else:
            y = v_gated
        if live is not None:
            y = torch.where(live, y, 0.0)
        if hidden.dim() == 3:
            y = y.squeeze(2)  # (B, T, D)
        if conv_state is None:
            return y
        assert new_state is not None
        return y, new_state

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, n_subtables={self.n_subtables}, head_dim={self.head_dim}, "
            f"max_ngram_size={self.max_ngram_size}, hc_mult={self.hc_mult}, "
            f"signed_sqrt_gate={self.signed_sqrt_gate}, table_rows={sum(self.table_sizes)}"
        )
