"""Tests of the Engram layer (engram.layer): shapes, the demo's math, masking, streaming, training."""

from __future__ import annotations

import itertools
import math
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engram.config import EngramConfig, small_config
from engram.layer import Engram, signed_sqrt
from engram.store import MemoryRowStore, RowOutOfRangeError

D = 16  # hidden size
SIZES = (11, 13, 17, 19)  # H = 4 sub-tables: orders 2..3 (N = 3), K = 2 heads
DH = 4  # head dim
N = 3  # max n-gram size = conv dilation


def make_layer(M: int = 1, *, randomize: bool = True, seed: int = 0, **kwargs: object) -> Engram:
    torch.manual_seed(seed)
    layer = Engram(D, SIZES, DH, N, M, seed=seed, **kwargs)  # type: ignore[arg-type]
    if randomize:
        randomize_(layer, seed)
    return layer


def randomize_(layer: Engram, seed: int) -> None:
    """Non-trivial norm weights and a NON-ZERO conv, so every path of the math is exercised."""
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
        if layer.short_conv is not None:
            w = layer.short_conv.conv.weight
            w.copy_(0.5 * torch.randn(w.shape, generator=gen))


def make_inputs(B: int, T: int, M: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, M, D, generator=gen)
    rows = torch.stack(
        [torch.randint(0, s, (B, T), generator=gen) for s in SIZES], dim=-1
    )  # (B, T, H)
    return hidden, rows


# ------------------------------------------------------------------ reference (the demo's forward)
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_forward(
    layer: Engram,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    *,
    live: torch.Tensor | None = None,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """engram_demo_v1.py's Engram.forward + ShortConv.forward, written out from SPEC section 4.

    hidden (B, T, M, D), rows (B, T, H) local. `live` (B, T) zeroes the gate (the masking rule).
    """
    B, T, M, Dh = hidden.shape
    sizes = list(layer.table_sizes)
    offsets = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))])
    table = layer.store.weight.detach()
    e = F.embedding(rows + offsets, table).flatten(start_dim=-2)  # MultiHeadEmbedding, (B, T, E)
    gates, raw = [], []
    for m in range(M):
        key = F.linear(e, layer.key_projs[m].weight, layer.key_projs[m].bias)
        # the gate's norms are the demo's nn.RMSNorm(D): eps=None, i.e. finfo(dtype).eps
        gate_eps = torch.finfo(key.dtype).eps
        normed_key = _rms(key, layer.norm1[m].weight, gate_eps)
        normed_query = _rms(hidden[:, :, m, :], layer.norm2[m].weight, gate_eps)
        gate = (normed_key * normed_query).sum(dim=-1) / math.sqrt(Dh)
        raw.append(gate)
        if layer.signed_sqrt_gate:
            gate = gate.abs().clamp_min(1e-6).sqrt() * gate.sign()
        gates.append(gate.sigmoid().unsqueeze(-1))
    g = torch.stack(gates, dim=2)  # (B, T, M, 1)
    if live is not None:
        g = g * live[:, :, None, None]
    value = g * F.linear(e, layer.value_proj.weight, layer.value_proj.bias).unsqueeze(2)
    if layer.short_conv is None:
        out = value
    else:
        sc = layer.short_conv
        x_norm = torch.cat([_rms(value[:, :, i, :], sc.norms[i].weight) for i in range(M)], dim=-1)
        k = sc.kernel_size
        y = F.conv1d(
            x_norm.transpose(1, 2),
            sc.conv.weight,
            padding=(k - 1) * N,
            dilation=N,
            groups=M * Dh,
        )[..., :T]
        y = F.silu(y).transpose(1, 2).reshape(B, T, M, Dh)
        out = value + y
    if return_parts:
        return out, g.squeeze(-1), torch.stack(raw, dim=-1)
    return out


# ----------------------------------------------------------------------------------------- shapes
def test_shapes_single_branch_3d_and_4d() -> None:
    layer = make_layer(1)
    hidden, rows = make_inputs(2, 7, 1)
    y3 = layer(hidden[:, :, 0, :], rows)
    y4 = layer(hidden, rows)
    assert y3.shape == (2, 7, D)
    assert y4.shape == (2, 7, 1, D)
    torch.testing.assert_close(y3, y4[:, :, 0, :], rtol=0, atol=0)


