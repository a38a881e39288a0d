"""`add_engram`: Engram layers inside a Hugging Face causal LM, which stays a normal model.

Axes: B batch, T positions in this call, L Engram layers, H sub-tables per layer, D hidden.

Data flow of one forward (no module-level state; everything hangs off the model):
    backbone pre-hook: input_ids (B, T) --compress--> --hash (resets)--> rows (L, B, T, H)
                       attention_mask[:, -T:] --> live (B, T);  both kept on `model.engram`
                       for the duration of this call only
    layer-i pre-hook:  h <- h + Engram_i(h, rows[i], live[, conv state])  (before attention)
    backbone post-hook: commit the decoding state, forget the call

Design choices:
- Residual add before the decoder layer (so before its attention), the paper's placement, as a
  forward pre-hook on the layer: the model's own classes, `forward`, `generate`,
  `save_pretrained` and `num_parameters` keep working. The value projection starts at zero
  (and the short conv is zero-initialised), so right after `add_engram` every logit is
  bit-identical to the base model's.
- Ids become rows exactly as in the built-in pipeline: the model's tokenizer's
  `TokenizerCompressor`, then `NgramHasher` (reference-exact). A new document starts after the
  end-of-document id (the model's `eos_token_id`; compared after compression, as
  `NgramIndexer` does, so any id that compresses to it ends a document too) and at the first live position after padding,
  so left and right padding give each sequence the rows it has alone. Ids the model knows but
  the tokenizer does not (an embedding padded past the vocabulary) read as the pad id.
- Decoding state lives on the KV cache object (`cache.engram_state`), so it has the cache's
  lifetime and a fresh cache is a fresh sequence: the hash window, the last id and liveness of
  each sequence and every layer's conv history. It is computed on a copy and committed only when
  the forward returns. `model._reorder_cache` (which `generate` calls for beam search) reorders
  it with the KV cache. A cache whose length differs from the state's (cropped, as assisted
  decoding does, or filled without Engram) is refused rather than decoded wrongly.
- A caller that already has the rows (engram's trainer hashes in a background thread) passes
  `engram_rows=(L, B, T, H)` to the model's forward; they reach the backbone hook through the
  model's `**kwargs` and bypass hashing.
- Activation checkpointing: `transformers` checkpoints a layer's `forward`, so the hooks run
  once, outside; a wrapper that checkpoints the module call (torch's `checkpoint_wrapper`,
  FSDP's) reruns the hook during backward, after the forward returned. For that the hook keeps the last grad-enabled forward's call keyed by the layer's input tensor
  (storage and shape), which the rerun passes again; the next grad-enabled forward drops them.
- Engram computes in its own dtype (float32 by default) and casts its output to the stream's.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from engram.addressing import constant_rows
from engram.compress import TokenizerCompressor, tokenizer_vocab_size
from engram.config import EngramConfig
from engram.hashing import HashStream, NgramHasher
from engram.hf.families import Backbone, find_backbone
from engram.layer import Engram
from engram.store.base import RowStore

STATE_ATTR = "engram_state"
ATTACHMENT = "engram"
ROWS_KWARG = "engram_rows"


@dataclass
class EngramDecodeState:
    """What decoding needs across calls, per sequence; reorders with beams."""

    stream: HashStream  # hash window over compressed ids, (B, N-1)
    last_raw: np.ndarray  # (B,) the last raw id seen (-1 at the start)
    last_live: np.ndarray  # (B,) whether the last position was live (True at the start)
    conv: dict[int, Tensor]  # layer id -> (B, W, M*D) conv history
    length: int = 0  # positions consumed, == the KV cache's length

    def copy(self) -> EngramDecodeState:
        B = self.last_raw.shape[0]
        return EngramDecodeState(
            self.stream.reorder(np.arange(B)), self.last_raw.copy(), self.last_live.copy(),
            dict(self.conv), self.length,
        )  # fmt: skip

    def reorder(self, index: Tensor | np.ndarray) -> None:
        """Keep sequences `index` (beam search), in place."""
        idx = torch.as_tensor(index).cpu().numpy().astype(np.int64)
        self.stream = self.stream.reorder(idx)
        self.last_raw = self.last_raw[idx]
        self.last_live = self.last_live[idx]
        self.conv = {k: v[torch.as_tensor(idx, device=v.device)] for k, v in self.conv.items()}


@dataclass
class _Call:
    rows: Tensor  # (L, B, T, H) local row ids
    live: Tensor | None  # (B, T) bool, None = all live
    state: EngramDecodeState | None  # the working copy, committed on success
    target: Any = None  # the cache the state belongs to
    new_conv: dict[int, Tensor] = field(default_factory=dict)


class EngramAttachment(nn.Module):
    """The Engram layers of a Hugging Face model and the index math that feeds them.

    Registered on the causal LM as `model.engram`; `layers[str(layer_id)]` is an `Engram`.
    """

    def __init__(
        self,
        cfg: EngramConfig,
        compressor: TokenizerCompressor,
        hidden_size: int,
        *,
        sep_id: int | None,
        stores: Mapping[int, RowStore] | None = None,
        table_std: float = 1.0,
    ) -> None:
        super().__init__()
        if cfg.addressing == "position":
            raise ValueError(
                "engram.addressing='position' needs stream positions, which a Hugging Face "
                "model does not pass; use 'ngram' or the 'constant' control"
            )
        self.cfg = cfg
        self.compressor = compressor
        self.sep_id = None if sep_id is None else int(sep_id)
        self.hasher = NgramHasher.from_config(
            cfg, compressor.compressed_vocab_size, compressor.compress_id(cfg.pad_id)
        )
        stores = dict(stores or {})
        self.layers = nn.ModuleDict()
        for lid in cfg.layer_ids:
            layer = Engram.from_config(
                cfg, hidden_size, self.hasher.flat_table_sizes(lid), seed=cfg.seed + lid,
                table_std=table_std, store=stores.get(lid),
            )  # fmt: skip
            nn.init.zeros_(layer.value_proj.weight)  # write nothing until trained
            nn.init.zeros_(layer.value_proj.bias)
            self.layers[str(lid)] = layer
        self._call: _Call | None = None
        # Calls of the last forward with gradients, by each layer's input, for activation
        # checkpointing (which reruns a layer during backward, after the forward has returned).
        self._saved: dict[tuple[int, tuple[int, ...]], _Call] = {}

    # ----------------------------------------------------------------------------- structure
    def engram_layers(self) -> dict[int, Engram]:
        return {int(k): v for k, v in self.layers.items()}  # type: ignore[misc]

    def table_parameters(self) -> list[nn.Parameter]:
        return [p for e in self.layers.values() for p in e.table_parameters()]  # type: ignore[operator]

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        for e in self.layers.values():
            yield from e.dense_parameters()  # type: ignore[operator]

    def fingerprint(self) -> str:
        """The hash fingerprint (tables are addressed by it)."""
        return self.hasher.fingerprint()

    # ------------------------------------------------------------------------------- rows
    def rows(
        self, input_ids: Tensor, live: Tensor | None, state: EngramDecodeState | None = None
    ) -> Tensor:
        """Rows (L, B, T, H) for raw ids (B, T), continuing `state` (advanced in place) if given."""
        raw = input_ids.detach().cpu().numpy().astype(np.int64, copy=False)
        B, T = raw.shape
        L, H = len(self.cfg.layer_ids), self.hasher.n_subtables
        if self.cfg.addressing == "constant":
            out = constant_rows(L, B, T, H)
        else:
            live_np = np.ones((B, T), bool) if live is None else live.cpu().numpy().astype(bool)
            prev_raw = np.full(B, -1, np.int64) if state is None else state.last_raw
            prev_live = np.ones(B, bool) if state is None else state.last_live
            comp = self._compress(raw)  # (B, T)
            prev = self._compress(prev_raw[:, None])  # -1 (no previous id) passes through
            before = np.concatenate([prev, comp[:, :-1]], axis=1)  # (B, T)
            before_live = np.concatenate([prev_live[:, None], live_np[:, :-1]], axis=1)
            reset = live_np & ~before_live
            if self.sep_id is not None:  # compared compressed, as NgramIndexer does
                reset |= before == self.compressor.compress_id(self.sep_id)
            stream = self.hasher.stream(B) if state is None else state.stream
            out = stream(comp, reset=reset)
            if state is not None:
                state.last_raw = raw[:, -1].copy()
                state.last_live = live_np[:, -1].copy()
        return torch.from_numpy(np.ascontiguousarray(out))

    def _compress(self, raw: np.ndarray) -> np.ndarray:
        """Compressed ids; ids past the tokenizer read as the pad id, negatives pass through."""
        unknown = raw >= self.compressor.vocab_size
        return np.asarray(self.compressor.compress(np.where(unknown, self.cfg.pad_id, raw)))

    def new_state(self, batch_size: int, like: Tensor) -> EngramDecodeState:
        conv = {
            lid: e.init_conv_state(batch_size, device=like.device)
            for lid, e in self.engram_layers().items()
        }
        return EngramDecodeState(
            self.hasher.stream(batch_size), np.full(batch_size, -1, np.int64),
            np.ones(batch_size, bool), conv,
        )  # fmt: skip

    # ---------------------------------------------------------------------------- hooks
    def _layer_hook(self, layer_id: int, index: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
            key = (hidden.data_ptr(), tuple(hidden.shape))
            call = self._call
            if call is None:  # a checkpointed layer recomputing its forward during backward
                call = self._saved.get(key)
            elif torch.is_grad_enabled():
                self._saved[key] = call
            if call is None:
                raise RuntimeError(
                    f"decoder layer {layer_id} ran outside its model's forward; Engram gets its "
                    "rows from the backbone's input_ids (call the model, not the layer)"
                )
            engram: Engram = self.layers[str(layer_id)]  # type: ignore[assignment]
            dtype = engram.value_proj.weight.dtype
            rows = call.rows[index].to(hidden.device)  # (B, T, H)
            h = hidden.to(dtype)
            if call.state is not None:
                y, new = engram(h, rows, call.live, conv_state=call.state.conv[layer_id])
                call.new_conv[layer_id] = new
            else:
                y = engram(h, rows, call.live)
            hidden = hidden + y.to(hidden.dtype)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook


def _attachment_of(model: nn.Module) -> EngramAttachment | None:
    att = getattr(model, ATTACHMENT, None)
    return att if isinstance(att, EngramAttachment) else None


def get_attachment(model: nn.Module) -> EngramAttachment:
    """`model.engram`, looking through wrappers such as `peft`'s PeftModel."""
    seen = model
    for _ in range(4):
        att = _attachment_of(seen)
        if att is not None:
            return att
        inner = getattr(seen, "get_base_model", None)
        nxt = inner() if callable(inner) else getattr(seen, "model", None)
        if nxt is None or nxt is seen:
            break
        seen = nxt
    raise ValueError(f"{type(model).__name__} has no Engram attached (use engram.hf.add_engram)")


