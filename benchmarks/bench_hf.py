"""Engram inside a Hugging Face Llama (`engram.hf.add_engram`): training step time and generation.

    python benchmarks/bench_hf.py train    [--steps 16] [--threads 2] [--adapter] [--ablate]
    python benchmarks/bench_hf.py generate [--gen-batch 4] [--new-tokens 64] [--rounds 7]
                                           [--gen-threads 1] [--cache-rows 20000]
    python benchmarks/bench_hf.py all      (both)

The model: a `transformers.LlamaForCausalLM` built from `LlamaConfig` with random init (no hub
download): 6 layers, hidden 384, 6 heads, SwiGLU 1024, untied head, and the byte-level BPE with
4,096 ids that `engram demo` trains on the King James Version's training chapters (`<|endoftext|>`
= 0 is bos, eos, pad and Engram's pad id). Engram is attached before attention at blocks 1 and 3
(orders 2-3, 4 heads per order, 32-dim rows, E = 256); each layer's table has about 400,000 rows
(8 prime sub-tables from 50,000 up: 400,374 and 400,894), 51 MB of float32.

train: the models live in one process and take turns (base, engram, engram', base, ...) on the
SAME batches of 8 x 256 KJV tokens; median step time over the steps after 2 warm-up steps, and
the quartiles of the per-step ratio engram / base (each pair of steps shares the machine's noise).
Like for like: FULL training of both. The base model: AdamW on every parameter. The Engram model
(`train_base=True`): the same AdamW on every dense parameter (base and Engram projections), and
SparseAdam (lazy, touched rows only) on the tables, through `engram.optim.build_optimizer`.
A step is forward + loss (`labels=`), backward, gradient clipping, optimizer step, zero_grad.
Two Engram models (same init) are timed: one hashing its rows inside the forward (what a plain
`model(input_ids=...)` call does), one given rows hashed beforehand as `engram_rows` (what
engram's data loader does on a background thread). `--adapter` adds Engram in adapter mode
(base frozen, only Engram trains): NOT like for like with the base's full step, printed for
information; `--ablate` adds Engram without its short conv (`use_short_conv=False`), to show
what the depthwise conv costs. Also printed: Engram's share of the forward FLOPs per token
(`engram.hf.flops`) and the target, step-time overhead <= FLOP share + 5 percentage points.

generate: the Engram model is trained `--warm-steps` steps (so its tables and value projection are
not at their init, where the value projection is zero and Engram writes nothing), its tables are
exported with the table-file writer (`write_table`, float32, the attachment's hash fingerprint),
and a second model with the same weights serves them like `engram generate --store mmap`: per
layer `MmapRowStore` (MADV_RANDOM, WILLNEED) -> `CachedRowStore` (TinyLFU, `--cache-rows`) ->
`PrefetchingStore` (one `Prefetcher` thread). `add_engram` itself does not prefetch; this script
registers a backbone pre-hook (after Engram's) that requests every Engram layer's rows as soon as
they are hashed, as `engram.generate` does before block 0. A third model reads the same files
through a bare `MmapRowStore` (no cache, no prefetch), for information. All run `model.generate`
on the same left-padded prompts, greedy, KV cache on, `--new-tokens` new tokens (eos suppressed
by `min_new_tokens`), in an order that rotates every round; tokens/s = batch * new tokens / wall
time of the `generate` call (prefill included); medians over rounds. Every round checks the
tokens AND every decoding step's logits (`output_scores`) for bit equality across the three. The table files are warm in the page cache (just written); cold reads are
`bench_store.py`'s topic. Load averages are printed at start and end: the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from prompts import PROMPTS  # benchmarks/prompts.py
from torch import Tensor, nn

from engram.config import EngramConfig
from engram.data import prepare_data
from engram.data.tokenize import data_tokenizer
from engram.demo import demo_configs
from engram.hf import add_engram, get_attachment
from engram.hf.flops import engram_flops_per_token, hf_flops_per_token
from engram.optim import EngramOptimizer, OptimConfig, build_optimizer
from engram.serving import WILLNEED_MAX
from engram.store import (
    CachedRowStore,
    MmapRowStore,
    Prefetcher,
    PrefetchingStore,
    RowStore,
    table_file_name,
    write_table,
)
from engram.tokenizer import separator_id

SEP = 0  # <|endoftext|> of the corpus BPE
LLAMA = dict(
    hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
    num_key_value_heads=6, max_position_embeddings=512, tie_word_embeddings=False,
    bos_token_id=SEP, eos_token_id=SEP, pad_token_id=SEP,
)  # fmt: skip
ENGRAM = EngramConfig(
    engram_vocab_size=(50_000, 50_000),
    max_ngram_size=3,
    n_embed_per_ngram=128,
    n_head_per_ngram=4,
    layer_ids=(1, 3),
    pad_id=SEP,
)
OPTIM = OptimConfig(lr=1e-3, table_lr_mult=5.0, warmup_steps=0)
BASE, ENG, ENG_ROWS = "base (AdamW, full)", "engram, hashing in forward", "engram, rows precomputed"


# ----------------------------------------------------------------------------- machine


def cpu_line() -> str:
    """CPU model, the SIMD flags that matter to torch, cores, versions."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"]
    have = [f for f in wanted if f in flags]
    return (
        f"cpu: {model} | flags: {' '.join(have) or 'none of ' + ','.join(wanted)} | "
        f"{torch.get_num_threads()} torch threads of {os.cpu_count()} cores | "
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )


def load_line(when: str) -> str:
    """Load averages: other jobs on the machine skew timings; the record should say so."""
    one, five, fifteen = os.getloadavg()
    return f"load average at {when}: {one:.2f} {five:.2f} {fifteen:.2f}"


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
QUIET = 0.05  # a step is "quiet" if other processes used < 5% of the machine's CPU time meanwhile


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores, all processes) since boot."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / _HZ


class Others:
    """Share of the machine's CPU time other processes used during a timed interval.

    busy(machine) - cpu(this process), over wall * cores, from /proc/stat and
    `time.process_time` (10 ms resolution): the machine is shared with other jobs, and a step
    they slowed down is flagged instead of silently entering a median.
    """

    def __init__(self) -> None:
        self.t, self.busy, self.own = time.perf_counter(), _machine_busy_s(), time.process_time()

    def share(self) -> float:
        wall = time.perf_counter() - self.t
        others = (_machine_busy_s() - self.busy) - (time.process_time() - self.own)
        return max(0.0, others) / (wall * (os.cpu_count() or 1))


# ----------------------------------------------------------------------------- models and data


def corpus() -> tuple[Any, np.ndarray]:
    """The demo's BPE-4096 tokenizer and the packed KJV training tokens."""
    base_cfg, _, _ = demo_configs()
    tok = data_tokenizer(base_cfg.data)
    assert tok.get_vocab_size(with_added_tokens=True) == 4096 and separator_id(tok) == SEP
    data = prepare_data(base_cfg.data, tok, separator_id(tok))
    return tok, np.asarray(data.train.tokens, dtype=np.int64)


def llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=4096, **LLAMA)
    return transformers.LlamaForCausalLM(cfg)


def engram_llama(
    tok: Any,
    *,
    train_base: bool = True,
    stores: dict[int, RowStore] | None = None,
    cfg: EngramConfig = ENGRAM,
) -> transformers.LlamaForCausalLM:
    return add_engram(llama(), cfg, tok, train_base=train_base, stores=stores)


def batches(tokens: np.ndarray, n: int, batch: int, seq: int, seed: int = 0) -> list[Tensor]:
    g = np.random.default_rng(seed)
    starts = g.integers(0, len(tokens) - seq, size=(n, batch))
    return [torch.from_numpy(np.stack([tokens[s : s + seq] for s in row])) for row in starts]


def optimizer(model: nn.Module) -> EngramOptimizer:
    att = getattr(model, "engram", None)
    tables = att.table_parameters() if att is not None else []
    return build_optimizer(model, OPTIM, table_params=tables)