def test_shapes_four_branches() -> None:
    layer = make_layer(4)
    hidden, rows = make_inputs(3, 5, 4)
    assert layer(hidden, rows).shape == (3, 5, 4, D)
    assert layer.lookup(rows).shape == (3, 5, len(SIZES) * DH)
    assert layer.gate(hidden, layer.lookup(rows)).shape == (3, 5, 4)


@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_matches_demo_reference(M: int, signed: bool) -> None:
    layer = make_layer(M, signed_sqrt_gate=signed)
    hidden, rows = make_inputs(2, 12, M, seed=M)
    ref = reference_forward(layer, hidden, rows)
    torch.testing.assert_close(layer(hidden, rows), ref, rtol=1e-5, atol=1e-5)
    assert layer.short_conv is not None and layer.short_conv.conv.weight.abs().sum() > 0


def test_matches_reference_in_float64() -> None:
    layer = make_layer(4).double()
    hidden, rows = make_inputs(2, 10, 4)
    hidden = hidden.double()
    torch.testing.assert_close(
        layer(hidden, rows), reference_forward(layer, hidden, rows), rtol=1e-12, atol=1e-12
    )


def test_zero_initialised_conv_gives_gated_value() -> None:
    layer = make_layer(4, randomize=False)
    assert layer.short_conv is not None
    assert torch.all(layer.short_conv.conv.weight == 0)
    hidden, rows = make_inputs(2, 9, 4)
    y = layer(hidden, rows)
    e = layer.lookup(rows)
    v_gated = layer.gate(hidden, e).unsqueeze(-1) * layer.value_proj(e).unsqueeze(2)
    torch.testing.assert_close(y, v_gated, rtol=0, atol=0)


def test_without_short_conv() -> None:
    layer = make_layer(2, use_short_conv=False)
    assert layer.short_conv is None and layer.conv_state_width == 0
    hidden, rows = make_inputs(2, 6, 2)
    torch.testing.assert_close(layer(hidden, rows), reference_forward(layer, hidden, rows))
    state = layer.init_conv_state(2)
    assert state.shape == (2, 0, 2 * D)
    y, new_state = layer(hidden, rows, conv_state=state)
    assert new_state.shape == (2, 0, 2 * D)
    torch.testing.assert_close(y, layer(hidden, rows), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- gate
def test_gate_in_open_unit_interval() -> None:
    layer = make_layer(4)
    hidden, rows = make_inputs(4, 16, 4)
    a = layer.gate(10.0 * hidden, layer.lookup(rows))
    assert torch.all(a > 0) and torch.all(a < 1)


def test_signed_sqrt_switch() -> None:
    signed = make_layer(4, signed_sqrt_gate=True)
    plain = make_layer(4, signed_sqrt_gate=False)
    plain.load_state_dict(signed.state_dict())
    hidden, rows = make_inputs(2, 8, 4)
    _, _, s = reference_forward(signed, hidden, rows, return_parts=True)  # raw logits (B, T, M)
    a_signed = signed.gate(hidden, signed.lookup(rows))
    a_plain = plain.gate(hidden, plain.lookup(rows))
    torch.testing.assert_close(a_plain, torch.sigmoid(s), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        a_signed, torch.sigmoid(s.sign() * s.abs().clamp_min(1e-6).sqrt()), rtol=1e-5, atol=1e-6
    )
    # sqrt pulls |s| > 1 towards 0 and pushes |s| < 1 away from it; same side of 1/2 always.
    assert torch.equal(a_signed > 0.5, a_plain > 0.5)
    big, small = s.abs() > 1.01, (s.abs() < 0.99) & (s.abs() > 1e-3)
    assert big.any() and small.any()
    dist_signed, dist_plain = (a_signed - 0.5).abs(), (a_plain - 0.5).abs()
    assert torch.all(dist_signed[big] < dist_plain[big])
    assert torch.all(dist_signed[small] > dist_plain[small])


def test_signed_sqrt_function() -> None:
    s = torch.tensor([-4.0, -1e-9, 0.0, 1e-9, 0.25, 9.0])
    out = signed_sqrt(s)
    expected = torch.tensor([-2.0, -1e-3, 0.0, 1e-3, 0.5, 3.0])
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------------------- masking
def test_masked_positions_output_exactly_zero() -> None:
    layer = make_layer(4)
    hidden, rows = make_inputs(2, 10, 4)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 3] = mask[0, 7] = mask[1, 0] = mask[1, 9] = False
    hidden[~mask] = float("nan")  # dead positions may hold garbage ...
    rows[~mask] = -1  # ... and padding sentinels; neither may leak
    y = layer(hidden, rows, mask)
    assert torch.all(y[~mask] == 0)
    assert torch.isfinite(y).all()
    assert torch.all(layer.gate(hidden, layer.lookup(rows, mask), mask)[~mask] == 0)
    # Live positions equal the demo's math with the gate shut at the dead ones.
    ref = reference_forward(layer, torch.nan_to_num(hidden), rows.clamp_min(0), live=mask.float())
    torch.testing.assert_close(y[mask], ref[mask], rtol=1e-5, atol=1e-5)


