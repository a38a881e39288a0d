"""Autoregressive generation with a KV cache, streaming n-gram hashing and row prefetch.

Axes: B prompts (sequences), T time (tokens in one call), L Engram layers, H sub-tables,
V vocabulary.

Design choices:
- Three pieces of state advance together, one call at a time: the model's `DecodeCache` (KV
  caches, Engram conv states, slot liveness), the n-gram `HashStream` (the last N-1 compressed
  ids of each sequence) and the sampler's `torch.Generator`. Prefill is the same call as a
  decode step, with T = the (chunk of the) prompt instead of 1, so there is one code path.
- Prompts of different lengths are LEFT-padded into one batch. Padding slots are dead: no live
  token attends to them, they do not advance positions, the Engram layers output 0 there and the
  hash window restarts at each prompt's first real token, so every prompt is decoded exactly as
  if it were alone (the tests prove incremental logits equal a full recompute per prompt).
- The document separator (`<|endoftext|>`) starts a new n-gram document, as in training.
- Prefetch: a row address depends on the tokens alone, so once a step's tokens are known every
  Engram layer's rows are requested (`Engram.prefetch`) before block 0 runs; a store that can
  prefetch (`engram.store.PrefetchingStore`) fetches a deep layer's rows while the blocks below
  it compute, and the next prefill chunk's rows while the current chunk computes (give
  `prefill_chunk`; the chunking is the caller's choice, never the store's, so a RAM and a disk
  model given the same arguments compute the same bits). In a decode step the just-sampled
  token is hashed and its rows requested before anything else (the logits copy, the per-sequence
  bookkeeping, the embedding), so the reads have the longest head start possible.
- `generate` is `Decoder(...).run()`: a `Decoder` holds that state and advances it one call at a
  time (`prefill()`, then `step()` until it returns False), so a caller can stream tokens or
  interleave several decoders step by step; each step's wall time is kept (`stats
  ["decode_step_s"]`), since a per-step median is a steadier speed measure than tokens/s of one
  short run. Every call runs under `torch.no_grad()`.
- Overlap is measured, not assumed: `GenerationResult.stats["rows"]` has, for prefill and for
  decoding, the seconds spent reading rows (prefetch worker, rows at hand served when requested,
  synchronous reads), the seconds the
  model thread was blocked on them, and the hidden fraction 1 - blocked / read.
- Sampling: temperature 0 is greedy; otherwise softmax(logits / temperature), optionally
  restricted to the top k and/or to the smallest set of likeliest tokens whose probability
  reaches top p (nucleus), drawn with a seeded generator (same seed, same text, on CPU).
  Finished sequences (after `eos_id`) keep decoding in the batch; their extra tokens are
  dropped from the result.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engram.hashing import HashStream
from engram.indexer import NgramIndexer
from engram.model import DecodeCache, EngramLM


@dataclass
class GenerationResult:
    """What `generate` returns."""

    prompts: list[list[int]]  # the prompt ids, as given
    tokens: list[list[int]]  # the new ids per prompt (up to and including eos_id, if met)
    prefill_s: float  # seconds spent on the prompts
    decode_s: float  # seconds spent on the decode steps
    steps: int  # decode steps run (each produces one token per sequence)
    logits: list[Tensor] | None = None  # with return_logits: (B, V) per produced token
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens produced by decode steps (all sequences) per second."""
        n = self.steps * len(self.prompts)
        return n / self.decode_s if self.decode_s > 0 else float("nan")


