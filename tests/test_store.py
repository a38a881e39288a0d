"""Tests of the row-store interface and the in-memory store (engram.store)."""

from __future__ import annotations

import pytest
import torch

from engram.store import MemoryRowStore, RowOutOfRangeError, RowStore, check_row_ids


def test_memory_store_satisfies_protocol() -> None:
    store = MemoryRowStore(10, 3)
    assert isinstance(store, RowStore)
    assert (store.num_rows, store.dim, store.dtype) == (10, 3, torch.float32)
    assert store.trainable_parameters() == [store.weight]


@pytest.mark.parametrize("shape", [(), (5,), (2, 3), (2, 3, 4)])
def test_gather_shape_and_values(shape: tuple[int, ...]) -> None:
    store = MemoryRowStore(17, 6, seed=3)
    rows = torch.randint(0, 17, shape)
    out = store.gather(rows)
    assert out.shape == (*shape, 6)
    assert torch.equal(out, store.weight.detach()[rows])


def test_gather_accepts_int32_ids() -> None:
    store = MemoryRowStore(8, 2)
    rows = torch.tensor([7, 0, 3], dtype=torch.int32)
    assert torch.equal(store.gather(rows), store.weight.detach()[rows.long()])


@pytest.mark.parametrize("bad", [9, -1, 100])
def test_gather_out_of_range_names_row_and_range(bad: int) -> None:
    store = MemoryRowStore(9, 2)
    rows = torch.tensor([[0, 1], [2, bad]])
    with pytest.raises(RowOutOfRangeError) as info:
        store.gather(rows)
    msg = str(info.value)
    assert f"row id {bad}" in msg
    assert "[0, 9)" in msg
    assert "(1, 1)" in msg  # the index of the offending id
    # Catchable as both IndexError and ValueError.
    assert isinstance(info.value, IndexError)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_gather_rejects_non_integer_ids(dtype: torch.dtype) -> None:
    store = MemoryRowStore(9, 2)
    with pytest.raises(TypeError, match="integer"):
        store.gather(torch.zeros(3, dtype=dtype))


def test_check_row_ids_empty_and_ok() -> None:
    check_row_ids(torch.zeros(0, dtype=torch.long), 1)
    check_row_ids(torch.arange(4), 4)
    with pytest.raises(RowOutOfRangeError, match=r"row id 4 at index \(4,\)"):
        check_row_ids(torch.arange(5), 4)


def test_deterministic_init_independent_of_global_rng() -> None:
    torch.manual_seed(1)
    a = MemoryRowStore(50, 4, seed=7)
    torch.manual_seed(2)
    b = MemoryRowStore(50, 4, seed=7)
    c = MemoryRowStore(50, 4, seed=8)
    assert torch.equal(a.weight, b.weight)
    assert not torch.equal(a.weight, c.weight)
    before = a.weight.detach().clone()
    with torch.no_grad():
        a.weight.zero_()
    a.reset_parameters()
    assert torch.equal(a.weight, before)


def test_init_std_configurable() -> None:
    store = MemoryRowStore(4000, 16, std=0.02, seed=0)
    assert abs(store.weight.std().item() - 0.02) < 0.001
    assert abs(store.weight.mean().item()) < 0.001
    assert torch.all(MemoryRowStore(3, 2, std=0.0).weight == 0)


def test_dtype_option() -> None:
    store = MemoryRowStore(10, 4, dtype=torch.float64, seed=1)
    ref = MemoryRowStore(10, 4, seed=1)
    assert store.dtype == torch.float64
    assert torch.equal(store.weight.float(), ref.weight.detach())


def test_sparse_gradient_touches_only_used_rows() -> None:
    store = MemoryRowStore(100, 5, seed=0)
    rows = torch.tensor([[3, 7, 3], [50, 99, 7]])
    out = store.gather(rows)
    (out * torch.randn_like(out)).sum().backward()
    grad = store.weight.grad
    assert grad is not None and grad.is_sparse
    dense = grad.to_dense()
    touched = torch.zeros(100, dtype=torch.bool)
    touched[rows.flatten()] = True
    assert torch.all(dense[~touched] == 0)
    assert torch.all(dense[touched].abs().sum(-1) > 0)
    assert set(grad.coalesce().indices()[0].tolist()) == {3, 7, 50, 99}


def test_dense_gradient_option() -> None:
    store = MemoryRowStore(20, 3, sparse=False)
    store.gather(torch.tensor([1, 2])).sum().backward()
    grad = store.weight.grad
    assert grad is not None and not grad.is_sparse
    assert grad.shape == (20, 3)
    assert torch.all(grad[[1, 2]] == 1) and torch.all(grad[3:] == 0)


def test_sparse_adam_updates_only_touched_rows() -> None:
    store = MemoryRowStore(64, 4, seed=2)
    opt = torch.optim.SparseAdam(store.trainable_parameters(), lr=0.1)
    before = store.weight.detach().clone()
    rows = torch.tensor([5, 9, 9, 40])
    store.gather(rows).pow(2).sum().backward()
    opt.step()
    changed = (store.weight.detach() != before).any(dim=-1)
    assert changed.nonzero().flatten().tolist() == [5, 9, 40]


def test_apply_row_update_accumulates_duplicates() -> None:
    store = MemoryRowStore(6, 2, seed=0)
    before = store.weight.detach().clone()
    rows = torch.tensor([1, 4, 1])
    delta = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 20.0]])
    store.apply_row_update(rows, delta)
    expected = before.clone()
    expected[1] += torch.tensor([11.0, 22.0])
    expected[4] += torch.tensor([3.0, 4.0])
    assert torch.equal(store.weight.detach(), expected)
    assert store.weight.grad is None


def test_apply_row_update_errors() -> None:
    store = MemoryRowStore(6, 2)
    with pytest.raises(ValueError, match=r"delta must have shape \(R, dim\) = \(2, 2\)"):
        store.apply_row_update(torch.tensor([0, 1]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="1-D"):
        store.apply_row_update(torch.tensor([[0, 1]]), torch.zeros(2, 2))
    with pytest.raises(RowOutOfRangeError, match=r"row id 6 .* \[0, 6\)"):
        store.apply_row_update(torch.tensor([6]), torch.zeros(1, 2))


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="num_rows"):
        MemoryRowStore(0, 2)
    with pytest.raises(ValueError, match="dim"):
        MemoryRowStore(2, 0)
    with pytest.raises(ValueError, match="std"):
        MemoryRowStore(2, 2, std=-1.0)


def test_state_dict_roundtrip() -> None:
    a = MemoryRowStore(12, 3, seed=1)
    b = MemoryRowStore(12, 3, seed=2)
    assert list(a.state_dict()) == ["weight"]
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weight, b.weight)