def stepper(model: nn.Module) -> Callable[..., tuple[float, float, float]]:
    """A training step function for `model` with its own optimizer."""
    model.train()
    opt = optimizer(model)

    def step(x: Tensor, rows: Tensor | None = None) -> tuple[float, float, float]:
        """(seconds, loss, share of the machine other processes used meanwhile)."""
        others = Others()
        t0 = time.perf_counter()
        kw = {} if rows is None else {"engram_rows": rows}
        out = model(input_ids=x, labels=x, use_cache=False, **kw)
        out.loss.backward()
        opt.clip_grad_norm()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t0, float(out.loss.detach()), others.share()

    return step


def n_params(model: nn.Module) -> tuple[int, int]:
    """(dense parameters, table values) of a model."""
    att = getattr(model, "engram", None)
    tables = {id(p) for p in att.table_parameters()} if att is not None else set()
    dense = sum(p.numel() for p in model.parameters() if id(p) not in tables)
    table = sum(p.numel() for p in model.parameters() if id(p) in tables)
    return dense, table


# ----------------------------------------------------------------------------- train


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    print(cpu_line())
    print(load_line("start"))
    tok, tokens = corpus()
    data = batches(tokens, args.steps, args.batch, args.seq)
    base = llama()
    eng = engram_llama(tok, train_base=True)
    att = get_attachment(eng)
    rows = [att.rows(x, None) for x in data]  # what a loader thread precomputes
    contenders: dict[str, tuple[Callable[..., tuple[float, float, float]], list[Tensor | None]]] = {
        BASE: (stepper(base), [None] * len(data)),
        ENG: (stepper(eng), [None] * len(data)),
    }
    # The same Engram model, timed again with rows given: identical weights are not needed for
    # timing, so a second model with its own optimizer keeps the two Engram timings independent.
    eng_rows = engram_llama(tok, train_base=True)
    contenders[ENG_ROWS] = (stepper(eng_rows), rows)
    if args.ablate:
        no_conv = engram_llama(tok, cfg=replace(ENGRAM, use_short_conv=False))
        contenders["engram without short conv"] = (stepper(no_conv), [None] * len(data))
    if args.adapter:
        adapter = engram_llama(tok, train_base=False)
        contenders["engram adapter (base frozen)"] = (stepper(adapter), [None] * len(data))

    dense_b, _ = n_params(base)
    dense_e, table_e = n_params(eng)
    f_total = hf_flops_per_token(eng, args.seq)
    f_engram = engram_flops_per_token(att)
    f_base = hf_flops_per_token(base, args.seq)
    share = f_engram / f_total
    rows_per_layer = [sum(e.table_sizes) for e in att.engram_layers().values()]
    print(
        f"Llama {LLAMA['num_hidden_layers']} layers, d={LLAMA['hidden_size']}, vocab 4096: "
        f"{dense_b:,} params; + Engram at blocks {list(ENGRAM.layer_ids)}: {dense_e - dense_b:,} "
        f"dense + {table_e:,} table values ({rows_per_layer} rows x {ENGRAM.head_dim})"
    )
    print(
        f"forward FLOPs/token at T={args.seq}: base {f_base:,}, with Engram {f_total:,}, "
        f"Engram {f_engram:,} = {share:.2%} of the whole model"
    )
    print(
        f"{args.steps} interleaved steps of {args.batch} x {args.seq} tokens "
        f"(steps 3..{args.steps} timed); like for like: full training of both"
    )
    times: dict[str, list[float]] = {k: [] for k in contenders}
    busy: dict[str, list[float]] = {k: [] for k in contenders}
    losses: dict[str, list[float]] = {k: [] for k in contenders}
    for i, x in enumerate(data):
        for name, (fn, extra) in contenders.items():
            dt, loss, other = fn(x, extra[i])
            losses[name].append(loss)
            if i >= 2:  # the first steps allocate optimizer state
                times[name].append(dt)
                busy[name].append(other)
        if args.verbose and i >= 2:
            print(f"  step {i + 1}: " + "  ".join(f"{k} {times[k][-1] * 1e3:.0f} ms ({busy[k][-1]:.0%})" for k in times))  # fmt: skip
    # Steps where every model ran with other processes using < QUIET of the machine.
    quiet = [j for j in range(len(times[BASE])) if all(busy[k][j] < QUIET for k in busy)]
    print(
        f"quiet steps (other processes < {QUIET:.0%} of the CPU during every model's step): "
        f"{len(quiet)} of {len(times[BASE])}"
    )
    use = quiet if len(quiet) >= 5 else list(range(len(times[BASE])))
    if use is not quiet:
        print("  fewer than 5 quiet steps: the figures below use ALL steps (machine busy)")
    med = {k: statistics.median(v[j] for j in use) for k, v in times.items()}
    med_all = {k: statistics.median(v) for k, v in times.items()}
    ref = med[BASE]
    ntok = args.batch * args.seq
    for name, m in med.items():
        print(
            f"  {name:30s} median {m * 1e3:7.1f} ms  {ntok / m:6.0f} tok/s  vs base {m / ref:.3f}x"
            f"  (all steps: {med_all[name] / med_all[BASE]:.3f}x; "
            f"loss {losses[name][0]:.3f} -> {losses[name][-1]:.3f})"
        )
    target = share + 0.05
    for name in (ENG, ENG_ROWS):
        pair = [times[name][j] / times[BASE][j] for j in use]
        q = np.percentile(pair, [25, 50, 75])
        over = med[name] / ref - 1
        verdict = "MET" if over <= target else "NOT met"
        print(
            f"  {name}: overhead {over:+.2%} (per-step ratio quartiles {q[0]:.3f} / {q[1]:.3f} / "
            f"{q[2]:.3f}) vs target <= {target:.2%} (FLOP share + 5%): {verdict}"
        )
    print(load_line("end"))