class RowStream:
    """Raw ids -> rows (L, B, T, H), one call at a time, as `NgramIndexer.rows` on the whole.

    Keeps the hash window and whether each sequence's last token was the separator; `start`
    (B, T) bool restarts the window at a position (a prompt's first real token). A control run
    (`engram.addressing`) gets its rows from the indexer, positions counted from each start.
    """

    def __init__(self, indexer: NgramIndexer, batch_size: int) -> None:
        self.indexer = indexer
        self.stream: HashStream = indexer.hasher.stream(batch_size)
        self._last_was_sep = np.zeros(batch_size, dtype=bool)
        self._next_pos = np.zeros(batch_size, dtype=np.int64)

    def _positions(self, T: int, start: np.ndarray | None) -> np.ndarray:
        pos = np.empty((len(self._next_pos), T), dtype=np.int64)  # (B, T)
        for t in range(T):
            if start is not None:
                self._next_pos[start[:, t]] = 0
            pos[:, t] = self._next_pos
            self._next_pos += 1
        return pos

    def __call__(self, raw: np.ndarray, start: np.ndarray | None = None) -> Tensor:
        """raw (B, T) int64 raw ids -> rows (L, B, T, H) int64 tensor."""
        if self.indexer.addressing != "ngram":
            positions = self._positions(raw.shape[1], start)
            return torch.from_numpy(self.indexer.rows(raw, positions=positions))
        compressed = self.indexer.compressor.compress(raw)  # (B, T)
        reset = np.zeros(raw.shape, dtype=bool)
        sep = self.indexer.sep_id
        if sep is not None:
            is_sep = compressed == sep  # (B, T)
            reset[:, 0] = self._last_was_sep
            reset[:, 1:] = is_sep[:, :-1]
            self._last_was_sep = is_sep[:, -1].copy()
        if start is not None:
            reset |= start
        return torch.from_numpy(self.stream(compressed, reset=reset))


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"prompt {i} has token id {bad[0]} outside the model's vocabulary [0, {vocab_size})"
            )
        out.append(ids)
    return out


def sample_next(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator,
    top_p: float | None = None,
) -> Tensor:
    """Next ids (B,) from last-position logits (B, V): greedy at temperature 0, else sampled."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p is not None and top_p < 1.0:
        # Keep the likeliest tokens up to (and including) the one that brings the mass to top_p.
        sorted_p, order = probs.sort(dim=-1, descending=True)  # (B, V)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # mass before a token already enough
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _read_clock(model: EngramLM) -> tuple[float, float]:
    """(seconds reading rows, seconds the caller was blocked on rows), summed over the Engram
    layers' stores: a prefetching store's clocks, else a bare reader's (all of it blocking)."""
    read = blocked = 0.0
    for layer in model.engram_layers().values():
        s: Any = getattr(layer, "store", None)
        while s is not None:
            st = getattr(s, "stats", None)
            if hasattr(st, "exposed_time_s"):  # PrefetchingStore
                read += st.read_time_s
                blocked += st.exposed_time_s
                break
            if callable(st):
                t = getattr(st(), "read_time_s", None)
                if t is not None:  # a reader without prefetch: every read blocks
                    read += t
                    blocked += t
                    break
            s = getattr(s, "inner", None)
    return read, blocked


def _overlap(before: tuple[float, float], after: tuple[float, float]) -> dict[str, float]:
    read, blocked = after[0] - before[0], after[1] - before[1]
    hidden = max(0.0, 1.0 - blocked / read) if read > 0 else 0.0
    return {"read_s": read, "blocked_s": blocked, "hidden_fraction": hidden}


def _prefetch(model: EngramLM, rows: Sequence[Tensor] | None, mask: Tensor | None) -> None:
    if rows is None:
        return
    for i, layer in enumerate(model.engram_layers().values()):
        layer.prefetch(rows[i], mask)


def _check_args(
    model: EngramLM,
    prompts: list[list[int]],
    indexer: NgramIndexer | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    prefill_chunk: int | None,
) -> None:
    """Refuse arguments `generate` cannot honour, naming the argument and the value."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
    if model.layer_ids and indexer is None:
        raise ValueError(
            f"this model has Engram layers at blocks {list(model.layer_ids)}: pass the run's "
            "indexer (RunParts.indexer) to hash the generated tokens"
        )
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's max_seq_len {model.cfg.max_seq_len}"
        )


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompts left-padded to the longest: ids (B, P), live slots (B, P), first real token (B, P)."""
    B, P = len(prompts), max(len(p) for p in prompts)
    raw = np.full((B, P), pad_id, dtype=np.int64)
    live = np.zeros((B, P), dtype=bool)
    for b, p in enumerate(prompts):
        raw[b, P - len(p) :] = p
        live[b, P - len(p) :] = True
    first = np.zeros((B, P), dtype=bool)
    first[np.arange(B), P - np.array([len(p) for p in prompts])] = True
    return raw, live, first


