"""The ``engram`` command line: thin wrappers over the library.

Design choices:
- Every command is a call into the library; the CLI only parses arguments and prints.
- Bad input (an unknown translation, an empty text, a layer that is not an Engram layer) ends in
  a one-line ``engram: error: ...`` and exit code 2, never a traceback.

Commands (this release):
- ``engram demo``: the core memory end to end on the built-in corpus: compression, hashing of
  packed documents, the Engram layer's forward (full and streamed), and a short run of sparse
  row updates that trains a tiny next-token model with and without the memory.
- ``engram info``: the configuration's figures (vocabulary, table sizes, parameters, kernel).
- ``engram rows TEXT``: which rows each token's n-grams hit in a layer.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from engram.config import EngramConfig, small_config
from engram.hashing import kernel_available
from engram.indexer import NgramIndexer
from engram.layer import Engram


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _config_from_args(args: argparse.Namespace) -> EngramConfig:
    cfg = small_config()
    overrides = {}
    if getattr(args, "layers", None):
        overrides["layer_ids"] = tuple(int(v) for v in args.layers.split(","))
    if getattr(args, "table_size", None):
        overrides["engram_vocab_size"] = (args.table_size,) * (cfg.max_ngram_size - 1)
    if not overrides:
        return cfg
    try:
        return EngramConfig(**{**cfg.to_dict(), **overrides})
    except ValueError as exc:
        raise CLIError(str(exc)) from None


# ----------------------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace) -> None:
    cfg = _config_from_args(args)
    ix = NgramIndexer.builtin(cfg)
    c = ix.compressor
    print("tokenizer       GPT-2 BPE (built in, offline)")
    print(
        f"compression     {c.vocab_size:,} raw ids -> {c.compressed_vocab_size:,} "
        f"({1 - c.compressed_vocab_size / c.vocab_size:.1%} fewer)"
    )
    print(f"orders          2..{cfg.max_ngram_size}, {cfg.n_head_per_ngram} heads each")
    print(f"row width       {cfg.head_dim} (memory width {cfg.memory_dim})")
    for layer_id in cfg.layer_ids:
        sizes = ix.hasher.table_sizes(layer_id)
        rows = ix.hasher.total_rows(layer_id)
        print(
            f"layer {layer_id:<9d} {rows:,} rows = {rows * cfg.head_dim:,} table params; primes {sizes}"
        )
    print(f"hash kernel     {'compiled C' if kernel_available() else 'numpy fallback'}")
    print(f"fingerprint     {ix.hasher.fingerprint()}")


# ----------------------------------------------------------------------------- rows


def cmd_rows(args: argparse.Namespace) -> None:
    cfg = _config_from_args(args)
    if not args.text.strip():
        raise CLIError("TEXT is empty; expected some words, e.g. 'Alexander the Great'")
    ix = NgramIndexer.builtin(cfg)
    layer_id = cfg.layer_ids[0] if args.layer is None else args.layer
    if layer_id not in cfg.layer_ids:
        raise CLIError(
            f"--layer {layer_id} is not an Engram layer; expected one of {list(cfg.layer_ids)}"
        )
    print(f"layer {layer_id}: rows per order (one per head, local to each sub-table)")
    for hit in ix.explain(args.text, layer_id):
        print(f"  {hit.position:3d} {hit.token!r}")
        for gram, rows in zip(hit.ngrams, hit.rows, strict=True):
            print(f"        {gram!r:40s} {list(rows)}")


# ----------------------------------------------------------------------------- demo


class TinyLM(nn.Module):
    """Token embedding -> (optional Engram) -> LM head: enough to watch the memory learn n-grams.

    Without the memory the model is a bigram model (it sees one token); with it, each position
    also reads its hashed 2- and 3-grams, so it can learn trigram statistics.
    """

    def __init__(self, vocab: int, dim: int, engram: Engram | None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.engram = engram
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        h = self.embed(ids)  # (B, T, D)
        if self.engram is not None:
            h = h + self.engram(h, rows)
        return self.head(self.norm(h))  # (B, T, V)


def _pack(docs: list[np.ndarray], eot: int, batch: int, seq: int) -> np.ndarray:
    stream = np.concatenate([np.append(d, eot) for d in docs])
    n = (len(stream) - 1) // (batch * seq)
    if n == 0:
        raise CLIError(f"corpus too small: {len(stream)} tokens for batches of {batch}x{seq}")
    return stream[: n * batch * seq + 1]


def cmd_demo(args: argparse.Namespace) -> None:
    from engram.corpus import TRANSLATIONS, iter_builtin_documents
    from engram.tokenizer import EOT_ID

    names = tuple(args.translations.split(","))
    bad = [n for n in names if n not in TRANSLATIONS]
    if bad:
        raise CLIError(f"unknown translation {bad[0]!r}; expected some of {list(TRANSLATIONS)}")
    torch.manual_seed(args.seed)
    cfg = _config_from_args(args)
    layer_id = cfg.layer_ids[0]

    print("== 1. tokenizer compression")
    t0 = time.perf_counter()
    ix = NgramIndexer.builtin(cfg)
    c = ix.compressor
    print(
        f"GPT-2 BPE: {c.vocab_size:,} ids -> {c.compressed_vocab_size:,} compressed ids "
        f"({1 - c.compressed_vocab_size / c.vocab_size:.1%} fewer), ready in {time.perf_counter() - t0:.2f}s"
    )
    for word in (" Lord", " LORD", " lord", "Lord"):
        raw = ix.encode(word)
        print(f"  {word!r:8s} raw {raw.tolist()} -> compressed {c.compress(raw).tolist()}")

    print("\n== 2. built-in corpus")
    t0 = time.perf_counter()
    docs = list(iter_builtin_documents(names))
    encoded = [ix.encode(d.text) for d in docs]
    n_tok = sum(len(e) for e in encoded)
    print(
        f"{len(docs):,} chapters ({', '.join(names)}), {n_tok:,} tokens, "
        f"tokenized in {time.perf_counter() - t0:.1f}s; documents packed with <|endoftext|>"
    )

    print("\n== 3. hashing every Engram layer in one pass, with document resets")
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(encoded))
    stream = _pack([encoded[i] for i in order], EOT_ID, args.batch, args.seq)
    B, T = args.batch, args.seq
    n_batches = (len(stream) - 1) // (B * T)
    inputs = stream[:-1].reshape(n_batches, B, T)
    targets = stream[1:].reshape(n_batches, B, T)
    t0 = time.perf_counter()
    all_rows = ix.rows(inputs.reshape(-1, T))  # (L, n_batches*B, T, H)
    dt = time.perf_counter() - t0
    print(
        f"{inputs.size:,} tokens -> rows {tuple(all_rows.shape)} (layers, sequences, time, sub-tables) "
        f"in {dt * 1e3:.0f} ms ({inputs.size / dt / 1e6:.1f}M tokens/s, "
        f"{'C kernel' if kernel_available() else 'numpy'})"
    )
    phrase = " the LORD of hosts"
    print(f"rows hit by {phrase!r} in layer {layer_id} (first 2 heads per order):")
    for hit in ix.explain(phrase, layer_id):
        print(
            "  "
            + "   ".join(f"{g!r}: {list(r[:2])}" for g, r in zip(hit.ngrams, hit.rows, strict=True))
        )

    print("\n== 4. the Engram layer")
    dim = args.dim
    sizes = ix.hasher.flat_table_sizes(layer_id)
    engram = Engram.from_config(cfg, dim, sizes, seed=args.seed, table_std=0.02)
    embed = nn.Embedding(c.vocab_size, dim)  # hidden states for the forward: token embeddings
    rows0 = torch.from_numpy(all_rows[0, :B])  # (B, T, H) of the first batch
    ids0 = torch.from_numpy(inputs[0])
    with torch.no_grad():
        h = embed(ids0)
        full = engram(h, rows0)
        state = engram.init_conv_state(B)
        parts = []
        for t in range(0, T, 37):
            y, state = engram(h[:, t : t + 37], rows0[:, t : t + 37], conv_state=state)
            parts.append(y)
        streamed = torch.cat(parts, 1)
        gates = engram.gate(h[:, :, None], engram.lookup(rows0))
    print(
        f"table {engram.table_params():,} params in {len(sizes)} sub-tables; dense {engram.dense_params():,}; "
        f"output {tuple(full.shape)}, mean gate {gates.mean():.3f}; "
        f"streamed in chunks of 37 == full: max |diff| {(streamed - full).abs().max():.1e}"
    )

    print(f"\n== 5. {args.steps} training steps, sparse row updates (table lr x5), vs. no memory")
    results = {}
    for name, with_memory in (("bigram (no memory)", False), ("with Engram", True)):
        torch.manual_seed(args.seed)
        eng = (
            Engram.from_config(cfg, dim, sizes, seed=args.seed, table_std=0.02)
            if with_memory
            else None
        )
        lm = TinyLM(c.vocab_size, dim, eng)
        table = eng.table_parameters() if eng is not None else []
        table_ids = {id(p) for p in table}
        dense = [p for p in lm.parameters() if id(p) not in table_ids]
        opts = [torch.optim.AdamW(dense, lr=args.lr, weight_decay=0.0)]
        if table:
            opts.append(torch.optim.SparseAdam(table, lr=args.lr * 5))
        t0 = time.perf_counter()
        val = n_batches - 1  # the last batch is held out
        for step in range(args.steps):
            i = step % max(1, val)
            rows = torch.from_numpy(all_rows[0, i * B : (i + 1) * B])
            logits = lm(torch.from_numpy(inputs[i]), rows)
            loss = nn.functional.cross_entropy(
                logits.flatten(0, 1), torch.from_numpy(targets[i]).flatten()
            )
            for o in opts:
                o.zero_grad()
            loss.backward()
            if step == 0 and eng is not None:
                g = eng.store.weight.grad.coalesce()
                touched = g.indices().shape[1]
                print(
                    f"  sparse table gradient: {touched:,} of {eng.store.num_rows:,} rows touched "
                    f"({touched / eng.store.num_rows:.2%})"
                )
            for o in opts:
                o.step()
        with torch.no_grad():
            rows = torch.from_numpy(all_rows[0, val * B : (val + 1) * B])
            vl = nn.functional.cross_entropy(
                lm(torch.from_numpy(inputs[val]), rows).flatten(0, 1),
                torch.from_numpy(targets[val]).flatten(),
            )
        results[name] = (loss.item(), vl.item(), time.perf_counter() - t0)
        print(
            f"  {name:20s} train loss {loss.item():.3f}  held-out loss {vl.item():.3f}  ({results[name][2]:.1f}s)"
        )
    print(
        "\nThe memory's n-gram rows are learned with sparse updates; the full training pipeline and"
    )
    print("the iso-parameter MoE comparison come with `engram train` (see README).")


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engram", description="Engram conditional memory for PyTorch")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--layers", help="comma-separated 0-based Engram layer ids (default: 1)")
        sp.add_argument("--table-size", type=int, help="target rows per sub-table (default 20000)")

    d = sub.add_parser("demo", help="run the core memory end to end on the built-in corpus")
    common(d)
    d.add_argument("--translations", default="kjv,web", help="built-in translations to use")
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--seq", type=int, default=128)
    d.add_argument("--dim", type=int, default=64)
    d.add_argument("--steps", type=int, default=40)
    d.add_argument("--lr", type=float, default=3e-3)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="print the memory's figures for a configuration")
    common(i)
    i.set_defaults(func=cmd_info)

    r = sub.add_parser("rows", help="show which rows each token's n-grams hit")
    common(r)
    r.add_argument("text")
    r.add_argument("--layer", type=int, help="Engram layer id (default: the first)")
    r.set_defaults(func=cmd_rows)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch", "seq", "dim", "steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"engram: error: --{name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    try:
        args.func(args)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        print(f"engram: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