# ----------------------------------------------------------------------------- generate


def export(model: nn.Module, out: Path) -> dict[int, Path]:
    """Write each Engram layer's RAM table to `out/table_L<id>.engt` (float32, bit-exact)."""
    att = get_attachment(model)
    files = {}
    for lid, layer in att.engram_layers().items():
        path = out / table_file_name(lid)
        weight = layer.store.weight.detach()  # type: ignore[union-attr]
        write_table(
            path, weight, dtype="float32", fingerprint=att.fingerprint(), layer_id=lid,
            meta={"source": "benchmarks/bench_hf.py", "sub_table_sizes": list(layer.table_sizes)},
        )  # fmt: skip
        files[lid] = path
    return files


def served_stores(
    files: dict[int, Path], fingerprint: str, cache_rows: int, prefetcher: Prefetcher | None
) -> dict[int, RowStore]:
    """mmap -> hot-row cache -> prefetch, per layer, as `engram.serving.load_served` stacks them."""
    stores: dict[int, RowStore] = {}
    for lid, f in files.items():
        store: RowStore = MmapRowStore(
            f, expected_fingerprint=fingerprint, check_bounds=False, willneed_max=WILLNEED_MAX
        )
        if cache_rows:
            store = CachedRowStore(store, capacity_rows=cache_rows, check_bounds=False)
        if prefetcher is not None:
            store = PrefetchingStore(store, prefetcher)
        stores[lid] = store
    return stores


def install_prefetch(model: nn.Module) -> None:
    """Request every Engram layer's rows as soon as the backbone hook has hashed them."""
    att = get_attachment(model)
    layers = [att.layers[str(lid)] for lid in att.cfg.layer_ids]

    def hook(module: nn.Module, args: tuple) -> None:
        call = att._call  # set by add_engram's backbone pre-hook, registered before this one
        if call is not None:
            for i, layer in enumerate(layers):
                layer.prefetch(call.rows[i], call.live)  # type: ignore[operator]

    model.model.register_forward_pre_hook(hook)