def test_masking_does_not_change_earlier_positions() -> None:
    layer = make_layer(1)
    hidden, rows = make_inputs(2, 12, 1)
    full = layer(hidden[:, :, 0], rows)
    for t in (0, 5, 11):
        mask = torch.ones(2, 12, dtype=torch.bool)
        mask[:, t] = False
        y = layer(hidden[:, :, 0], rows, mask)
        torch.testing.assert_close(y[:, :t], full[:, :t], rtol=0, atol=1e-6)
        assert torch.all(y[:, t] == 0)
        if t + N < 12:  # a later position within the conv's reach sees the dead input
            assert not torch.allclose(y[:, t + N], full[:, t + N])


# -------------------------------------------------------------------------------------- streaming
def _stream(
    layer: Engram,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    cuts: list[int],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    state = layer.init_conv_state(hidden.shape[0])
    outs = []
    bounds = [0, *cuts, hidden.shape[1]]
    for lo, hi in itertools.pairwise(bounds):
        before = state.clone()
        chunk_mask = None if mask is None else mask[:, lo:hi]
        y, new_state = layer(hidden[:, lo:hi], rows[:, lo:hi], chunk_mask, conv_state=state)
        assert torch.equal(state, before)  # the input state is never mutated
        assert new_state.shape == (hidden.shape[0], layer.conv_state_width, layer.hc_mult * D)
        outs.append(y)
        state = new_state
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("M", [1, 4])
def test_streaming_token_by_token_equals_full(M: int) -> None:
    layer = make_layer(M)
    hidden, rows = make_inputs(2, 15, M, seed=3)
    if M == 1:
        hidden = hidden[:, :, 0]  # exercise the 3-D API too
    full = layer(hidden, rows)
    streamed = _stream(layer, hidden, rows, list(range(1, 15)))
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("M", [1, 4])
def test_streaming_chunks_with_mask_equal_full(M: int) -> None:
    layer = make_layer(M)
    hidden, rows = make_inputs(3, 14, M, seed=4)
    mask = torch.rand(3, 14, generator=torch.Generator().manual_seed(0)) > 0.3
    full = layer(hidden, rows, mask)
    torch.testing.assert_close(
        _stream(layer, hidden, rows, [2, 3, 9], mask), full, rtol=0, atol=1e-6
    )


def test_state_holds_last_normalised_inputs() -> None:
    layer = make_layer(2)
    hidden, rows = make_inputs(1, 20, 2)
    _, state = layer(hidden, rows, conv_state=layer.init_conv_state(1))
    W = (layer.kernel_size - 1) * N
    assert state.shape == (1, W, 2 * D)
    e = layer.lookup(rows)
    v_gated = layer.gate(hidden, e).unsqueeze(-1) * layer.value_proj(e).unsqueeze(2)
    assert layer.short_conv is not None
    normed = torch.cat([layer.short_conv.norms[m](v_gated[:, :, m]) for m in range(2)], dim=-1)
    torch.testing.assert_close(state, normed[:, -W:])


@cache
def _hypothesis_layer(M: int) -> Engram:
    return make_layer(M, seed=5)


@settings(max_examples=25, deadline=None)
@given(
    M=st.sampled_from([1, 4]),
    T=st.integers(1, 24),
    cuts=st.lists(st.integers(1, 23), max_size=6, unique=True),
    seed=st.integers(0, 2**16),
)
@example(M=1, T=17, cuts=[2, 9, 10], seed=17)  # 1.19e-6 apart at a value of 3.96 (2.5 ulp)
def test_streaming_any_split_equals_full(M: int, T: int, cuts: list[int], seed: int) -> None:
    """Chunked calls equal one call up to float32 rounding: chunks of other lengths take other
    vectorised/tail code paths in the matmuls and norms (with F.conv1d too), a few ulp apart,
    which the signed-sqrt gate magnifies near a zero logit (worst seen over 3,000 random cases:
    1.3e-5 at a value of -1.26, a fifth of this tolerance; a wrong conv state is off by O(1))."""
    layer = _hypothesis_layer(M)
    hidden, rows = make_inputs(2, T, M, seed=seed)
    cuts = sorted(c for c in cuts if c < T)
    with torch.no_grad():
        full = layer(hidden, rows)
        streamed = _stream(layer, hidden, rows, cuts)
        torch.testing.assert_close(streamed, full, rtol=1e-5, atol=5e-5)


def test_conv_state_shape_error() -> None:
    layer = make_layer(4)
    hidden, rows = make_inputs(2, 3, 4)
    with pytest.raises(
        ValueError, match=r"conv_state must have shape \(B, W, M\*D\) = \(2, 9, 64\)"
    ):
        layer(hidden, rows, conv_state=torch.zeros(2, 8, 64))


@pytest.mark.parametrize(
    ("B", "T", "C", "K", "dil"),
    [(2, 5, 6, 4, 2), (3, 7, 4, 1, 1), (2, 9, 8, 3, 4), (1, 1, 5, 4, 3), (16, 128, 128, 4, 3)],
)
def test_short_conv_equals_conv1d_forward_and_backward(
    B: int, T: int, C: int, K: int, dil: int
) -> None:
    """The shifted multiply-add conv (engram.layer._CausalDepthwiseConv) is F.conv1d's causal
    depthwise dilated conv: the same forward and gradients within float32 rounding."""
    from engram.layer import _CausalDepthwiseConv

    gen = torch.Generator().manual_seed(B * 1000 + T)
    xs = torch.randn(B, (K - 1) * dil + T, C, generator=gen, requires_grad=True)
    w = torch.randn(C, 1, K, generator=gen, requires_grad=True)
    g = torch.randn(B, T, C, generator=gen)
    ref = F.conv1d(xs.transpose(1, 2), w, dilation=dil, groups=C).transpose(1, 2)
    ref_x, ref_w = torch.autograd.grad(ref, (xs, w), g)
    out = _CausalDepthwiseConv.apply(xs, w, dil)
    out_x, out_w = torch.autograd.grad(out, (xs, w), g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_x, ref_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_w, ref_w, rtol=1e-5, atol=1e-4)
    if B * T * C <= 64:  # the analytic backward against finite differences, in float64
        xs64, w64 = xs.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda a, b: _CausalDepthwiseConv.apply(a, b, dil), (xs64, w64)
        )


