"""`HFCausalLM`: a Hugging Face causal LM (with or without Engram) behind `EngramLM`'s interface.

Axes: B batch, T positions in this call, L Engram layers, H sub-tables per layer, V vocabulary.

engram's trainer, placement, checkpoints, evaluation, generation and analyses drive a model
through a small surface: `forward(x, rows, targets=...) -> LMOutput`, `engram_layers()`,
`table_parameters()`, `param_counts()`, `new_cache(...)`, and a few modules (`tok_emb`,
`norm`, `lm_head`, `blocks`). This module gives a `transformers` causal LM that surface, so the
same loop trains `--base` runs and engram's own models, with one build branch in
`engram.train.build_run` (`build_hf_model` below).

Design choices:
- A thin adapter, not a re-implementation: `self.hf` is the model itself, Engram attached in
  place by `engram.hf.add_engram` (hooks on the backbone). Training passes the loader's rows
  (`engram_rows=`, hashed in its background thread); the next-token loss uses the loader's
  targets (x/y are shifted windows already, so HF's own `labels` shift is not used) and, when
  the LM head is a plain bias-free `nn.Linear` (all supported families), the fused chunked
  cross-entropy of `engram.model.loss` on the backbone's last hidden state: the (B, T, V)
  logits are never built. `aux_loss` is 0 (no MoE).
- `tok_emb`, `lm_head`, `norm` (the final norm) and `blocks` (the decoder layers) are
  properties returning the HF modules, not registered submodules, so they add no second
  state-dict name; analyses that hook them (sensitivity, lens, CKA) read the real tensors.
  `embedding_output` is the module whose output is the residual stream before the first layer
  (GPT-2: the dropout after adding position embeddings).
- Checkpoints keep engram's layout: an in-RAM table is saved as
  `blocks.<id>.engram.store.weight` (state-dict hooks rename it from its module path), so table
  export, sharded checkpoints and serving read base runs unchanged. In adapter mode the frozen
  base's weights are left out of the state dict (a checkpoint holds what trained; the base is
  reloaded from its directory, whose fingerprint is checked), and loading does not report them
  missing.
- Decoding (`new_cache` + `forward(..., cache=)`): the HF KV cache plus a liveness map of its
  slots (left padding). The model hashes its own ids on that path (the attachment keeps the
  n-gram window and the conv history on the KV cache, and restarts at the first live position),
  so rows given by a caller are ignored there: `engram.generate.generate` works unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engram.hf.attach import ATTACHMENT, EngramAttachment, add_engram
from engram.hf.families import find_backbone
from engram.layer import Engram
from engram.model.loss import linear_cross_entropy
from engram.model.transformer import LMOutput, ParamCounts

if TYPE_CHECKING:
    from engram.compress import TokenizerCompressor
    from engram.run_config import RunConfig
    from engram.store.base import RowStore

# The final norm's attribute on the backbone, per family (the module the LM head reads).
FINAL_NORM = {"llama": "norm", "mistral": "norm", "qwen2": "norm", "qwen3": "norm", "gpt2": "ln_f"}
# The module whose output is the residual stream entering the first decoder layer, per family.
EMBEDDING_OUTPUT = {"gpt2": "drop"}
# engram's checkpoint name of layer <id>'s in-RAM table (`engram.checkpoint.TABLE_KEY`).
_TABLE_KEY = "blocks.{lid}.engram.store.weight"
_OWN_TABLE_KEY = f"hf.{ATTACHMENT}.layers.{{lid}}.store.weight"


@dataclass(frozen=True)
class HFShape:
    """The base's shape where engram's code reads `model.cfg` (generation, analyses)."""

    vocab_size: int  # rows of the input embedding (may exceed the tokenizer's ids)
    max_seq_len: int  # the longest sequence the base was configured for
    n_layers: int  # decoder layers
    d_model: int  # hidden size of the residual stream
    hc_mult: int = 1  # a plain residual stream (no hyper-connections)


@dataclass
class HFDecodeCache:
    """Decoding state of an `HFCausalLM`: the HF KV cache and which of its slots are live."""

    hf: Any  # transformers DynamicCache (Engram's decoding state rides on it)
    key_live: Tensor  # (B, capacity) bool: slot holds a real token (False: left padding)
    capacity: int
    length: int = 0  # slots filled

    @property
    def batch_size(self) -> int:
        return int(self.key_live.shape[0])


def _max_positions(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30  # no limit recorded


def _is_base_key(key: str) -> bool:
    """Whether a state-dict key is a base-model tensor (under `hf.`, not the attachment's)."""
    parts = key.split(".")
    if "hf" not in parts:
        return False
    i = parts.index("hf")
    return i + 1 < len(parts) and parts[i + 1] != ATTACHMENT


class HFCausalLM(nn.Module):
    """A `transformers` causal LM (Engram attached or not) driven like `engram.model.EngramLM`.

    `frozen_base` (adapter mode): the base's parameters do not train and are left out of the
    state dict (see the module docstring).
    """

    def __init__(self, hf_model: nn.Module, *, frozen_base: bool = False) -> None:
        super().__init__()
        self.hf = hf_model
        backbone = find_backbone(hf_model)
        self._model_type = backbone.model_type
        self.frozen_base = bool(frozen_base)
        config = hf_model.config
        self.cfg = HFShape(
            vocab_size=int(hf_model.get_input_embeddings().num_embeddings),
            max_seq_len=_max_positions(config),
            n_layers=len(backbone.layers),
            d_model=backbone.hidden_size,
        )
        params = inspect.signature(type(hf_model).forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.register_state_dict_post_hook(_save_hook)
        self.register_load_state_dict_pre_hook(_load_pre_hook)
        self.register_load_state_dict_post_hook(_load_post_hook)

    # ---------------------------------------------------------------------------- structure
    @property
    def attachment(self) -> EngramAttachment | None:
        att = getattr(self.hf, ATTACHMENT, None)
        return att if isinstance(att, EngramAttachment) else None

    @property
    def layer_ids(self) -> tuple[int, ...]:
        att = self.attachment
        return () if att is None else tuple(att.cfg.layer_ids)

    @property
    def backbone(self) -> nn.Module:
        return find_backbone(self.hf).module

    @property
    def tok_emb(self) -> nn.Module:
        """The input token embedding."""
        return self.hf.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        """The output layer (tied to `tok_emb` or not)."""
        return self.hf.get_output_embeddings()

    @property
    def norm(self) -> nn.Module:
        """The final norm (its output is what the LM head reads)."""
        return getattr(self.backbone, FINAL_NORM[self._model_type])

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers, in order (each returns its output hidden states)."""
        return find_backbone(self.hf).layers

    @property
    def embedding_output(self) -> nn.Module:
        """The module whose output is the residual stream before the first decoder layer."""
        name = EMBEDDING_OUTPUT.get(self._model_type)
        return self.tok_emb if name is None else getattr(self.backbone, name)

    def engram_layers(self) -> dict[int, Engram]:
        """{layer_id: Engram} in `layer_ids` order (empty without Engram)."""
        att = self.attachment
        return {} if att is None else att.engram_layers()

    def moe_layers(self) -> Iterator[nn.Module]:
        """None: the supported families have dense feed-forwards."""
        return iter(())

    def table_parameters(self) -> list[nn.Parameter]:
        """All Engram tables (the sparse optimizer group)."""
        att = self.attachment
        return [] if att is None else att.table_parameters()

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter that is not a table, each once."""
        table_ids = {id(p) for p in self.table_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in table_ids]

    def update_router_biases(self) -> None:
        """Nothing to update: no MoE router."""

    def param_counts(self) -> ParamCounts:
        """Exact counts: the base's parameters (tied ones once) plus Engram's."""
        engrams = self.engram_layers().values()
        table_ids = {id(p) for p in self.table_parameters()}
        table = sum(e.table_params() for e in engrams)
        total = sum(p.numel() for p in self.parameters() if id(p) not in table_ids) + table
        embedding = self.tok_emb.weight.numel()
        head = self.lm_head
        untied = 0 if head is None or head.weight is self.tok_emb.weight else head.weight.numel()
        active = total - table
        return ParamCounts(
            total=total,
            table=table,
            engram_dense=sum(e.dense_params() for e in engrams),
            routed_experts=0,
            inactive=0,
            active=active,
            embedding=embedding,
            non_embedding_active=active - embedding - untied,
        )

    # ------------------------------------------------------------------------------ forward
    def _fused_head(self) -> nn.Linear | None:
        head = self.lm_head
        return head if type(head) is nn.Linear and head.bias is None else None

    def forward(
        self,
        idx: Tensor,
        rows: Tensor | None = None,
        targets: Tensor | None = None,
        mask: Tensor | None = None,
        return_logits: bool | None = None,
        cache: HFDecodeCache | None = None,
    ) -> LMOutput:
        """idx (B, T) raw ids; rows (L, B, T, H) as `NgramIndexer.rows` gives them (None: the
        model hashes `idx` itself); targets (B, T), -1 ignored; mask (B, T) bool, False = dead
        (padding: attention and Engram skip it). As `EngramLM.forward`: logits by default only
        without targets; with `cache` (from `new_cache`) the call continues the cached
        sequences (rows are then hashed by the model, which keeps the n-gram window)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        B, T = idx.shape
        if cache is not None:
            return self._decode(idx, mask, cache)
        if idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {T} exceeds the base model's {self.cfg.max_seq_len} positions"
            )
        if targets is not None and tuple(targets.shape) != (B, T):
            raise ValueError(
                f"targets must have shape (B, T) = ({B}, {T}), got {tuple(targets.shape)}"
            )
        kw: dict[str, Any] = {"use_cache": False}
        if rows is not None:
            if self.attachment is None:
                raise ValueError("this model has no Engram layers, but rows were given")
            kw["engram_rows"] = rows
        if mask is not None:
            kw["attention_mask"] = mask.long()
        want_logits = targets is None if return_logits is None else return_logits
        head = self._fused_head()
        zero = torch.zeros((), device=idx.device)
        if want_logits or head is None:
            logits = self.hf(input_ids=idx, **kw).logits  # (B, T, V)
            loss = None
            if targets is not None:
                loss = F.cross_entropy(
                    logits.reshape(B * T, -1).float(), targets.reshape(B * T), ignore_index=-1
                )
            return LMOutput(logits=logits if want_logits else None, loss=loss, aux_loss=zero)
        h = self.backbone(input_ids=idx, **kw).last_hidden_state  # (B, T, D)
        loss = None
        if targets is not None:
            loss = linear_cross_entropy(
                h.reshape(B * T, -1), head.weight, targets.reshape(B * T), ignore_index=-1
            )
        return LMOutput(logits=None, loss=loss, aux_loss=zero)

    # ------------------------------------------------------------------------------ decoding
    def new_cache(
        self,
        batch_size: int,
        capacity: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> HFDecodeCache:
        """An empty decoding state for `batch_size` sequences of at most `capacity` slots."""
        from transformers import DynamicCache

        if batch_size < 1 or capacity < 1:
            raise ValueError(
                f"batch_size and capacity must be >= 1, got {batch_size} and {capacity}"
            )
        device = self.tok_emb.weight.device if device is None else device
        live = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        return HFDecodeCache(DynamicCache(config=self.hf.config), live, capacity)

    def _decode(self, idx: Tensor, mask: Tensor | None, cache: HFDecodeCache) -> LMOutput:
        B, T = idx.shape
        if self.training:
            raise ValueError("decoding with a cache needs the model in eval mode (model.eval())")
        if cache.batch_size != B:
            raise ValueError(f"cache holds {cache.batch_size} sequences, idx has {B}")
        if cache.length + T > cache.capacity:
            raise ValueError(
                f"cache capacity {cache.capacity} exceeded: {cache.length} slots used, {T} more "
                "requested; make the cache with a larger capacity"
            )
        live = torch.ones(B, T, dtype=torch.bool, device=idx.device) if mask is None else mask
        end = cache.length + T
        cache.key_live[:, cache.length : end] = live
        attention = cache.key_live[:, :end].long()  # (B, end)
        positions = (attention.cumsum(-1) - 1).clamp_min(0)[:, cache.length : end]  # (B, T)
        out = self.hf(
            input_ids=idx, attention_mask=attention, position_ids=positions, use_cache=True,
            **{self._cache_kwarg: cache.hf},
        )  # fmt: skip
        cache.length = end
        return LMOutput(logits=out.logits, loss=None, aux_loss=torch.zeros((), device=idx.device))


# ----------------------------------------------------------------------- state-dict layout
def _save_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, meta: Any) -> None:
    assert isinstance(module, HFCausalLM)
    for lid in module.layer_ids:
        own = prefix + _OWN_TABLE_KEY.format(lid=lid)
        if own in state_dict:
            state_dict[prefix + _TABLE_KEY.format(lid=lid)] = state_dict.pop(own)
    if module.frozen_base:
        for key in [k for k in state_dict if k.startswith(prefix) and _is_base_key(k)]:
            del state_dict[key]


def _load_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    assert isinstance(module, HFCausalLM)
    for lid in module.layer_ids:
        saved = prefix + _TABLE_KEY.format(lid=lid)
        if saved in state_dict:
            state_dict[prefix + _OWN_TABLE_KEY.format(lid=lid)] = state_dict.pop(saved)


def _load_post_hook(module: nn.Module, incompatible: Any) -> None:
    assert isinstance(module, HFCausalLM)
    if module.frozen_base:  # the base comes from its directory, not from the checkpoint
        kept = [k for k in incompatible.missing_keys if not _is_base_key(k)]
        incompatible.missing_keys[:] = kept


# ------------------------------------------------------------------------------- building
def build_hf_model(
    run_cfg: RunConfig,
    tokenizer: Any,
    compressor: TokenizerCompressor,
    eot_id: int,
    stores: Mapping[int, RowStore] | None = None,
    hash_fingerprint: str | None = None,
) -> HFCausalLM:
    """The `HFCausalLM` of a run config with a `base` section (see `engram.train.build_run`).

    Loads the base from its directory (checking the recorded fingerprint), refuses a tokenizer
    with more ids than the base's embedding or a sequence longer than its positions, attaches
    Engram when the run has an engram section (document separator and pad = the tokenizer's
    end-of-document id, `stores` serving tables from elsewhere) and freezes the base in adapter
    mode. Seeded by `train.seed` (Engram's projections), without touching the global RNG.
    `hash_fingerprint` (the run indexer's) is checked against the attached Engram's hashing.
    """
    from engram.compress import tokenizer_vocab_size
    from engram.hf.base import check_base, load_base_model
    from engram.run_config import ConfigError

    base = run_cfg.base
    info = check_base(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run_cfg.train.seed)
        hf = load_base_model(info, base.dtype)
        name = type(hf).__name__
        vocab = int(hf.get_input_embeddings().num_embeddings)
        tok_vocab = tokenizer_vocab_size(tokenizer)
        if tok_vocab > vocab:
            raise ConfigError(
                f"the tokenizer (data.tokenizer={run_cfg.data.tokenizer!r}) has {tok_vocab:,} ids "
                f"but the base model {name} at {base.path!r} embeds {vocab:,}: it is not this "
                "model's tokenizer"
            )
        limit = _max_positions(hf.config)
        if run_cfg.data.seq_len > limit:
            raise ConfigError(
                f"data.seq_len={run_cfg.data.seq_len} exceeds the base model's {limit} positions "
                f"({name}); use --set data.seq_len={limit} or less"
            )
        if run_cfg.engram is not None:
            try:
                add_engram(
                    hf, run_cfg.engram, tokenizer, train_base=base.train_base, stores=stores,
                    table_std=run_cfg.train.table_std, sep_id=eot_id, compressor=compressor,
                )  # fmt: skip
            except ValueError as e:
                raise ConfigError(f"base model {base.path!r}: {e}") from None
            att = getattr(hf, ATTACHMENT)
            if hash_fingerprint is not None and att.fingerprint() != hash_fingerprint:
                raise RuntimeError(
                    "the attached Engram hashes differently from the run's indexer "
                    f"({att.fingerprint()[:12]} vs {hash_fingerprint[:12]})"
                )
        else:
            for p in hf.parameters():
                p.requires_grad_(base.train_base)
    return HFCausalLM(hf, frozen_base=not base.train_base)