def _prefill(
    model: EngramLM,
    cache: DecodeCache,
    rowstream: RowStream | None,
    padded: tuple[np.ndarray, np.ndarray, np.ndarray],
    prefill_chunk: int | None,
) -> Tensor:
    """Feed the padded prompts in chunks; the last position's logits (B, V).

    All rows are known up front, so chunk c+1's rows are prefetched while chunk c computes."""
    raw, live, first = padded
    device = model.tok_emb.weight.device
    P = raw.shape[1]
    chunk = P if prefill_chunk is None else prefill_chunk
    bounds = [(s, min(s + chunk, P)) for s in range(0, P, chunk)]
    rows_all = None if rowstream is None else rowstream(raw, first)  # (L, B, P, H)
    idx_all = torch.from_numpy(raw).to(device)
    mask_all = torch.from_numpy(live).to(device)
    # per chunk: one (B, t, H) tensor per layer and the mask, the same objects for the prefetch
    # and the forward (a layer recognises the ids it prefetched by identity)
    rows_c = [None if rows_all is None else rows_all[:, :, s:e].unbind(0) for s, e in bounds]
    mask_c = [mask_all[:, s:e] for s, e in bounds]
    last = None
    for c, (s, e) in enumerate(bounds):
        if c == 0:
            _prefetch(model, rows_c[0], mask_c[0])
        if c + 1 < len(bounds):
            _prefetch(model, rows_c[c + 1], mask_c[c + 1])
        out = model(idx_all[:, s:e], rows_c[c], mask=mask_c[c], cache=cache, return_logits=True)
        last = out.logits[:, -1]  # (B, V)
    assert last is not None
    return last


@dataclass
class _Sampling:
    """How `Decoder.step` picks each next token."""

    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator
    eos_id: int | None