# --------------------------------------------------------------------------------------- training
def test_sparse_gradient_only_used_rows() -> None:
    layer = make_layer(4)
    hidden, rows = make_inputs(2, 6, 4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    rows[1, 4:] = -1
    layer(hidden, rows, mask).pow(2).sum().backward()
    grad = layer.store.weight.grad
    assert grad is not None and grad.is_sparse
    offsets = torch.tensor([sum(SIZES[:i]) for i in range(len(SIZES))])
    used = set((rows + offsets)[mask].flatten().tolist())
    nonzero_rows = set(grad.to_dense().abs().sum(-1).nonzero().flatten().tolist())
    assert nonzero_rows == used
    for p in layer.dense_parameters():
        assert p.grad is not None and not p.grad.is_sparse


def test_sparse_adam_step_changes_only_used_rows() -> None:
    layer = make_layer(1)
    hidden, rows = make_inputs(2, 5, 1)
    table_opt = torch.optim.SparseAdam(layer.table_parameters(), lr=0.05)
    dense_opt = torch.optim.AdamW(list(layer.dense_parameters()), lr=0.01)
    before = layer.store.weight.detach().clone()
    layer(hidden, rows).pow(2).mean().backward()
    table_opt.step()
    dense_opt.step()
    changed = (layer.store.weight.detach() != before).any(-1).nonzero().flatten().tolist()
    offsets = torch.tensor([sum(SIZES[:i]) for i in range(len(SIZES))])
    assert changed == sorted(set((rows + offsets).flatten().tolist()))


def test_dense_store_option() -> None:
    layer = make_layer(1, sparse=False)
    hidden, rows = make_inputs(1, 3, 1)
    layer(hidden, rows).sum().backward()
    grad = layer.store.weight.grad
    assert grad is not None and not grad.is_sparse


# ---------------------------------------------------------------------------------------- errors
def test_row_out_of_range_names_subtable() -> None:
    layer = make_layer(1)
    hidden, rows = make_inputs(2, 4, 1)
    rows[1, 2, 2] = 17  # sub-table 2 has size 17
    with pytest.raises(
        RowOutOfRangeError, match=r"row id 17 for sub-table 2 \(size 17\) at batch 1, position 2"
    ):
        layer(hidden, rows)
    rows[1, 2, 2] = -3
    with pytest.raises(ValueError, match=r"row id -3 for sub-table 2 .* \[0, 17\)"):
        layer(hidden, rows)


def test_row_dtype_and_shape_errors() -> None:
    layer = make_layer(1)
    hidden, rows = make_inputs(2, 4, 1)
    with pytest.raises(TypeError, match="integer"):
        layer(hidden, rows.float())
    with pytest.raises(
        ValueError, match=r"rows must have shape \(B, T, H\) = \(2, 4, 4\).*got \(2, 4, 3\)"
    ):
        layer(hidden, rows[..., :3])
    with pytest.raises(ValueError, match=r"got \(2, 3, 4\)"):
        layer(hidden, rows[:, :3])
    with pytest.raises(ValueError, match="rows must have shape"):
        layer(hidden, rows[0])


def test_hidden_errors() -> None:
    layer1, layer4 = make_layer(1), make_layer(4)
    hidden, rows = make_inputs(2, 4, 4)
    with pytest.raises(ValueError, match=r"hc_mult M=4.*\(B, T, 4, 16\)"):
        layer4(hidden[:, :, 0], rows)
    with pytest.raises(ValueError, match=r"has 4 branches at dim 2.*hc_mult M=1"):
        layer1(hidden, rows)
    with pytest.raises(ValueError, match=r"has 2 branches at dim 2.*hc_mult M=4"):
        layer4(hidden[:, :, :2], rows)
    with pytest.raises(ValueError, match=r"expected last dim D=16, got shape \(2, 4, 4, 8\)"):
        layer4(hidden[..., :8], rows)
    with pytest.raises(ValueError, match=r"hidden must have shape"):
        layer1(hidden[0, 0], rows)
    with pytest.raises(TypeError, match="floating-point"):
        layer1(rows[..., :1].expand(2, 4, D), rows)


def test_mask_errors() -> None:
    layer = make_layer(1)
    hidden, rows = make_inputs(2, 4, 1)
    with pytest.raises(TypeError, match="bool"):
        layer(hidden, rows, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, T\) = \(2, 4\)"):
        layer(hidden, rows, torch.ones(2, 5, dtype=torch.bool))


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="table_sizes"):
        Engram(D, [], DH, N)
    with pytest.raises(ValueError, match="hc_mult"):
        Engram(D, SIZES, DH, N, 0)
    with pytest.raises(ValueError, match=r"store has shape \(60, 4\), expected .* \(60, 8\)"):
        Engram(D, SIZES, 8, N, store=MemoryRowStore(60, 4))


