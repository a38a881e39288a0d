"""The Engram layer against the reference demo (`engram_demo_v1.py`), re-implemented here.

The reference side below is written from the demo's behaviour (SPEC sections 3 and 4), with none
of this project's config classes, hasher or layer: its own multipliers and primes, its own
n-gram hash (documents hashed alone when a separator splits them), its own `MultiHeadEmbedding`
(one `nn.Embedding` with offsets), per-branch gate with `nn.RMSNorm(D)` (default epsilon),
signed-sqrt gating, the demo's `ShortConv` (padded `nn.Conv1d` truncated to T, per-branch
`nn.RMSNorm(D, eps=1e-5)`, SiLU) and the residual `value + short_conv(value)`. The same weights are
copied into both and the outputs compared at a tight tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from engram.config import EngramConfig
from engram.hashing import NgramHasher
from engram.layer import Engram

V = 1000  # compressed vocabulary
PAD = 7  # compressed pad id
SEP = 3  # compressed end-of-document id
N = 3  # max n-gram order
K = 2  # heads per order
VOCAB_SIZES = (101, 131)  # per-order size targets (orders 2, 3)
EMBED_PER_NGRAM = 16  # n_embed_per_ngram; head dim 8
D = 24  # hidden size
LAYER_IDS = (1, 3)
SEED = 5


# ------------------------------------------------------------------ the reference (demo) side
def _ref_is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def _ref_find_next_prime(start: int, seen: set[int]) -> int:
    candidate = start + 1
    while True:
        if _ref_is_prime(candidate) and candidate not in seen:
            return candidate
        candidate += 1


def ref_vocab_sizes(layer_ids: tuple[int, ...]) -> dict[int, list[list[int]]]:
    """The demo's `calculate_vocab_size_across_layers`: one global seen-set of primes."""
    seen: set[int] = set()
    out = {}
    for layer_id in layer_ids:
        per_order = []
        for n in range(2, N + 1):
            heads, start = [], VOCAB_SIZES[n - 2] - 1
            for _ in range(K):
                p = _ref_find_next_prime(start, seen)
                seen.add(p)
                heads.append(p)
                start = p
            per_order.append(heads)
        out[layer_id] = per_order
    return out


def ref_multipliers(layer_id: int) -> np.ndarray:
    half = max(1, int(np.iinfo(np.int64).max // V) // 2)
    g = np.random.default_rng(int(SEED + 10007 * layer_id))
    return g.integers(low=0, high=half, size=(N,), dtype=np.int64) * 2 + 1


def ref_hash_doc(x: np.ndarray, layer_id: int, sizes: list[list[int]]) -> np.ndarray:
    """The demo's `_get_ngram_hashes` for (B, T) compressed ids -> (B, T, (N-1)*K)."""
    T = x.shape[1]
    m = ref_multipliers(layer_id)

    def shift_k(k: int) -> np.ndarray:
        if k == 0:
            return x
        return np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=PAD)[:, :T]

    shifts = [shift_k(k) for k in range(N)]
    out = []
    for n in range(2, N + 1):
        mix = shifts[0] * m[0]
        for k in range(1, n):
            mix = np.bitwise_xor(mix, shifts[k] * m[k])
        for mod in sizes[n - 2]:
            out.append((mix % int(mod)).astype(np.int64))
    return np.stack(out, axis=2)


def ref_hash(x: np.ndarray, layer_id: int, sizes: list[list[int]], sep: int | None) -> np.ndarray:
    """Rows of a packed batch: with `sep`, every document (ending at a separator, which belongs
    to it) is hashed alone, as if it were its own sequence (SPEC section 3, resets)."""
    if sep is None:
        return ref_hash_doc(x, layer_id, sizes)
    rows = []
    for seq in x:
        cuts = [i + 1 for i, t in enumerate(seq[:-1]) if t == sep]
        docs = np.split(seq, cuts)
        rows.append(np.concatenate([ref_hash_doc(d[None], layer_id, sizes)[0] for d in docs]))
    return np.stack(rows)


class RefMultiHeadEmbedding(nn.Module):
    def __init__(self, list_of_n: list[int], dim: int) -> None:
        super().__init__()
        offsets = [0]
        for n in list_of_n[:-1]:
            offsets.append(offsets[-1] + n)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long))
        self.embedding = nn.Embedding(sum(list_of_n), dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids + self.offsets)