class Decoder:
    """`generate`, one step at a time: prefill, then one token per sequence per `step()`.

    Takes `generate`'s arguments. `prefill()` feeds the prompts; each `step()` samples the next
    token of every sequence from the last logits and, unless that was the last token, runs the
    model on it (the row reads for the new token go out first). `step()` returns False once the
    batch is finished (`max_new_tokens` reached or every sequence met `eos_id`); `result()` is
    what `generate` returns. Several decoders may run interleaved, step by step (the benchmarks
    do, so that two models share every slow or fast moment of the machine alike).
    """

    def __init__(
        self,
        model: EngramLM,
        prompts: Sequence[Sequence[int]],
        *,
        indexer: NgramIndexer | None = None,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        eos_id: int | None = None,
        prefill_chunk: int | None = None,
        pad_id: int = 0,
        return_logits: bool = False,
    ) -> None:
        self.prompts = _check_prompts(prompts, model.cfg.vocab_size)
        _check_args(
            model, self.prompts, indexer, max_new_tokens, temperature, top_k, top_p, prefill_chunk
        )
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.prefill_chunk = prefill_chunk
        self._padded = _left_pad(self.prompts, pad_id)
        B, P = self._padded[0].shape
        self._device = model.tok_emb.weight.device
        self._cache: DecodeCache = model.new_cache(B, P + max_new_tokens, self._device)
        self._rowstream = RowStream(indexer, B) if model.layer_ids and indexer is not None else None
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self._sampling = _Sampling(temperature, top_k, top_p, gen, eos_id)
        self.logits: list[Tensor] | None = [] if return_logits else None
        self.tokens: list[list[int]] = [[] for _ in range(B)]  # new ids per prompt so far
        self.step_s: list[float] = []  # wall time of each step that ran the model
        self.steps = 0  # decode steps that ran the model
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self.finished = False
        self._done = np.zeros(B, dtype=bool)
        self._last: Tensor | None = None  # (B, V) logits of each sequence's last position
        self._clocks: list[tuple[float, float]] = []
        self._produced = 0  # tokens sampled per sequence so far (finished sequences included)

    def prefill(self) -> None:
        """Feed the prompts (in chunks of `prefill_chunk`); call once, before `step`."""
        if self._last is not None:
            raise RuntimeError("Decoder.prefill: the prompts were already fed")
        self._clocks.append(_read_clock(self.model))
        t0 = time.perf_counter()
        with torch.no_grad():
            self._last = _prefill(
                self.model, self._cache, self._rowstream, self._padded, self.prefill_chunk
            )
        self.prefill_s = time.perf_counter() - t0
        self._clocks.append(_read_clock(self.model))
        self.finished = self.max_new_tokens == 0

    def step(self) -> bool:
        """Sample one token per sequence and run the model on it; False once finished."""
        if self._last is None:
            raise RuntimeError("Decoder.step: call prefill() first")
        if self.finished:
            return False
        t0 = time.perf_counter()
        with torch.no_grad():
            more = self._step()
        elapsed = time.perf_counter() - t0
        self.decode_s += elapsed
        if more:
            self.step_s.append(elapsed)
        return more

    def _step(self) -> bool:
        last, sampling, B = self._last, self._sampling, len(self.prompts)
        assert last is not None
        nxt = sample_next(
            last, sampling.temperature, sampling.top_k, sampling.generator, sampling.top_p
        )  # (B,)
        ids = nxt.cpu().numpy()
        more = self._produced + 1 < self.max_new_tokens
        rows = None
        if more:  # the next step's row reads go out first (a stop at eos wastes one read)
            raw_step = ids.reshape(B, 1).astype(np.int64)
            if self._rowstream is not None:
                rows = self._rowstream(raw_step).unbind(0)  # L x (B, 1, H)
            _prefetch(self.model, rows, None)
        if self.logits is not None:
            self.logits.append(last.detach().clone())
        for b in range(B):
            if not self._done[b]:
                self.tokens[b].append(int(ids[b]))
                self._done[b] = sampling.eos_id is not None and int(ids[b]) == sampling.eos_id
        self._produced += 1
        if self._done.all() or not more:
            self.finished = True
            return False
        out = self.model(
            torch.from_numpy(raw_step).to(self._device), rows, cache=self._cache,
            return_logits=True,
        )  # fmt: skip
        self._last = out.logits[:, -1]
        self.steps += 1
        return True

    def run(self) -> GenerationResult:
        """Prefill (if not done yet), step until finished, and return the result."""
        if self._last is None:
            self.prefill()
        while self.step():
            pass
        return self.result()

    def result(self) -> GenerationResult:
        """What `generate` returns, for the steps run so far."""
        stats: dict[str, Any] = {"decode_step_s": list(self.step_s)}
        if self.model.layer_ids and len(self._clocks) == 2:
            now = _read_clock(self.model)
            stats["rows"] = {
                "prefill": _overlap(self._clocks[0], self._clocks[1]),
                "decode": _overlap(self._clocks[1], now),
            }
        return GenerationResult(
            prompts=self.prompts,
            tokens=[list(t) for t in self.tokens],
            prefill_s=self.prefill_s,
            decode_s=self.decode_s,
            steps=self.steps,
            logits=None if self.logits is None else list(self.logits),
            stats=stats,
        )


def generate(
    model: EngramLM,
    prompts: Sequence[Sequence[int]],
    *,
    indexer: NgramIndexer | None = None,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    prefill_chunk: int | None = None,
    pad_id: int = 0,
    return_logits: bool = False,
) -> GenerationResult:
    """Continue each prompt (a list of raw token ids) by up to `max_new_tokens` tokens.

    `indexer` (the run's `NgramIndexer`) is required for a model with Engram layers.
    `prefill_chunk` feeds long prompts in chunks of that many slots (None = one call).
    `pad_id` fills the left padding (any valid id: padding is never read).
    `stats["decode_step_s"]` has each decode step's wall time; `Decoder` runs the same steps
    one at a time.
    """
    return Decoder(
        model, prompts, indexer=indexer, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id, prefill_chunk=prefill_chunk,
        pad_id=pad_id, return_logits=return_logits,
    ).run()  # fmt: skip