def _default_sep(model: nn.Module, tokenizer: Any) -> int | None:
    eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, list | tuple):
        eos = eos[0] if eos else None
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    return None if eos is None else int(eos)


def _model_vocab(model: nn.Module) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        return int(emb.num_embeddings)
    return int(model.config.vocab_size)


def add_engram(
    model: nn.Module,
    engram_config: EngramConfig,
    tokenizer: Any,
    *,
    train_base: bool = False,
    stores: Mapping[int, RowStore] | None = None,
    table_std: float = 1.0,
    sep_id: int | None = None,
    compressor: TokenizerCompressor | None = None,
) -> nn.Module:
    """Insert Engram before attention at `engram_config.layer_ids` of a `transformers` causal LM.

    `tokenizer` is the model's (`tokenizers.Tokenizer` or a `transformers` tokenizer); its
    compression defines the n-grams. `train_base=False` freezes the base model's parameters
    (adapter mode); Engram's always train. `stores` ({layer_id: RowStore}) serve tables from
    elsewhere (a table file, shards); `sep_id` (default: the model's `eos_token_id`) starts a
    new document. Returns `model`, modified in place: logits are unchanged until Engram trains.
    """
    if _attachment_of(model) is not None:
        raise ValueError(f"{type(model).__name__} already has Engram attached")
    backbone = find_backbone(model)
    n_layers = len(backbone.layers)
    bad = [i for i in engram_config.layer_ids if not 0 <= i < n_layers]
    if bad:
        raise ValueError(
            f"engram layer_ids {bad} are outside {type(model).__name__}'s {n_layers} decoder "
            f"layers (0..{n_layers - 1})"
        )
    if compressor is None:
        compressor = TokenizerCompressor.from_tokenizer(tokenizer)
    vocab = _model_vocab(model)
    tok_vocab = tokenizer_vocab_size(tokenizer) if tokenizer is not None else compressor.vocab_size
    if tok_vocab > vocab or compressor.vocab_size != tok_vocab:
        raise ValueError(
            f"the tokenizer has {tok_vocab} ids but {type(model).__name__}'s embedding has "
            f"{vocab}: it is not this model's tokenizer"
        )
    if not 0 <= engram_config.pad_id < compressor.vocab_size:
        raise ValueError(
            f"engram pad_id={engram_config.pad_id} is not an id of the tokenizer "
            f"({compressor.vocab_size} ids)"
        )
    sep = _default_sep(model, tokenizer) if sep_id is None else int(sep_id)
    if sep is not None and not 0 <= sep < compressor.vocab_size:
        sep = None  # an eos outside the tokenizer cannot appear in its ids
    if not train_base:
        for p in model.parameters():
            p.requires_grad_(False)
    att = EngramAttachment(
        engram_config, compressor, backbone.hidden_size, sep_id=sep, stores=stores,
        table_std=table_std,
    )  # fmt: skip
    emb = model.get_input_embeddings().weight
    att.to(emb.device)
    model.add_module(ATTACHMENT, att)
    _install_hooks(model, backbone, att)
    return model


