"""Generation: incremental decoding (KV cache, streaming hash and conv state) equals recompute."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engram.generate import Decoder, generate, sample_next
from engram.presets import tiny_engram, tiny_moe
from engram.tokenizer import EOT_ID
from engram.train import RunParts, build_run

pytestmark = pytest.mark.usefixtures("one_thread")


def _liven(parts: RunParts) -> RunParts:
    """Random (non-zero) Engram value projections and convs, so the memory changes the logits."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for e in parts.model.engram_layers().values():
            e.value_proj.weight.copy_(torch.randn(e.value_proj.weight.shape, generator=gen) * 0.1)
            if e.short_conv is not None:
                w = e.short_conv.conv.weight
                w.copy_(torch.randn(w.shape, generator=gen) * 0.2)
    parts.model.eval()
    return parts


@pytest.fixture(scope="module")
def runs(gpt2_tokenizer, analysis_cache) -> dict[str, RunParts]:
    eng = tiny_engram()
    hc = replace(
        eng,
        model=replace(eng.model, hc_mult=2),
        engram=replace(eng.engram, layer_ids=(0, 1)),
    )
    position = replace(eng, engram=replace(eng.engram, addressing="position"))
    constant = replace(eng, engram=replace(eng.engram, addressing="constant"))
    out = {}
    for name, cfg in (
        ("engram", eng), ("hc", hc), ("moe", tiny_moe()), ("position", position),
        ("constant", constant),
    ):  # fmt: skip
        out[name] = _liven(build_run(cfg, gpt2_tokenizer, cache_dir=analysis_cache))
    return out


def _prompts(parts: RunParts) -> list[list[int]]:
    tok = parts.tokenizer
    return [
        tok.encode("In the beginning God created the heaven").ids,
        tok.encode("And").ids,
        # a separator inside the prompt: the n-gram window restarts after it, as in training
        [*tok.encode("the host of them.").ids, EOT_ID, *tok.encode("Thus the heavens").ids],
    ]


def _full_logits(parts: RunParts, seq: list[int]) -> torch.Tensor:
    idx = torch.tensor([seq])
    rows = None
    if parts.indexer is not None:
        rows = torch.as_tensor(parts.indexer.rows(idx.numpy()))
    with torch.no_grad():
        return parts.model(idx, rows).logits[0]  # (T, V)


@pytest.mark.parametrize("name", ["engram", "hc", "moe", "position", "constant"])
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_incremental_equals_full_recompute(runs, name: str, chunk: int | None) -> None:
    parts = runs[name]
    prompts = _prompts(parts)
    res = generate(
        parts.model,
        prompts,
        indexer=parts.indexer,
        max_new_tokens=8,
        temperature=1.0,
        top_k=50,
        seed=3,
        prefill_chunk=chunk,
        return_logits=True,
    )
    assert res.logits is not None and len(res.logits) == 8
    for b, p in enumerate(prompts):
        assert len(res.tokens[b]) == 8
        full = _full_logits(parts, p + res.tokens[b])  # (T, V)
        ref = full[len(p) - 1 : len(p) - 1 + 8]  # the logits each new token was drawn from
        got = torch.stack([step[b] for step in res.logits])
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)


def test_batched_equals_alone_greedy(runs) -> None:
    parts = runs["hc"]
    prompts = _prompts(parts)
    batched = generate(
        parts.model, prompts, indexer=parts.indexer, max_new_tokens=6, temperature=0
    ).tokens
    for b, p in enumerate(prompts):
        alone = generate(parts.model, [p], indexer=parts.indexer, max_new_tokens=6, temperature=0)
        assert alone.tokens[0] == batched[b]


def test_memory_changes_generation(runs) -> None:
    """The Engram rows really feed the logits: disabling the value projection changes them."""
    parts = runs["engram"]
    p = _prompts(parts)[:1]
    a = generate(parts.model, p, indexer=parts.indexer, max_new_tokens=2, return_logits=True)
    layer = next(iter(parts.model.engram_layers().values()))
    saved = layer.value_proj.weight.detach().clone()
    with torch.no_grad():
        layer.value_proj.weight.zero_()
    try:
        b = generate(parts.model, p, indexer=parts.indexer, max_new_tokens=2, return_logits=True)
    finally:
        with torch.no_grad():
            layer.value_proj.weight.copy_(saved)
    assert a.logits is not None and b.logits is not None
    assert not torch.allclose(a.logits[0], b.logits[0])


def test_seeded_sampling_is_deterministic(runs) -> None:
    parts = runs["engram"]
    kw = dict(indexer=parts.indexer, max_new_tokens=6, temperature=0.8, top_k=40)
    a = generate(parts.model, _prompts(parts), seed=5, **kw).tokens
    b = generate(parts.model, _prompts(parts), seed=5, **kw).tokens
    c = generate(parts.model, _prompts(parts), seed=6, **kw).tokens
    assert a == b
    assert a != c


