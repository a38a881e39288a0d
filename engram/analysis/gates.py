"""Gate values per token, per Engram layer and per branch, read from a real forward pass.

Design choices:
- `record_gates` wraps each Engram layer's public `gate` method for the duration of a `with`
  block (an instance attribute shadows the method; it is removed afterwards), so the values are
  exactly those the forward used, and the model code carries no analysis hooks.
- `gate_values` runs the model on one text with the same indexer the model was trained with
  (document resets included) and returns numpy arrays, ready for plotting or json.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engram.indexer import NgramIndexer
from engram.model import EngramLM


@dataclass(frozen=True)
class GateReading:
    """The tokens of a text and the gate of every Engram layer at each of them."""

    tokens: list[str]
    gates: dict[int, np.ndarray]  # layer id -> (T, M) gate values in [0, 1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "gates": {str(k): v.round(4).tolist() for k, v in self.gates.items()},
        }


@contextmanager
def record_gates(model: EngramLM) -> Iterator[dict[int, list[Tensor]]]:
    """Collect each Engram layer's gate tensors (B, T, M) for the forwards run inside the block."""
    layers = model.engram_layers()
    records: dict[int, list[Tensor]] = {lid: [] for lid in layers}
    for lid, layer in layers.items():
        original = layer.gate

        def wrapped(hidden: Tensor, e: Tensor, mask: Tensor | None = None, *,
                    _orig: Any = original, _lid: int = lid) -> Tensor:  # fmt: skip
            a = _orig(hidden, e, mask)
            records[_lid].append(a.detach())
            return a

        layer.gate = wrapped  # type: ignore[method-assign]
    try:
        yield records
    finally:
        for layer in layers.values():
            layer.__dict__.pop("gate", None)


@torch.no_grad()
def gate_values(model: EngramLM, indexer: NgramIndexer, text: str) -> GateReading:
    """Gate per token of `text` (one sequence) for every Engram layer of `model`."""
    if not text.strip():
        raise ValueError("text is empty; expected a sentence to read the gates on")
    return gate_values_ids(model, indexer, indexer.encode(text))


@torch.no_grad()
def gate_values_ids(model: EngramLM, indexer: NgramIndexer, ids: Any) -> GateReading:
    """Like `gate_values`, for raw token ids (T,) of one sequence instead of a text."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) == 0:
        raise ValueError(f"ids must be one non-empty sequence (T,), got shape {ids.shape}")
    max_len = model.cfg.max_seq_len
    if len(ids) > max_len:
        raise ValueError(f"the sequence is {len(ids)} tokens; the model reads at most {max_len}")
    if not model.engram_layers():
        raise ValueError("this model has no Engram layers: there are no gates to read")
    x = torch.as_tensor(ids, dtype=torch.long)[None]  # (1, T)
    rows = torch.as_tensor(indexer.rows(ids[None]))  # (L, 1, T, H)
    device = model.tok_emb.weight.device
    was_training = model.training
    model.eval()
    try:
        with record_gates(model) as rec:
            model(x.to(device), rows.to(device))
    finally:
        model.train(was_training)
    tokens = [indexer.token_text(int(t)) for t in ids]
    gates = {lid: torch.cat(v, dim=0)[0].float().cpu().numpy() for lid, v in rec.items()}
    return GateReading(tokens, gates)