def _install_hooks(model: nn.Module, backbone: Backbone, att: EngramAttachment) -> None:
    signature = inspect.signature(backbone.module.forward)
    cache_name = "cache" if "cache" in signature.parameters else "past_key_values"
    var_kw = next(
        (n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD),
        None,
    )

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        bound = signature.bind_partial(*args, **kwargs)
        kw = dict(bound.arguments)
        extra = kw.pop(var_kw, None) if var_kw else None
        if isinstance(extra, dict):
            kw.update(extra)
        rows = kw.pop(ROWS_KWARG, None)
        input_ids = kw.get("input_ids")
        if input_ids is None and rows is None:
            raise ValueError(
                "a model with Engram needs input_ids (its rows are hashed from token ids; "
                "inputs_embeds alone carry none)"
            )
        mask = kw.get("attention_mask")
        ref = input_ids if input_ids is not None else rows[0, :, :, 0]
        B, T = ref.shape
        live = None
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dim() != 2:
                raise ValueError(
                    "Engram reads a 2-D attention_mask (B, T) of 0/1 (got "
                    f"{type(mask).__name__}{'' if not isinstance(mask, Tensor) else tuple(mask.shape)})"
                )
            live = mask[:, -T:].bool()
            if bool(live.all()):
                live = None
        use_cache = kw.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(module.config, "use_cache", False))
        cache = kw.get(cache_name)
        state = None
        if rows is None and use_cache and not module.training:
            if cache is None:
                from transformers import DynamicCache

                cache = DynamicCache(config=module.config)
                kw[cache_name] = cache
            past = int(cache.get_seq_length())
            current = getattr(cache, STATE_ATTR, None)
            if past == 0:
                state = att.new_state(B, ref)
            elif current is None or current.length != past:
                raise ValueError(
                    f"this KV cache holds {past} positions but Engram's decoding state "
                    f"{'is missing' if current is None else f'holds {current.length}'}; "
                    "start from an empty cache (cropping, as assisted decoding does, is not "
                    "supported)"
                )
            else:
                state = current.copy()
        if rows is None:
            rows = att.rows(input_ids, live, state)
        elif tuple(rows.shape[:3]) != (len(att.cfg.layer_ids), B, T):
            raise ValueError(
                f"{ROWS_KWARG} must have shape (L, B, T, H) = ({len(att.cfg.layer_ids)}, {B}, "
                f"{T}, {att.hasher.n_subtables}), got {tuple(rows.shape)}"
            )
        att._call = _Call(rows, live, state, cache)
        if torch.is_grad_enabled():
            att._saved = {}
        return (), kw

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = att._call
        if call is not None and call.state is not None:
            call.state.conv.update(call.new_conv)
            call.state.length += int(call.rows.shape[2])
            setattr(call.target, STATE_ATTR, call.state)
        att._call = None

    def forget(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        att._call = None  # also after an exception

    backbone.module.register_forward_pre_hook(pre, with_kwargs=True)
    backbone.module.register_forward_hook(post, with_kwargs=True)
    backbone.module.register_forward_hook(forget, with_kwargs=True, always_call=True)
    for index, lid in enumerate(att.cfg.layer_ids):
        backbone.layers[lid].register_forward_pre_hook(
            att._layer_hook(lid, index), with_kwargs=True
        )

    def reorder_cache(cache: Any, beam_idx: Tensor) -> Any:
        cache.reorder_cache(beam_idx)
        state = getattr(cache, STATE_ATTR, None)
        if state is not None:
            state.reorder(beam_idx)
        return cache

    model._reorder_cache = reorder_cache  # generate() calls it for beam search
