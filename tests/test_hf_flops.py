"""engram.hf.flops against hand counts on tiny Llama, Qwen3 (head_dim != D / heads) and GPT-2."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from engram.config import EngramConfig  # noqa: E402
from engram.hf import add_engram  # noqa: E402
from engram.hf.flops import engram_flops_per_token, hf_flops_per_token  # noqa: E402
from engram.model import ModelConfig, flops_per_token  # noqa: E402
from engram.tokenizer import EOT_ID, load_builtin_tokenizer  # noqa: E402

V, D, FF, LAYERS, T = 50257, 32, 64, 3, 128
CFG = EngramConfig(
    engram_vocab_size=(997, 1009),
    max_ngram_size=3,
    n_embed_per_ngram=16,
    n_head_per_ngram=2,
    layer_ids=(0, 2),
    pad_id=EOT_ID,
)
IDS = {"eos_token_id": EOT_ID, "bos_token_id": EOT_ID, "pad_token_id": EOT_ID}


@pytest.fixture(scope="module")
def tok():
    return load_builtin_tokenizer()


def llama(kv_heads: int = 2):
    c = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=T, **IDS,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(c)


def test_llama_hand_count():
    kv = 2 * (D // 4)  # 2 key/value heads of head_dim 8
    per_layer = D * D + D * kv + D * kv + D * D + 3 * D * FF  # q, k, v, o, gate/up/down
    expected = 2 * (LAYERS * per_layer + V * D) + 2 * LAYERS * T * D
    assert hf_flops_per_token(llama(), T) == expected


def test_qwen3_attention_width_is_heads_times_head_dim():
    c = transformers.Qwen3Config(
        vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=T,
        **IDS,
    )  # fmt: skip
    q, kv = 4 * 16, 2 * 16
    per_layer = D * q + 2 * D * kv + q * D + 3 * D * FF
    expected = 2 * (LAYERS * per_layer + V * D) + 2 * LAYERS * T * q
    assert hf_flops_per_token(transformers.Qwen3ForCausalLM(c), T) == expected


def test_gpt2_hand_count_tied_head_counted():
    c = transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=LAYERS, n_head=4, n_positions=T)
    per_layer = D * 3 * D + D * D + D * 4 * D + 4 * D * D  # c_attn, attn c_proj, c_fc, mlp c_proj
    expected = 2 * (LAYERS * per_layer + V * D) + 2 * LAYERS * T * D
    assert hf_flops_per_token(transformers.GPT2LMHeadModel(c), T) == expected


def test_engram_hand_count_and_total(tok):
    model = llama()
    base = hf_flops_per_token(model, T)
    add_engram(model, CFG, tok)
    E = CFG.memory_dim  # (3 - 1) * 16 = 32
    per_layer = E * D + E * D + D + CFG.kernel_size * D  # key, value, gate dot, depthwise conv
    att = model.engram
    assert engram_flops_per_token(att) == 2 * len(CFG.layer_ids) * per_layer
    assert hf_flops_per_token(model, T) == base + engram_flops_per_token(att)
    assert hf_flops_per_token(model, T, include_engram=False) == base


def test_agrees_with_builtin_model_count_up_to_the_gate(tok):
    """The built-in model's count of the same shapes (SwiGLU, untied head) differs by the gate."""
    model = add_engram(llama(kv_heads=4), CFG, tok)
    cfg = ModelConfig(
        vocab_size=V, d_model=D, n_layers=LAYERS, n_heads=4, d_ff=FF, ffn="dense", max_seq_len=T
    )
    gate = 2 * len(CFG.layer_ids) * D
    assert hf_flops_per_token(model, T) == flops_per_token(cfg, CFG, T) + gate


def test_seq_len_checked():
    with pytest.raises(ValueError, match="seq_len"):
        hf_flops_per_token(llama(), 0)