# ------------------------------------------------------------------------- config, params, init
def test_determinism_same_seed_same_init() -> None:
    a, b, c = make_layer(4, seed=1), make_layer(4, seed=1), make_layer(4, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["store.weight"], sc["store.weight"])
    hidden, rows = make_inputs(2, 5, 4)
    assert torch.equal(a(hidden, rows), b(hidden, rows))


def test_parameter_counts() -> None:
    M, H, k = 4, len(SIZES), 4
    layer = make_layer(M)
    E = H * DH
    assert layer.table_params() == sum(SIZES) * DH
    expected_dense = (
        (E * D + D)  # value_proj
        + M * (E * D + D)  # key_projs
        + 2 * M * D  # norm1, norm2
        + M * D * k  # depthwise conv
        + M * D  # conv norms
    )
    assert layer.dense_params() == expected_dense
    assert layer.dense_params() + layer.table_params() == sum(p.numel() for p in layer.parameters())


def test_from_config() -> None:
    cfg = small_config()
    sizes = [101, 103, 107, 109, 113, 127, 131, 137]
    layer = Engram.from_config(cfg, hidden_size=32, table_sizes=sizes, hc_mult=2)
    assert layer.head_dim == cfg.head_dim == 16
    assert layer.max_ngram_size == cfg.max_ngram_size
    assert layer.short_conv is not None and layer.short_conv.dilation == cfg.max_ngram_size
    assert layer.memory_dim == cfg.memory_dim
    assert layer.table_params() == sum(sizes) * cfg.head_dim
    hidden = torch.randn(2, 5, 2, 32)
    rows = torch.stack([torch.randint(0, s, (2, 5)) for s in sizes], dim=-1)
    assert layer(hidden, rows).shape == (2, 5, 2, 32)
    with pytest.raises(ValueError, match="8 sub-tables, got 3"):
        Engram.from_config(cfg, 32, sizes[:3])
    plain = Engram.from_config(
        EngramConfig(
            engram_vocab_size=(50, 50),
            n_embed_per_ngram=8,
            n_head_per_ngram=2,
            signed_sqrt_gate=False,
            use_short_conv=False,
        ),
        hidden_size=8,
        table_sizes=[53, 59, 61, 67],
    )
    assert not plain.signed_sqrt_gate and plain.short_conv is None