def left_pad(tok: Any, prompts: list[str]) -> tuple[Tensor, Tensor]:
    ids = [tok.encode(p).ids for p in prompts]
    P = max(map(len, ids))
    x = torch.full((len(ids), P), SEP, dtype=torch.long)
    mask = torch.zeros((len(ids), P), dtype=torch.long)
    for i, s in enumerate(ids):
        x[i, P - len(s) :] = torch.tensor(s)
        mask[i, P - len(s) :] = 1
    return x, mask


def generate(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.gen_threads)
    print(cpu_line())
    print(load_line("start"))
    tok, tokens = corpus()
    ram = engram_llama(tok, train_base=True)
    step = stepper(ram)
    t0 = time.perf_counter()
    losses = [step(x)[1] for x in batches(tokens, args.warm_steps, 8, 256, seed=1)]
    print(
        f"Engram Llama trained {args.warm_steps} steps of 8 x 256 tokens in "
        f"{time.perf_counter() - t0:.0f} s (loss {losses[0]:.3f} -> {losses[-1]:.3f})"
    )
    ram.eval()
    att = get_attachment(ram)
    x, mask = left_pad(tok, PROMPTS[: args.gen_batch])
    gen_kw = dict(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
        use_cache=True, pad_token_id=SEP, eos_token_id=SEP, output_scores=True,
        return_dict_in_generate=True,
    )  # fmt: skip

    # Engram must matter for the identity check to mean anything: logits with and without it.
    with torch.no_grad():
        on = ram(input_ids=x, attention_mask=mask).logits[:, -1]
        saved = [(e.value_proj.weight.clone(), e.value_proj.bias.clone()) for e in att.layers.values()]  # type: ignore[union-attr]  # fmt: skip
        for e in att.layers.values():
            e.value_proj.weight.zero_()  # type: ignore[union-attr]
            e.value_proj.bias.zero_()  # type: ignore[union-attr]
        off = ram(input_ids=x, attention_mask=mask).logits[:, -1]
        for e, (w, b) in zip(att.layers.values(), saved, strict=True):
            e.value_proj.weight.copy_(w)  # type: ignore[union-attr]
            e.value_proj.bias.copy_(b)  # type: ignore[union-attr]
    print(
        f"Engram's effect on the prompts' next-token logits: max |diff| "
        f"{(on - off).abs().max():.4f}, greedy token changed in "
        f"{int((on.argmax(-1) != off.argmax(-1)).sum())}/{len(x)} prompts"
    )

    with tempfile.TemporaryDirectory(prefix="bench_hf_") as tmp:
        files = export(ram, Path(tmp))
        mib = sum(f.stat().st_size for f in files.values()) / 2**20
        prefetcher = Prefetcher(max_pending=2 * len(files))
        tiers = {
            "disk": served_stores(files, att.fingerprint(), args.cache_rows, prefetcher),
            "mmap only": served_stores(files, att.fingerprint(), 0, None),
        }
        models: dict[str, nn.Module] = {"ram": ram}
        for name, stores in tiers.items():
            m = engram_llama(tok, train_base=True, stores=stores)
            missing, unexpected = m.load_state_dict(ram.state_dict(), strict=False)
            tables = {f"engram.layers.{lid}.store.weight" for lid in files}
            assert not missing and set(unexpected) == tables, (missing, unexpected)
            m.eval()
            models[name] = m
        install_prefetch(models["disk"])
        print(
            f"tables: {len(files)} x {[sum(e.table_sizes) for e in att.engram_layers().values()]} "
            f"rows x {ENGRAM.head_dim} float32 in RAM vs {mib:.0f} MiB of table files; "
            f"disk = mmap + {args.cache_rows:,}-row cache + prefetch; "
            "mmap only (no cache, no prefetch) for information"
        )
        print(
            f"batch {len(x)} prompts (left-padded to {x.shape[1]}), {args.new_tokens} new tokens, "
            f"greedy, KV cache, {args.rounds} rounds, order rotating each round"
        )

        def run(model: nn.Module) -> tuple[float, tuple[Tensor, Tensor], float]:
            """(seconds, (tokens (B, P + new), every step's logits (new, B, V)), others' share)."""
            others = Others()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(x, attention_mask=mask, **gen_kw)
            dt = time.perf_counter() - t0
            return dt, (out.sequences, torch.stack(out.scores)), others.share()

        for m in models.values():
            run(m)  # warm-up (allocations, first page touches of the file)
        speed: dict[str, list[float]] = {k: [] for k in models}
        busy: dict[str, list[float]] = {k: [] for k in models}
        ntok = len(x) * args.new_tokens
        names = list(models)
        for r in range(args.rounds):
            outs = {}
            for name in names[r % len(names) :] + names[: r % len(names)]:
                dt, outs[name], other = run(models[name])
                speed[name].append(ntok / dt)
                busy[name].append(other)
            assert outs["ram"][0].shape[1] == x.shape[1] + args.new_tokens
            same = all(torch.equal(outs["ram"][0], o[0]) for o in outs.values())
            same_logits = all(torch.equal(outs["ram"][1], o[1]) for o in outs.values())
            print(
                f"  round {r}: "
                + ", ".join(f"{k} {v[-1]:6.1f}" for k, v in speed.items())
                + f" tok/s; disk/RAM {speed['disk'][-1] / speed['ram'][-1]:.3f}; others used "
                f"{max(b[-1] for b in busy.values()):.0%} of the CPU; tokens identical: {same}, "
                f"logits bit-identical: {same_logits}"
            )
            assert same and same_logits, "RAM and disk outputs differ"
        quiet = [r for r in range(args.rounds) if all(b[r] < QUIET for b in busy.values())]
        use = quiet if len(quiet) >= 3 else list(range(args.rounds))
        print(
            f"quiet rounds (other processes < {QUIET:.0%} of the CPU): {len(quiet)} of {args.rounds}"
            + ("" if use is quiet else "; fewer than 3: medians over ALL rounds (machine busy)")
        )
        med = {k: statistics.median(v[r] for r in use) for k, v in speed.items()}
        for name, m in med.items():
            pair = [speed[name][r] / speed["ram"][r] for r in use]
            print(
                f"  {name:10s} median {m:7.1f} tok/s  vs RAM {m / med['ram']:.3f}x "
                f"(per-round ratios {min(pair):.3f}-{max(pair):.3f})"
            )
        print(
            f"all {args.rounds} rounds: tokens identical and every step's logits bit-identical "
            "across the three"
        )
        for lid, st in tiers["disk"].items():
            p = st.stats.as_dict()  # type: ignore[attr-defined]
            inner = st.inner  # type: ignore[attr-defined]
            c = inner.stats() if isinstance(inner, CachedRowStore) else None
            print(
                f"  disk layer {lid}: prefetched gathers {p['prefetched_hits']:.0f}, synchronous "
                f"{p['sync_gathers']:.0f}, waited {p['wait_time_s'] * 1e3:.0f} ms"
                + (f"; cache hit rate {c.hit_rate:.1%}" if c is not None else "")
            )
        prefetcher.close()
        for stores in tiers.values():
            for st in stores.values():
                s: Any = st
                while s is not None:
                    if isinstance(s, MmapRowStore):
                        s.close()
                    s = getattr(s, "inner", None)
    print(load_line("end"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=["train", "generate", "all"])
    t = p.add_argument_group("train")
    t.add_argument("--steps", type=int, default=16)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--seq", type=int, default=256)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--adapter", action="store_true", help="also time adapter mode (base frozen)")
    t.add_argument("--ablate", action="store_true", help="also time Engram without its short conv")
    t.add_argument("--verbose", action="store_true", help="print every step's times")
    g = p.add_argument_group("generate")
    g.add_argument("--gen-batch", type=int, default=4)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--rounds", type=int, default=7)
    g.add_argument("--warm-steps", type=int, default=10)
    g.add_argument("--cache-rows", type=int, default=20_000)
    g.add_argument("--gen-threads", type=int, default=1)
    args = p.parse_args()
    if args.mode in ("train", "all"):
        train(args)
    if args.mode in ("generate", "all"):
        generate(args)


if __name__ == "__main__":
    main()