class RefShortConv(nn.Module):
    def __init__(self, hidden: int, kernel: int, dilation: int, hc_mult: int) -> None:
        super().__init__()
        channels = hidden * hc_mult
        self.conv = nn.Conv1d(
            channels, channels, kernel, groups=channels, bias=False,
            padding=(kernel - 1) * dilation, dilation=dilation,
        )  # fmt: skip
        self.norms = nn.ModuleList(nn.RMSNorm(hidden, eps=1e-5) for _ in range(hc_mult))
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, G, C = x.shape
        x_norm = torch.cat([self.norms[i](x[:, :, i, :]) for i in range(G)], dim=-1)
        y = self.conv(x_norm.transpose(1, 2))[..., :T]
        return self.act_fn(y).transpose(1, 2).reshape(B, T, G, C)


class RefEngram(nn.Module):
    def __init__(self, sizes: list[list[int]], hc_mult: int) -> None:
        super().__init__()
        self.hc_mult = hc_mult
        flat = [p for heads in sizes for p in heads]
        self.multi_head_embedding = RefMultiHeadEmbedding(flat, EMBED_PER_NGRAM // K)
        self.short_conv = RefShortConv(D, 4, N, hc_mult)
        memory = (N - 1) * EMBED_PER_NGRAM
        self.value_proj = nn.Linear(memory, D)
        self.key_projs = nn.ModuleList(nn.Linear(memory, D) for _ in range(hc_mult))
        self.norm1 = nn.ModuleList(nn.RMSNorm(D) for _ in range(hc_mult))
        self.norm2 = nn.ModuleList(nn.RMSNorm(D) for _ in range(hc_mult))

    def forward(self, hidden_states: torch.Tensor, hash_ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.multi_head_embedding(hash_ids).flatten(start_dim=-2)
        gates = []
        for i in range(self.hc_mult):
            normed_key = self.norm1[i](self.key_projs[i](embeddings))
            normed_query = self.norm2[i](hidden_states[:, :, i, :])
            gate = (normed_key * normed_query).sum(dim=-1) / math.sqrt(D)
            gate = gate.abs().clamp_min(1e-6).sqrt() * gate.sign()
            gates.append(gate.sigmoid().unsqueeze(-1))
        value = torch.stack(gates, dim=2) * self.value_proj(embeddings).unsqueeze(2)
        return value + self.short_conv(value)


# ------------------------------------------------------------------------------ helpers
def _project_side(hc_mult: int) -> tuple[NgramHasher, dict[int, Engram]]:
    cfg = EngramConfig(
        engram_vocab_size=VOCAB_SIZES, max_ngram_size=N, n_embed_per_ngram=EMBED_PER_NGRAM,
        n_head_per_ngram=K, layer_ids=LAYER_IDS, pad_id=PAD, seed=SEED,
    )  # fmt: skip
    hasher = NgramHasher.from_config(cfg, V, PAD)
    layers = {
        lid: Engram.from_config(cfg, D, hasher.flat_table_sizes(lid), hc_mult=hc_mult)
        for lid in LAYER_IDS
    }
    return hasher, layers


def _randomize_(ref: RefEngram, seed: int) -> None:
    """Non-trivial norms and a NON-ZERO conv so every path of the math is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "conv" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def _copy_weights(ref: RefEngram, layer: Engram) -> None:
    src = dict(ref.named_parameters())
    dst = dict(layer.named_parameters())
    src["store.weight"] = src.pop("multi_head_embedding.embedding.weight")
    assert set(src) == set(dst), (sorted(src), sorted(dst))
    with torch.no_grad():
        for name, p in dst.items():
            assert p.shape == src[name].shape, name
            p.copy_(src[name])


def _packed_ids(B: int, T: int, seed: int, with_docs: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, size=(B, T), dtype=np.int64)
    x[x == SEP] = SEP + 1
    if with_docs:  # separators mid-sequence, back to back, and at the last position
        x[0, [4, 9, 10, T - 1]] = SEP
        x[1, [1, 17]] = SEP
    return x


# -------------------------------------------------------------------------------- tests
def test_primes_and_multipliers_match_the_reference() -> None:
    hasher, _ = _project_side(1)
    ref_sizes = ref_vocab_sizes(LAYER_IDS)
    for lid in LAYER_IDS:
        assert hasher.table_sizes(lid) == ref_sizes[lid]
        np.testing.assert_array_equal(hasher.multipliers(lid), ref_multipliers(lid))


@pytest.mark.parametrize("with_docs", [False, True], ids=["no-resets", "doc-resets"])
@pytest.mark.parametrize("hc_mult", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_layer_equals_the_reference(hc_mult: int, with_docs: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    hasher, layers = _project_side(hc_mult)
    ref_sizes = ref_vocab_sizes(LAYER_IDS)
    B, T = 2, 24
    x = _packed_ids(B, T, seed=hc_mult, with_docs=with_docs)
    sep = SEP if with_docs else None
    rows = hasher.hash_layers(x, sep_id=sep)
    for i, lid in enumerate(LAYER_IDS):
        ref_rows = ref_hash(x, lid, ref_sizes[lid], sep)
        np.testing.assert_array_equal(np.asarray(rows[lid]), ref_rows)
        if with_docs:  # the reset matters: hashing straight through gives other rows
            assert not np.array_equal(ref_rows, ref_hash(x, lid, ref_sizes[lid], None))

        ref = RefEngram(ref_sizes[lid], hc_mult).to(dtype)
        _randomize_(ref, seed=10 * hc_mult + i)
        layer = layers[lid].to(dtype)
        _copy_weights(ref, layer)
        hidden = torch.randn(B, T, hc_mult, D, generator=torch.Generator().manual_seed(i))
        hidden = hidden.to(dtype)
        with torch.no_grad():
            expected = ref(hidden, torch.from_numpy(ref_rows))
            got = layer(hidden, torch.from_numpy(np.asarray(rows[lid])))
        torch.testing.assert_close(got, expected, **tol)
        # and streamed one token at a time through the conv state
        state = layer.init_conv_state(B)
        outs = []
        with torch.no_grad():
            for t in range(T):
                y, state = layer(
                    hidden[:, t : t + 1], torch.from_numpy(np.asarray(rows[lid]))[:, t : t + 1],
                    conv_state=state,
                )  # fmt: skip
                outs.append(y)
        torch.testing.assert_close(torch.cat(outs, dim=1), expected, **tol)


def test_defaults_are_the_reference_numerics() -> None:
    """Gate norms: nn.RMSNorm's default eps (None); conv norms 1e-5; projections with a bias."""
    _, layers = _project_side(4)
    ref = RefEngram(ref_vocab_sizes(LAYER_IDS)[LAYER_IDS[0]], 4)
    layer = layers[LAYER_IDS[0]]
    for mine, theirs in (
        (layer.norm1, ref.norm1),
        (layer.norm2, ref.norm2),
        (layer.short_conv.norms, ref.short_conv.norms),
    ):
        assert [n.eps for n in mine] == [n.eps for n in theirs]
    assert layer.norm1[0].eps is None and layer.short_conv.norms[0].eps == 1e-5
    assert layer.value_proj.bias is not None and all(p.bias is not None for p in layer.key_projs)


def test_model_keeps_the_reference_key_init() -> None:
    """EngramLM's key projections keep PyTorch's default nn.Linear init (the demo's):
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, not the backbone's N(0, 0.02)."""
    from engram.model import EngramLM, ModelConfig

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16,
                      ffn="dense", d_ff=32)  # fmt: skip
    ecfg = EngramConfig(engram_vocab_size=(31, 37), n_embed_per_ngram=32, n_head_per_ngram=2,
                        layer_ids=(1,), pad_id=0)  # fmt: skip
    sizes = {1: NgramHasher.from_config(ecfg, 64, 0).flat_table_sizes(1)}
    layer = EngramLM(cfg, ecfg, sizes).engram_layers()[1]
    bound = 1.0 / math.sqrt(ecfg.memory_dim)
    for proj in layer.key_projs:
        for p in (proj.weight, proj.bias):
            assert float(p.detach().abs().max()) <= bound
            assert float(p.detach().abs().max()) > 0.8 * bound  # uniform over the whole range
    assert layer.norm1[0].eps is None and layer.norm2[0].eps is None