class _RecordingStore:
    """Wraps a store; remembers the id tensors given to prefetch and gather."""

    def __init__(self, inner) -> None:
        self.inner, self.prefetched, self.gathered = inner, [], []
        self.num_rows, self.dim, self.dtype = inner.num_rows, inner.dim, inner.dtype

    def prefetch(self, rows: torch.Tensor) -> None:
        self.prefetched.append(rows)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        self.gathered.append(rows)
        return self.inner.gather(rows)

    def trainable_parameters(self) -> list:
        return []

    def apply_row_update(self, rows, delta) -> None:
        raise NotImplementedError


def test_lookup_reuses_the_prefetched_ids_only_for_the_same_unchanged_tensors() -> None:
    from engram.layer import Engram

    sizes = [7, 11, 13, 5]
    layer = Engram(16, sizes, 4, 3, seed=0)
    rows = torch.stack([torch.randint(0, s, (2, 6)) for s in sizes], dim=-1)  # (B, T, H)
    expected = layer.lookup(rows).detach()
    rec = _RecordingStore(layer.store)
    layer.set_store(rec)
    assert layer.prefetch(rows)
    assert torch.equal(layer.lookup(rows), expected)
    assert rec.gathered[-1] is rec.prefetched[-1]  # the very ids, not recomputed
    assert torch.equal(layer.lookup(rows), expected)  # consumed: computed afresh
    assert rec.gathered[-1] is not rec.prefetched[-1]
    layer.prefetch(rows)
    assert torch.equal(layer.lookup(rows.clone()), expected)  # another tensor: afresh
    assert rec.gathered[-1] is not rec.prefetched[-1]
    layer.prefetch(rows)
    rows[0, 0, 0] = (rows[0, 0, 0] + 1) % sizes[0]  # written in place since the prefetch
    again = layer.lookup(rows)
    assert rec.gathered[-1] is not rec.prefetched[-1]
    assert torch.equal(again, Engram(16, sizes, 4, 3, seed=0).lookup(rows).detach())
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    layer.prefetch(rows, mask)
    assert torch.equal(layer.lookup(rows, mask), layer.lookup(rows, mask))
    assert rec.gathered[-2] is rec.prefetched[-1]