def test_top_k_one_is_greedy() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, 1.3, 1, gen), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 0.0, None, gen), logits.argmax(-1))


def test_eos_stops_a_sequence(runs) -> None:
    parts = runs["engram"]
    prompts = _prompts(parts)
    greedy = generate(parts.model, prompts, indexer=parts.indexer, max_new_tokens=6, temperature=0)
    eos = greedy.tokens[0][2]  # pretend the third greedy token of prompt 0 is the end token
    res = generate(
        parts.model, prompts, indexer=parts.indexer, max_new_tokens=6, temperature=0, eos_id=eos
    )
    first = greedy.tokens[0].index(eos)
    assert res.tokens[0] == greedy.tokens[0][: first + 1]
    for b in range(1, len(prompts)):  # the others are cut at their own first eos, if any
        g = greedy.tokens[b]
        assert res.tokens[b] == (g[: g.index(eos) + 1] if eos in g else g)


def test_cache_reorder_continues_the_selected_sequences(runs) -> None:
    parts = runs["engram"]
    model, idx_ = parts.model, parts.indexer
    assert idx_ is not None
    ids = torch.tensor([_prompts(parts)[0][:5], _prompts(parts)[2][:5]])
    rows = torch.as_tensor(idx_.rows(ids.numpy()))
    with torch.no_grad():
        cache = model.new_cache(2, 8)
        model(ids[:, :4], rows[:, :, :4], cache=cache)
        swapped = cache.reorder(torch.tensor([1, 0]))
        out = model(ids.flip(0)[:, 4:], rows.flip(1)[:, :, 4:], cache=swapped).logits[:, -1]
        full = model(ids.flip(0), rows.flip(1)).logits[:, -1]
    torch.testing.assert_close(out, full, rtol=0, atol=2e-5)


def test_bad_requests_are_refused(runs) -> None:
    parts = runs["engram"]
    m, ix = parts.model, parts.indexer
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(m, [[1, 2], []], indexer=ix)
    with pytest.raises(ValueError, match="token id 99999999 outside"):
        generate(m, [[1, 99999999]], indexer=ix)
    with pytest.raises(ValueError, match="max_seq_len 64"):
        generate(m, [[1] * 60], indexer=ix, max_new_tokens=10)
    with pytest.raises(ValueError, match="pass the run's indexer"):
        generate(m, [[1, 2]])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(m, [[1, 2]], indexer=ix, temperature=-1)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        generate(m, [[1, 2]], indexer=ix, top_k=0)
    with pytest.raises(ValueError, match="non-empty list"):
        generate(m, [], indexer=ix)
    cache = m.new_cache(1, 2)
    with pytest.raises(ValueError, match="cache capacity 2 exceeded"):
        ids = torch.tensor([[1, 2, 3]])
        m(ids, torch.as_tensor(ix.rows(ids.numpy())), cache=cache)


def test_decoder_steps_interleaved_equal_generate(runs) -> None:
    """Two decoders advanced step by step, in turn, produce generate's tokens and logits."""
    kw = {"max_new_tokens": 6, "temperature": 0.9, "top_k": 20, "return_logits": True}
    parts = runs["hc"]
    ref = [
        generate(parts.model, _prompts(parts), indexer=parts.indexer, seed=s, **kw) for s in (1, 2)
    ]
    decs = [
        Decoder(parts.model, _prompts(parts), indexer=parts.indexer, seed=s, **kw) for s in (1, 2)
    ]
    for d in decs:
        d.prefill()
    while any(not d.finished for d in decs):
        for d in decs:
            d.step()
    for r, d in zip(ref, decs, strict=True):
        res = d.result()
        assert res.tokens == r.tokens and res.steps == r.steps == 5
        assert all(torch.equal(a, b) for a, b in zip(res.logits, r.logits, strict=True))
        assert len(res.stats["decode_step_s"]) == res.steps
        assert all(t > 0 for t in res.stats["decode_step_s"])
        assert not res.logits[0].requires_grad  # decoding builds no autograd graph
    assert not decs[0].step()  # finished: stepping again is a no-op
    with pytest.raises(RuntimeError, match="prefill"):
        Decoder(parts.model, _prompts(parts), indexer=parts.indexer).step()
    with pytest.raises(RuntimeError, match="already"):
        decs[0].prefill()


def test_model_takes_rows_per_layer(runs) -> None:
    parts = runs["hc"]
    idx = torch.tensor([parts.tokenizer.encode("In the beginning God created").ids])
    rows = torch.from_numpy(parts.indexer.rows(idx.numpy()))  # (L, B, T, H)
    with torch.no_grad():
        whole = parts.model(idx, rows, return_logits=True).logits
        split = parts.model(idx, list(rows.unbind(0)), return_logits=True).logits
    assert torch.equal(whole, split)
    with pytest.raises(ValueError, match="2 tensors of shape"):
        parts.model(idx, [rows[0]])
