"""The fused chunked output layer + cross-entropy agrees with the plain one, values and grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engram.model.loss import linear_cross_entropy


def _reference(h, w, t):
    return F.cross_entropy(h @ w.T, t, ignore_index=-1)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_matches_plain_cross_entropy_and_grads(chunk):
    g = torch.Generator().manual_seed(0)
    N, D, V = 50, 16, 97
    h = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[[3, 17, 40]] = -1  # ignored positions
    ref = _reference(h, w, t)
    gh_ref, gw_ref = torch.autograd.grad(ref * 2.5, [h, w])
    got = linear_cross_entropy(h, w, t, chunk=chunk)
    gh, gw = torch.autograd.grad(got * 2.5, [h, w])
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)
    assert gh[3].abs().max() == 0  # an ignored target sends no gradient to its hidden state


def test_no_grad_path_and_large_logits_are_stable():
    h = torch.randn(8, 4) * 100.0  # logits in the thousands: a naive exp would overflow
    w = torch.randn(11, 4)
    t = torch.arange(8)
    with torch.no_grad():
        got = linear_cross_entropy(h, w, t, chunk=3)
    torch.testing.assert_close(got, _reference(h, w, t), rtol=1e-5, atol=1e-4)
    assert torch.isfinite(got)


def test_tied_weight_gets_both_gradients_and_autocast_stays_fp32():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(31, 8)
    idx = torch.randint(0, 31, (2, 5))
    t = torch.randint(0, 31, (10,))
    h = emb(idx).reshape(10, 8)
    linear_cross_entropy(h, emb.weight, t).backward()
    fused = emb.weight.grad.clone()
    emb.weight.grad = None
    h = emb(idx).reshape(10, 8)
    _reference(h, emb.weight, t).backward()
    torch.testing.assert_close(fused, emb.weight.grad, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h.detach(), emb.weight.detach(), t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, _reference(h.detach(), emb.weight.detach(), t))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"expected h \(N, D\)"):
        linear_cross_entropy(torch.zeros(3, 4), torch.zeros(5, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_cross_entropy(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))


def test_model_fused_loss_equals_logits_loss():
    from engram.model import EngramLM, ModelConfig

    cfg = ModelConfig(vocab_size=67, d_model=16, n_layers=2, n_heads=2, max_seq_len=16,
                      n_routed_experts=4, d_expert=8)  # fmt: skip
    model = EngramLM(cfg, seed=1)
    idx = torch.randint(0, 67, (2, 12))
    y = torch.randint(0, 67, (2, 12))
    fused = model(idx, targets=y)
    assert fused.logits is None
    fused.loss.backward()
    g_fused = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = model(idx, targets=y, return_logits=True)
    plain.loss.backward()
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-6, atol=1e-6)
    for a, p in zip(g_fused, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
