"""engram.hf.add_engram on tiny random models of every supported family (built offline).

Proves agreement: logits bit-identical to the base right after attaching; incremental decoding
with the KV cache equal to a full forward (token by token and chunked); `generate` with the
cache equal to `generate` without it (greedy, sampling, beam search, left-padded batches);
padding and document resets giving each sequence the rows it has alone; rows equal to the
built-in pipeline's `NgramIndexer`.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engram.config import EngramConfig  # noqa: E402
from engram.hf import UnsupportedModelError, add_engram, get_attachment  # noqa: E402
from engram.indexer import NgramIndexer  # noqa: E402
from engram.tokenizer import EOT_ID, load_builtin_tokenizer  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]
CFG = EngramConfig(
    engram_vocab_size=(997, 1009),
    max_ngram_size=3,
    n_embed_per_ngram=16,
    n_head_per_ngram=2,
    layer_ids=(0, 2),
    pad_id=EOT_ID,
)


@pytest.fixture(scope="module")
def tok():
    return load_builtin_tokenizer()


def tiny(family: str, vocab: int = 50257, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    special = min(EOT_ID, vocab - 1)
    ids = {"eos_token_id": special, "bos_token_id": special, "pad_token_id": special}
    if family == "gpt2":
        c = transformers.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=128, **ids
        )
        return transformers.GPT2LMHeadModel(c).eval()
    kw = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **ids,
    )  # fmt: skip
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }
    if family == "qwen3":
        kw["head_dim"] = 8
    config_cls, model_cls = classes[family]
    return model_cls(config_cls(**kw)).eval()


def randomize_engram(model: torch.nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Give every Engram parameter (value projection and conv included) nonzero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in get_attachment(model).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def with_engram(family: str, tok, vocab: int = 50257) -> torch.nn.Module:
    model = add_engram(tiny(family, vocab), CFG, tok)
    randomize_engram(model)
    return model


def cache_of(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_bit_identical_right_after_attaching(family, tok):
    model = tiny(family)
    ids = torch.randint(0, 50257, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        base = model(ids).logits
        base_masked = model(ids, attention_mask=mask).logits
    n_before = model.num_parameters()
    add_engram(model, CFG, tok)
    assert model.num_parameters() > n_before  # the Engram layers count
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
        assert torch.equal(model(ids, attention_mask=mask).logits, base_masked)


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_decoding_equals_full_forward(family, tok):
    model = with_engram(family, tok)
    ids = torch.randint(0, 50257, (3, 15), generator=torch.Generator().manual_seed(1))
    ids[0, 6] = EOT_ID  # a document boundary inside the sequence
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        base_logits = tiny(family)(ids).logits
        assert (full - base_logits).abs().max() > 1e-2  # Engram does change the output
        # token by token after a prefill
        out = model(ids[:, :4], use_cache=True)
        cache, parts = cache_of(out), [out.logits]
        for t in range(4, 15):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            parts.append(out.logits)
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=2e-5)
        # uneven chunks
        out = model(ids[:, :7], use_cache=True)
        cache, parts = cache_of(out), [out.logits]
        for a, b in ((7, 9), (9, 15)):
            out = model(ids[:, a:b], cache=cache, use_cache=True)
            parts.append(out.logits)
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_without(family, tok):
    model = with_engram(family, tok)
    prompts = torch.randint(0, 50256, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompts)
    prompts[1, :2], mask[1, :2] = EOT_ID, 0  # the second prompt is left-padded
    common = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=EOT_ID)
    for kw in (
        dict(do_sample=False),
        dict(do_sample=False, num_beams=3),
        dict(do_sample=True, top_k=20),
    ):
        torch.manual_seed(0)
        cached = model.generate(prompts, use_cache=True, **common, **kw)
        torch.manual_seed(0)
        full = model.generate(prompts, use_cache=False, **common, **kw)
        assert torch.equal(cached, full), kw


def test_beam_search_reorders_the_engram_state(tok):
    """Beams that swap places must carry their own hash window and conv history."""
    model = with_engram("llama", tok)
    att = get_attachment(model)
    prompt = torch.tensor([[464, 3290, 286, 262, 1499]])
    out = model.generate(
        prompt, max_new_tokens=10, num_beams=4, num_return_sequences=4, do_sample=False,
        pad_token_id=EOT_ID, output_scores=True, return_dict_in_generate=True, use_cache=True,
    )  # fmt: skip
    # Rescore each returned beam with a full forward: its summed log-probability must match.
    seqs = out.sequences
    with torch.no_grad():
        logp = torch.log_softmax(model(seqs, use_cache=False).logits.float(), -1)
    gen = seqs[:, prompt.shape[1] :]
    scores = logp[:, prompt.shape[1] - 1 : -1].gather(-1, gen.unsqueeze(-1)).squeeze(-1).sum(1)
    length = gen.shape[1]  # HF normalises by the generated length (length_penalty 1)
    torch.testing.assert_close(scores / length, out.sequences_scores, rtol=0, atol=1e-4)
    assert att._call is None  # nothing of a call outlives it


def test_left_and_right_padding_give_each_sequence_its_own_rows(tok):
    model = with_engram("llama", tok)
    att = get_attachment(model)
    a = torch.tensor([464, 3290, 286, 262, 1499, 373])
    b = torch.tensor([40, 716, 257, 1332])
    left = torch.stack([a, torch.cat([torch.full((2,), EOT_ID), b])])
    left_mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    right = torch.stack([a, torch.cat([b, torch.full((2,), 0)])])
    right_mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    alone = att.rows(b[None], None)  # (L, 1, 4, H)
    assert torch.equal(att.rows(left, left_mask.bool())[:, 1, 2:], alone[:, 0])
    assert torch.equal(att.rows(right, right_mask.bool())[:, 1, :4], alone[:, 0])
    with torch.no_grad():
        ref = model(b[None], use_cache=False).logits[0]
        pos = (left_mask.cumsum(1) - 1).clamp(min=0)
        got = model(left, attention_mask=left_mask, position_ids=pos, use_cache=False).logits
        torch.testing.assert_close(got[1, 2:], ref, rtol=0, atol=2e-5)
        got = model(right, attention_mask=right_mask, use_cache=False).logits
        torch.testing.assert_close(got[1, :4], ref, rtol=0, atol=2e-5)


def test_rows_match_the_builtin_pipeline_and_reset_at_eos(tok):
    model = with_engram("gpt2", tok)
    att = get_attachment(model)
    indexer = NgramIndexer(CFG, att.compressor, tok, sep_id=EOT_ID)
    text = tok.encode("In the beginning God created the heaven and the earth.").ids
    ids = torch.tensor([[*text, EOT_ID, *text]])
    assert att.sep_id == EOT_ID
    rows = att.rows(ids, None)
    assert torch.equal(rows, torch.as_tensor(indexer.rows(ids.numpy())))
    n = len(text) + 1
    assert torch.equal(rows[:, :, n:], rows[:, :, : n - 1])  # the second copy starts afresh


def test_ids_past_the_tokenizer_read_as_pad(tok):
    model = add_engram(tiny("llama", vocab=50300), CFG, tok)
    att = get_attachment(model)
    ids = torch.tensor([[50290, 464, 50299]])
    padded = torch.tensor([[EOT_ID, 464, EOT_ID]])
    assert torch.equal(att.rows(ids, None), att.rows(padded, None))
    with torch.no_grad():
        model(ids)  # no out-of-range error


def test_peft_wrapping_keeps_engram_in_the_forward(tok):
    peft = pytest.importorskip("peft")
    model = with_engram("llama", tok)
    ids = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    wrapped = peft.get_peft_model(model, lora)
    assert get_attachment(wrapped) is get_attachment(model)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids).logits, before, rtol=0, atol=1e-6)
        torch.testing.assert_close(wrapped(input_ids=ids).logits, model(ids).logits, rtol=0, atol=0)


def test_adapter_mode_freezes_the_base_and_full_mode_does_not(tok):
    frozen = add_engram(tiny("llama"), CFG, tok)
    att = get_attachment(frozen)
    engram_ids = {id(p) for p in att.parameters()}
    for p in frozen.parameters():
        assert p.requires_grad == (id(p) in engram_ids)
    full = add_engram(tiny("llama"), CFG, tok, train_base=True)
    assert all(p.requires_grad for p in full.parameters())


def test_save_pretrained_still_works(tok, tmp_path):
    model = with_engram("qwen2", tok)
    model.save_pretrained(tmp_path / "m")
    assert any((tmp_path / "m").glob("*.safetensors"))


def test_precomputed_rows_equal_hashing_inside(tok):
    model = with_engram("mistral", tok)
    att = get_attachment(model)
    ids = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        inside = model(ids, use_cache=False).logits
        given = model(ids, engram_rows=att.rows(ids, None), use_cache=False).logits
    assert torch.equal(inside, given)
    with pytest.raises(ValueError, match=r"engram_rows must have shape"):
        model(ids, engram_rows=att.rows(ids[:, :4], None), use_cache=False)


# --------------------------------------------------------------------------------- refusals
def test_unsupported_architecture_names_the_class(tok):
    opt = transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=50257,
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    )
    with pytest.raises(UnsupportedModelError, match=r"OPTForCausalLM .*model_type='opt'"):
        add_engram(opt, CFG, tok)


def test_layer_ids_outside_the_model(tok):
    cfg = EngramConfig(**{**CFG.to_dict(), "layer_ids": [1, 3]})
    with pytest.raises(ValueError, match=r"layer_ids \[3\] are outside .*3 decoder layers"):
        add_engram(tiny("llama"), cfg, tok)


def test_a_tokenizer_larger_than_the_model(tok):
    with pytest.raises(ValueError, match=r"tokenizer has 50257 ids but .*embedding has 1000"):
        add_engram(tiny("llama", vocab=1000), CFG, tok)


def test_attaching_twice_and_embeddings_only(tok):
    model = add_engram(tiny("llama"), CFG, tok)
    with pytest.raises(ValueError, match="already has Engram"):
        add_engram(model, CFG, tok)
    emb = model.get_input_embeddings()(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=emb)


def test_a_cache_filled_without_engram_is_refused(tok):
    plain = tiny("llama")
    ids = torch.tensor([[464, 3290, 286]])
    with torch.no_grad():
        cache = cache_of(plain(ids, use_cache=True))
    model = add_engram(tiny("llama"), CFG, tok)
    with pytest.raises(ValueError, match=r"KV cache holds 3 positions but Engram's decoding state"):
        model(torch.tensor([[262]]), cache=cache, use_cache=True)


def test_position_addressing_is_refused(tok):
    cfg = EngramConfig(**{**CFG.to_dict(), "addressing": "position"})
    with pytest.raises(ValueError, match="stream positions"):
        add_engram(tiny("llama"), cfg, tok)


def test_constant_addressing_control_reads_row_zero(tok):
    cfg = EngramConfig(**{**CFG.to_dict(), "addressing": "constant"})
    model = add_engram(tiny("llama"), cfg, tok)
    ids = torch.randint(0, 50257, (2, 5))
    assert not get_attachment(model).rows(ids, None).any()


def test_gradient_checkpointing_gives_the_same_gradients(tok):
    """HF's checkpointing (hooks outside) and torch's checkpoint_wrapper (hooks inside, rerun
    during backward after the forward returned) both give the plain gradients."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    ids = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(5))
    grads = []
    for how in ("none", "hf", "torch"):
        model = with_engram("llama", tok)
        model.train()
        if how == "hf":
            model.gradient_checkpointing_enable()
        elif how == "torch":
            layers = model.model.layers
            for i in CFG.layer_ids:
                layers[i] = checkpoint_wrapper(layers[i])
        model(ids, labels=ids, use_cache=False).loss.backward()
        att = get_attachment(model)
        grads.append([p.grad.to_dense().clone() for p in att.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) == len(grads[2]) > 0
    for a, b, c in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6)
