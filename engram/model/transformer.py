"""The Engram language model: pre-norm transformer blocks, optional Engram layers, exact counts.

Axes used in shape comments: B batch, T time, D d_model, M hyper-connection branches (hc_mult),
V vocab, L Engram layers, H sub-tables per Engram layer.

Design choices:
- A block is: [Engram] -> attention -> FFN/MoE. An Engram layer, where present, runs FIRST on the
  residual stream and its output is added to it (SPEC section 1: h <- h + Y, then the block's
  attention and MoE run as usual); with M > 1 it reads all branches (B, T, M, D), gates each one
  separately and its output is added branch-wise.
- Residual: M == 1 is the plain pre-norm residual h + f(norm(h)) on (B, T, D); M > 1 keeps
  (B, T, M, D) with a `HyperConnection` around each sublayer (the sublayer still sees
  norm(x) of its width-mixed input). The embedding is copied to the M branches; the branches
  are summed before the final norm.
- The Engram layer is an attribute of its block (`blocks.<i>.engram`, table at
  `blocks.<i>.engram.store.weight`), so parameter names are stable and a table is found by
  `table_parameters()`. Engram layers initialise themselves (tables from their own seed
  `engram_cfg.seed + layer_id`, zero conv); the backbone init never touches them.
- Backbone init: normal(0, init_std) for every Linear and the embedding, the output projections
  (attention wo and every SwiGLU's w2) scaled by 1/sqrt(2*n_layers) like GPT-2; norms ones.
  The whole construction runs under a forked CPU RNG seeded with `seed`, so the same seed gives
  bit-identical weights without disturbing the caller's global RNG.
- `forward` returns the cross-entropy `loss` and the MoE balance `aux_loss` SEPARATELY; the
  training objective is `loss + aux_loss`.
- Parameter accounting has two independent implementations: `EngramLM.param_counts()` counts
  the instantiated modules; `count_params` computes the same numbers from the configs alone
  (for planners with tables too large to build). Tests hold them equal.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engram.config import EngramConfig
from engram.layer import Engram
from engram.model.attention import CausalSelfAttention, KVCache
from engram.model.cache import DecodeCache, new_positions
from engram.model.config import ModelConfig
from engram.model.ffn import MoE, SwiGLU
from engram.model.hyper import HyperConnection
from engram.model.loss import linear_cross_entropy
from engram.store.base import RowStore


@dataclass
class LMOutput:
    """What `EngramLM.forward` returns."""

    logits: Tensor | None  # (B, T, V); None when only the loss was asked for
    loss: Tensor | None  # mean cross-entropy over targets != -1, or None without targets
    aux_loss: Tensor  # scalar: MoE balance loss averaged over MoE layers (0 without MoE)


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts (numbers of values). Tied embeddings count once."""

    total: int  # every unique parameter value, tables included
    table: int  # Engram table values
    engram_dense: int  # Engram projections, norms and short conv
    routed_experts: int  # all routed-expert values, over all MoE layers
    inactive: int  # per MoE layer (E - k) * 3 * D * d_expert, summed
    active: int  # total - table - inactive
    embedding: int  # token embedding values
    non_embedding_active: int  # active - embedding - (untied lm_head)


