"""The residual stream of a model, layer by layer, read from a real forward pass.

Layer indices used by every analysis built on this module: layer 0 is the embedding output,
layer i + 1 the output of block i, so a model with n blocks has n + 1 layers and the last one
is what the final norm reads.

Design choices:
- `block_outputs` captures with `register_forward_hook` on the token embedding and on every
  block (the hooks are removed in `finally`, even when the forward raises), so the tensors are
  exactly those the model's own forward computed and the model code carries no analysis hooks.
  The forward runs under `no_grad` in eval mode (the caller's mode is restored afterwards) and
  asks for no logits: nothing of size (B, T, V) is built. A Hugging Face base run
  (`engram.hf.lm.HFCausalLM`) is read the same way: its decoder layers return the hidden
  states (not a tuple), and `embedding_output` names the module after which the stream starts
  (GPT-2: after its position embeddings are added).
- With hyper-connections (M > 1) a block's output is (B, T, M, D); it is reduced by summing the
  branches, exactly as the model does before its final norm. The embedding is copied to the M
  branches, so its entry is M * embedding, the same sum: every entry is what the final norm
  would read if the blocks after it were skipped.
- `val_inputs` yields the validation tokens of `engram.data` with the rows of the run's own
  indexer (document resets included, as in `engram.train.evaluate`), so two runs with different
  Engram configurations read the SAME tokens, each with its own rows. `load_runs` loads several
  runs and checks that they can share those tokens (same tokenizer and sequence length).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from engram.compress import tokenizer_fingerprint, tokenizer_vocab_size
from engram.data import DataConfig, DataSplits, prepare_data
from engram.model import EngramLM
from engram.train import RunParts, load_trained

PathLike = str | os.PathLike[str]


def _sum_branches(h: Tensor, M: int) -> Tensor:
    """(B, T, M, D) -> (B, T, D) when M > 1; (B, T, D) unchanged otherwise."""
    return h.sum(dim=2) if M > 1 else h


@torch.no_grad()
def block_outputs(
    model: EngramLM, x: Tensor, rows: Tensor | None, mask: Tensor | None = None
) -> list[Tensor]:
    """The residual stream after the embedding and after every block: n_layers + 1 of (B, T, D).

    `x` (B, T) token ids, `rows` (L, B, T, H) for a model with Engram layers (else None), `mask`
    (B, T) as `EngramLM.forward` takes it. Inputs are moved to the model's device; the outputs
    stay there, detached.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of token ids (B, T), got {type(x).__name__}")
    M = model.cfg.hc_mult
    device = model.tok_emb.weight.device
    captured: list[Tensor | None] = [None] * (len(model.blocks) + 1)

    def embedding_hook(_m: nn.Module, _inp: Any, out: Tensor) -> None:
        captured[0] = out.detach() * M if M > 1 else out.detach()  # (B, T, D)

    def block_hook(index: int) -> Any:
        def hook(_m: nn.Module, _inp: Any, out: Tensor | tuple[Tensor, ...]) -> None:
            h = out[0] if isinstance(out, tuple) else out  # a Hugging Face layer: the tensor
            captured[index] = _sum_branches(h.detach(), M)  # (B, T, D)

        return hook

    embedding = getattr(model, "embedding_output", model.tok_emb)
    handles = [embedding.register_forward_hook(embedding_hook)]
    handles += [b.register_forward_hook(block_hook(i + 1)) for i, b in enumerate(model.blocks)]
    was_training = model.training
    model.eval()
    try:
        model(
            x.to(device),
            None if rows is None else rows.to(device),
            mask=None if mask is None else mask.to(device),
            return_logits=False,
        )
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [i for i, h in enumerate(captured) if h is None]
    if missing:  # a block skipped by a subclass or a wrapped model: refuse, never guess
        raise RuntimeError(f"the forward pass did not run layers {missing} (0 = embedding)")
    return [h for h in captured if h is not None]


def final_logits(model: EngramLM, h: Tensor) -> Tensor:
    """lm_head(final_norm(h)) for a residual-stream tensor (..., D) -> (..., V)."""
    return model.lm_head(model.norm(h))


def val_inputs(
    parts: RunParts, data: DataSplits, max_batches: int | None
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """The validation batches of `data` as (x (B, T) LongTensor, rows (L, B, T, H) or None).

    Rows come from `parts.indexer` (None for a run without Engram layers).
    """
    for x_np, _y in data.val_batches(max_batches):
        x = torch.as_tensor(x_np, dtype=torch.long)  # (B, T)
        rows = None
        if parts.indexer is not None:
            rows = torch.as_tensor(parts.indexer.rows(x.numpy()))  # (L, B, T, H)
        yield x, rows


def load_runs(run_dirs: Mapping[str, PathLike]) -> dict[str, RunParts]:
    """Load trained runs {name: run or checkpoint dir} that can read the same tokens.

    Raises ValueError when there are none, or when a run's tokenizer (vocabulary size or
    definition) or sequence length differs from the first run's.
    """
    if not run_dirs:
        raise ValueError("run_dirs is empty; expected {name: run directory} for at least one run")
    runs: dict[str, RunParts] = {}
    for name, path in run_dirs.items():
        parts, _ckpt = load_trained(path)
        runs[str(name)] = parts
    first_name, first = next(iter(runs.items()))
    vocab, fp = tokenizer_vocab_size(first.tokenizer), tokenizer_fingerprint(first.tokenizer)
    seq_len = first.cfg.data.seq_len
    for name, parts in runs.items():
        other_vocab = tokenizer_vocab_size(parts.tokenizer)
        if other_vocab != vocab:
            raise ValueError(
                f"run {name!r} has a tokenizer of {other_vocab} ids, run {first_name!r} one of "
                f"{vocab}: runs compared on the same tokens need the same tokenizer"
            )
        if tokenizer_fingerprint(parts.tokenizer) != fp:
            raise ValueError(
                f"run {name!r} has a different tokenizer from run {first_name!r} (same size, "
                f"different definition): runs compared on the same tokens need the same one"
            )
        if parts.cfg.data.seq_len != seq_len:
            raise ValueError(
                f"run {name!r} has data.seq_len={parts.cfg.data.seq_len}, run {first_name!r} "
                f"{seq_len}: runs compared on the same tokens need the same sequence length"
            )
    return runs


def data_config(run: RunParts, data_source: str | None = None) -> DataConfig:
    """The run's data config, its source replaced by `data_source` when given."""
    if data_source is None:
        return run.cfg.data
    return dataclasses.replace(run.cfg.data, source=data_source)


def shared_val_data(first: RunParts, data_source: str | None = None) -> DataSplits:
    """The data of `first`'s data config (source replaced by `data_source`), prepared."""
    return prepare_data(data_config(first, data_source), first.tokenizer, first.eot_id)


def data_summary(data: DataSplits) -> dict[str, Any]:
    """Which tokens an analysis read: source, sequence length, batch size (for its JSON)."""
    return {
        "source": data.cfg.source,
        "seq_len": data.cfg.seq_len,
        "batch_size": data.cfg.batch_size,
    }