class Block(nn.Module):
    """[Engram] + pre-norm causal attention + pre-norm FFN or MoE (through hyper-connections if M > 1)."""

    def __init__(self, cfg: ModelConfig, layer_index: int, engram: Engram | None = None) -> None:
        super().__init__()
        D, M = cfg.d_model, cfg.hc_mult
        self.layer_index = layer_index
        self.hc_mult = M
        if engram is not None and (engram.hidden_size != D or engram.hc_mult != M):
            raise ValueError(
                f"Engram layer has hidden_size={engram.hidden_size}, hc_mult={engram.hc_mult}; "
                f"the backbone has d_model={D}, hc_mult={M}"
            )
        self.engram = engram
        self.attn_norm = nn.RMSNorm(D, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(D, cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.ffn_norm = nn.RMSNorm(D, eps=cfg.norm_eps)
        self.ffn: MoE | SwiGLU = MoE(cfg) if cfg.is_moe_layer(layer_index) else SwiGLU(D, cfg.d_ff)
        if M > 1:
            self.hc_attn = HyperConnection(D, M, 2 * layer_index, cfg.hc_dynamic, cfg.norm_eps)
            self.hc_ffn = HyperConnection(D, M, 2 * layer_index + 1, cfg.hc_dynamic, cfg.norm_eps)

    def _ffn(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, T, D) -> (FFN(norm(x)) (B, T, D), aux loss scalar)."""
        x = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            return self.ffn(x)
        return self.ffn(x), x.new_zeros(())

    def forward(
        self,
        h: Tensor,
        rows: Tensor | None = None,
        mask: Tensor | None = None,
        positions: int | Tensor = 0,
        cache: DecodeCache | None = None,
    ) -> tuple[Tensor, Tensor]:
        """h (B, T, D) if M == 1 else (B, T, M, D); rows (B, T, H) for the Engram layer.

        With `cache` (decoding), attention reads and extends this block's KV cache and the
        Engram layer continues from (and replaces) its conv state. Returns (h', aux_loss) with
        h' shaped like h.
        """
        if self.engram is not None:
            if rows is None:
                raise ValueError(
                    f"block {self.layer_index} has an Engram layer: rows (B, T, H) are required"
                )
            if cache is None:
                h = h + self.engram(h, rows, mask)
            else:
                y, cache.conv[self.layer_index] = self.engram(
                    h, rows, mask, conv_state=cache.conv[self.layer_index]
                )
                h = h + y

        def attend(x: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D)
            if cache is None:
                return self.attn(self.attn_norm(x), positions)
            return self.attn(
                self.attn_norm(x),
                positions,
                kv=cache.kv[self.layer_index],
                start=cache.length,
                key_live=cache.key_live,
            )

        if self.hc_mult == 1:
            h = h + attend(h)  # (B, T, D)
            y, aux = self._ffn(h)
            return h + y, aux
        x, ctx = self.hc_attn.width(h)  # (B, T, D)
        h = self.hc_attn.depth(attend(x), ctx)  # (B, T, M, D)
        x, ctx = self.hc_ffn.width(h)
        y, aux = self._ffn(x)
        return self.hc_ffn.depth(y, ctx), aux


class EngramLM(nn.Module):
    """A decoder-only LM with Engram memory layers at `engram_cfg.layer_ids` (0-based blocks).

    Args:
        cfg: the backbone.
        engram_cfg: the memory; None builds the plain backbone (the baseline).
        table_sizes: `{layer_id: flat sub-table sizes}` from `NgramHasher.flat_table_sizes`.
        table_std: init std of the tables (1.0 like `nn.Embedding`).
        seed: seed of the backbone init (the tables use `engram_cfg.seed + layer_id`).
        stores: `{layer_id: RowStore}` serving those layers' rows instead of a fresh in-RAM
            table (e.g. an mmap'd table file larger than RAM); such tables are never allocated.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        engram_cfg: EngramConfig | None = None,
        table_sizes: Mapping[int, Sequence[int]] | None = None,
        *,
        table_std: float = 1.0,
        seed: int = 0,
        stores: Mapping[int, RowStore] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.engram_cfg = engram_cfg
        self.layer_ids: tuple[int, ...] = () if engram_cfg is None else engram_cfg.layer_ids
        _check_engram_layout(cfg, engram_cfg, table_sizes, "table_sizes")
        stores = dict(stores or {})
        extra = sorted(set(stores) - set(self.layer_ids))
        if extra:
            raise ValueError(f"stores given for layers {extra}, which have no Engram layer")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            engrams: dict[int, Engram] = {}
            if engram_cfg is not None:
                assert table_sizes is not None
                for lid in engram_cfg.layer_ids:
                    engrams[lid] = Engram.from_config(
                        engram_cfg,
                        cfg.d_model,
                        table_sizes[lid],
                        hc_mult=cfg.hc_mult,
                        seed=engram_cfg.seed + lid,
                        norm_eps=cfg.norm_eps,
                        table_std=table_std,
                        store=stores.get(lid),
                    )
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.blocks = nn.ModuleList(Block(cfg, i, engrams.get(i)) for i in range(cfg.n_layers))
            self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.lm_head.weight = self.tok_emb.weight
            self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        std = self.cfg.init_std
        skip = {id(m) for e in self.engram_layers().values() for m in e.modules()}
        if self.cfg.tie_embeddings:
            skip.add(id(self.lm_head))  # its weight is the embedding's, initialised once
        for module in self.modules():
            if id(module) in skip:
                continue
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.wo.weight, 0.0, out_std)
            for module in block.ffn.modules():
                if isinstance(module, SwiGLU):
                    nn.init.normal_(module.w2.weight, 0.0, out_std)
        # Engram's projections keep the demo's init, PyTorch's default nn.Linear (drawn when the
        # layer was built, under this model's seed); tables and the zero conv keep their own.
        # `engram_value_init="zero"` starts the value projection (what the layer writes into
        # the residual stream) at zero instead, so at init the Engram model computes exactly
        # what its backbone does. The default, by measurement (docs/numerics.md): with N(0, 1)
        # tables the demo's init writes a signal far above the token embedding's and the model
        # trails its MoE baseline; with small (std 0.1) tables "reference" learns faster.
        if self.cfg.engram_value_init == "zero":
            for layer in self.engram_layers().values():
                nn.init.zeros_(layer.value_proj.weight)
                nn.init.zeros_(layer.value_proj.bias)

    # ---------------------------------------------------------------------------- structure
    def engram_layers(self) -> dict[int, Engram]:
        """{layer_id: Engram} in `layer_ids` order."""
        return {lid: self.blocks[lid].engram for lid in self.layer_ids}

    def moe_layers(self) -> Iterator[MoE]:
        """Every MoE feed-forward, in block order."""
        for block in self.blocks:
            if isinstance(block.ffn, MoE):
                yield block.ffn

    def table_parameters(self) -> list[nn.Parameter]:
        """All Engram tables (the sparse optimizer group)."""
        return [p for e in self.engram_layers().values() for p in e.table_parameters()]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every other parameter, each once (a tied weight appears once)."""
        table_ids = {id(p) for p in self.table_parameters()}
        return [p for p in self.parameters() if id(p) not in table_ids]

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """Apply the aux-loss-free bias update to every MoE (call after each optimizer step)."""
        rate = self.cfg.router_bias_update
        if rate == 0:
            return
        for moe in self.moe_layers():
            moe.update_router_bias(rate)

    # ----------------------------------------------------------------------------- counting
    def param_counts(self) -> ParamCounts:
        """Exact counts from the instantiated modules (cf. the analytic `count_params`)."""
        engrams = self.engram_layers().values()
        table = sum(e.table_params() for e in engrams)
        total = sum(p.numel() for p in self.dense_parameters()) + table
        engram_dense = sum(e.dense_params() for e in engrams)
        routed = inactive = 0
        for moe in self.moe_layers():
            per_expert = [sum(p.numel() for p in ex.parameters()) for ex in moe.experts]
            routed += sum(per_expert)
            inactive += (moe.n_experts - moe.top_k) * per_expert[0]
        active = total - table - inactive
        embedding = self.tok_emb.weight.numel()
        untied_head = (
            0 if self.lm_head.weight is self.tok_emb.weight else self.lm_head.weight.numel()
        )
        return ParamCounts(
            total=total,
            table=table,
            engram_dense=engram_dense,
            routed_experts=routed,
            inactive=inactive,
            active=active,
            embedding=embedding,
            non_embedding_active=active - embedding - untied_head,
        )

    # ------------------------------------------------------------------------------ decoding
    def new_cache(
        self,
        batch_size: int,
        capacity: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> DecodeCache:
        """An empty `DecodeCache` for `batch_size` sequences of at most `capacity` slots."""
        if batch_size < 1 or capacity < 1:
            raise ValueError(
                f"batch_size and capacity must be >= 1, got {batch_size} and {capacity}"
            )
        ref = self.tok_emb.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        cfg = self.cfg
        kv = [
            KVCache.empty(
                batch_size, cfg.n_heads, capacity, cfg.head_dim, device=device, dtype=dtype
            )
            for _ in range(cfg.n_layers)
        ]
        conv = {
            lid: e.init_conv_state(batch_size, device, dtype)
            for lid, e in self.engram_layers().items()
        }
        return DecodeCache(
            kv=kv,
            conv=conv,
            key_live=torch.zeros(batch_size, capacity, dtype=torch.bool, device=device),
            n_live=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    # ------------------------------------------------------------------------------ forward
    def _check_rows(self, rows: Tensor | Sequence[Tensor] | None, B: int, T: int) -> None:
        if not self.layer_ids:
            if rows is not None:
                raise ValueError("this model has no Engram layers, but rows were given")
            return
        assert self.engram_cfg is not None
        L, H = len(self.layer_ids), self.engram_cfg.n_subtables
        expected = f"(L, B, T, H) = ({L}, {B}, {T}, {H})"
        if rows is None:
            raise ValueError(
                f"this model has Engram layers at blocks {list(self.layer_ids)}: pass rows of "
                f"shape {expected} in layer_ids order, as NgramHasher.hash_all returns"
            )
        if isinstance(rows, (tuple, list)):  # one (B, T, H) tensor per Engram layer
            shapes = [tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__ for r in rows]
            if len(rows) != L or any(sh != (B, T, H) for sh in shapes):
                raise ValueError(
                    f"rows given as a sequence must hold {L} tensors of shape (B, T, H) = "
                    f"({B}, {T}, {H}) (layer_ids {list(self.layer_ids)}), got {shapes}"
                )
            return
        if not isinstance(rows, Tensor):
            raise TypeError(f"rows must be a torch.Tensor, got {type(rows).__name__}")
        if tuple(rows.shape) != (L, B, T, H):
            raise ValueError(
                f"rows must have shape {expected} (layer_ids {list(self.layer_ids)}), "
                f"got {tuple(rows.shape)}"
            )

    def forward(
        self,
        idx: Tensor,
        rows: Tensor | Sequence[Tensor] | None = None,
        targets: Tensor | None = None,
        mask: Tensor | None = None,
        return_logits: bool | None = None,
        cache: DecodeCache | None = None,
    ) -> LMOutput:
        """idx (B, T) raw token ids; rows (L, B, T, H) from `NgramHasher.hash_all` (or a
        sequence of L (B, T, H) tensors: each reaches its layer as the same object, so a layer
        recognises the ids it was asked to prefetch);
        targets (B, T) with -1 = ignored; mask (B, T) bool, False = dead position for Engram.

        `return_logits` defaults to True without targets and False with them: the loss is then
        computed by the fused chunked output layer (`engram.model.loss`), which never builds
        the (B, T, V) logits; pass True to get both.

        With `cache` (from `new_cache`), the call continues the cached sequences: its tokens fill
        the next T slots, `mask` False marks padding (left padding for prompts of different
        lengths), which no live token attends to and which does not advance positions. The cache
        is updated in place.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        B, T = idx.shape
        positions: int | Tensor = 0
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache holds {cache.batch_size} sequences, idx has {B}")
            if cache.length + T > cache.capacity:
                raise ValueError(
                    f"cache capacity {cache.capacity} exceeded: {cache.length} slots used, "
                    f"{T} more requested; make the cache with a larger capacity"
                )
            live = torch.ones(B, T, dtype=torch.bool, device=idx.device) if mask is None else mask
            cache.key_live[:, cache.length : cache.length + T] = live
            positions = new_positions(cache, live)  # (B, T)
        elif idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}; "
                f"raise ModelConfig.max_seq_len"
            )
        self._check_rows(rows, B, T)
        if targets is not None and tuple(targets.shape) != (B, T):
            raise ValueError(
                f"targets must have shape (B, T) = ({B}, {T}), got {tuple(targets.shape)}"
            )
        slot = {lid: i for i, lid in enumerate(self.layer_ids)}

        h = self.tok_emb(idx)  # (B, T, D)
        M = self.cfg.hc_mult
        if M > 1:
            h = h.unsqueeze(2).expand(B, T, M, self.cfg.d_model)  # (B, T, M, D)
        aux_total = h.new_zeros(())
        for i, block in enumerate(self.blocks):
            block_rows = rows[slot[i]] if i in slot else None  # (B, T, H)
            h, aux = block(h, block_rows, mask, positions, cache)
            aux_total = aux_total + aux
        if cache is not None:
            cache.length += T
        if M > 1:
            h = h.sum(dim=2)  # (B, T, D)
        h = self.norm(h)  # (B, T, D)
        want_logits = targets is None if return_logits is None else return_logits
        logits = self.lm_head(h) if want_logits else None  # (B, T, V)

        n_moe = self.cfg.n_moe_layers
        aux_loss = aux_total / n_moe if n_moe else aux_total
        loss = None
        if targets is not None and logits is not None:
            loss = F.cross_entropy(
                logits.reshape(B * T, -1).float(), targets.reshape(B * T), ignore_index=-1
            )
        elif targets is not None:
            loss = linear_cross_entropy(
                h.reshape(B * T, -1), self.lm_head.weight, targets.reshape(B * T), ignore_index=-1
            )
        return LMOutput(logits=logits, loss=loss, aux_loss=aux_loss)


# -------------------------------------------------------------------------------- analytic
_SOURCE = {"table_sizes": "flat_table_sizes(layer_id)", "table_rows": "total_rows(layer_id)"}


def _check_engram_layout(
    cfg: ModelConfig,
    engram_cfg: EngramConfig | None,
    per_layer: Mapping[int, object] | None,
    what: str,
) -> None:
    """Layer ids within the backbone (0-based) and one entry of `per_layer` per Engram layer."""
    if engram_cfg is None:
        return
    bad = [lid for lid in engram_cfg.layer_ids if lid >= cfg.n_layers]
    if bad:
        raise ValueError(
            f"Engram layer_ids {bad} are out of range for n_layers={cfg.n_layers}: layer ids are "
            f"0-based block indices in [0, {cfg.n_layers}) (the paper's 'layer 2' is index 1)"
        )
    if per_layer is None:
        raise ValueError(
            f"{what} is required with an Engram config: one entry per Engram layer "
            f"{list(engram_cfg.layer_ids)} (from NgramHasher.{_SOURCE[what]})"
        )
    missing = [lid for lid in engram_cfg.layer_ids if lid not in per_layer]
    if missing:
        raise ValueError(
            f"{what} is missing Engram layers {missing}; "
            f"got layers {sorted(per_layer)}, expected {list(engram_cfg.layer_ids)}"
        )


def _hc_params(cfg: ModelConfig) -> int:
    """Parameters of ONE HyperConnection (0 when M == 1: no hyper-connections)."""
    M, D = cfg.hc_mult, cfg.d_model
    if M == 1:
        return 0
    static = M * (M + 1) + M
    dynamic = D + D * (M + 1) + D + 2 if cfg.hc_dynamic else 0  # norm, W_alpha, W_beta, scales
    return static + dynamic


def _engram_dense_params(cfg: ModelConfig, engram_cfg: EngramConfig) -> int:
    """Dense parameters of ONE Engram layer: projections (with bias), norms, short conv."""
    M, D, E = cfg.hc_mult, cfg.d_model, engram_cfg.memory_dim
    projections = (M + 1) * (E * D + D)  # M key projections + one value projection
    norms = 2 * M * D  # norm1 (keys) and norm2 (queries) per branch
    conv = M * D * engram_cfg.kernel_size + M * D if engram_cfg.use_short_conv else 0
    return projections + norms + conv


def count_params(
    cfg: ModelConfig,
    engram_cfg: EngramConfig | None = None,
    table_rows: Mapping[int, int] | None = None,
) -> ParamCounts:
    """The counts of `EngramLM(cfg, engram_cfg, ...).param_counts()` without building the model.

    `table_rows[layer_id]` = total rows of that layer's flat table (`NgramHasher.total_rows`).
    """
    _check_engram_layout(cfg, engram_cfg, table_rows, "table_rows")
    D, V = cfg.d_model, cfg.vocab_size
    E, k = cfg.n_routed_experts, cfg.moe_top_k
    expert = 3 * D * cfg.d_expert
    n_moe = cfg.n_moe_layers
    n_dense = cfg.n_layers - n_moe

    attn = 4 * D * D + 2 * D  # q, k, v, o + the two pre-norms
    moe = D * E + E * expert + 3 * D * cfg.n_shared_experts * cfg.d_expert  # router, routed, shared
    dense_ffn = 3 * D * cfg.d_ff
    backbone = (
        cfg.n_layers * (attn + 2 * _hc_params(cfg))
        + n_moe * moe
        + n_dense * dense_ffn
        + V * D  # token embedding
        + D  # final norm
        + (0 if cfg.tie_embeddings else V * D)  # untied LM head
    )
    table = engram_dense = 0
    if engram_cfg is not None:
        assert table_rows is not None
        table = sum(int(table_rows[lid]) for lid in engram_cfg.layer_ids) * engram_cfg.head_dim
        engram_dense = len(engram_cfg.layer_ids) * _engram_dense_params(cfg, engram_cfg)
    total = backbone + engram_dense + table
    inactive = n_moe * (E - k) * expert
    active = total - table - inactive
    return ParamCounts(
        total=total,
        table=table,
        engram_dense=engram_dense,
        routed_experts=n_moe * E * expert,
        inactive=inactive,
        active=active,
        embedding=V * D,
        non_embedding_active=active - V * D - (0 if cfg.tie_embeddings else V * D),
    )


def flops_per_token(cfg: ModelConfig, engram_cfg: EngramConfig | None, seq_len: int) -> int:
    """Forward FLOPs per token (1 multiply-accumulate = 2 FLOPs) at sequence length `seq_len`.

    2 * (multiply-accumulates of every weight applied to a token's activations):
      - attention q, k, v, o: 4*D^2 per block;
      - dense SwiGLU: 3*D*d_ff; MoE: router D*E + k routed experts k*3*D*d_expert + shared
        experts 3*D*n_shared*d_expert;
      - LM head V*D (tied or not);
      - Engram (per layer): M key projections and one value projection M*E_mem*D + E_mem*D, the
        depthwise short conv kernel*M*D;
      - hyper-connections (M > 1, per sublayer = 2 per block): the width mixing M*(M+1)*D, and
        if dynamic the projections M*D*(M+1) (W_alpha) + M*D (W_beta);
    plus the attention scores and weighted values: QK^T and AV each cost 2*ctx*D FLOPs per token
    per layer at context ctx; with the causal average ctx = seq_len/2 that is
    2 * 2 * n_layers * (seq_len/2) * D = 2 * n_layers * seq_len * D.
    NOT counted: the embedding lookup, table gathers, norms, activations, softmax, the gate
    dot products, biases, the depth connection's beta scaling and residual additions.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    D, V, M = cfg.d_model, cfg.vocab_size, cfg.hc_mult
    n_moe = cfg.n_moe_layers
    macs = cfg.n_layers * 4 * D * D
    macs += (cfg.n_layers - n_moe) * 3 * D * cfg.d_ff
    macs += n_moe * (
        D * cfg.n_routed_experts
        + cfg.moe_top_k * 3 * D * cfg.d_expert
        + 3 * D * cfg.n_shared_experts * cfg.d_expert
    )
    macs += V * D
    if M > 1:
        per_sublayer = M * (M + 1) * D + (M * D * (M + 1) + M * D if cfg.hc_dynamic else 0)
        macs += 2 * cfg.n_layers * per_sublayer
    if engram_cfg is not None:
        E_mem = engram_cfg.memory_dim
        per_layer = (M + 1) * E_mem * D
        if engram_cfg.use_short_conv:
            per_layer += engram_cfg.kernel_size * M * D
        macs += len(engram_cfg.layer_ids) * per_layer
    attention = 2 * cfg.n_layers * seq_len * D
    return 2 * macs + attention
