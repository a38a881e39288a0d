"""One rank of the sharded-store agreement check (run by tests/test_distributed.py, W processes).

Every rank knows every rank's ids (same seed), so each can compute the single-process
reference itself: an in-RAM `MemoryRowStore` with the same seed, the mean over ranks of their
losses, `torch.optim.SparseAdam`. The sharded store must serve the same rows (bit for bit),
send exactly the unique remote ids and rows it counts, and after several steps hold the same
rows and Adam moments as the reference's slice (float tolerance: summation order differs).
Exits non-zero (traceback) on any disagreement.
"""

from __future__ import annotations

import sys

import torch

from engram.optim import OptimConfig
from engram.parallel import init_from_env, shutdown
from engram.store.memory import MemoryRowStore
from engram.store.sharded import RowSharding, ShardedRowStore


def main(num_rows: int, dim: int, steps: int) -> None:
    ctx = init_from_env("cpu", timeout_s=60)
    W, rank = ctx.world_size, ctx.rank
    cfg = OptimConfig()
    lr, betas, eps = cfg.lr * cfg.table_lr_mult, (cfg.beta1, cfg.beta2), cfg.eps
    sharded = ShardedRowStore(num_rows, dim, ctx.table_group, std=0.5, seed=7)
    ref = MemoryRowStore(num_rows, dim, std=0.5, seed=7)
    ref_opt = torch.optim.SparseAdam([ref.weight], lr=lr, betas=betas, eps=eps)
    sharding = RowSharding(num_rows, W)
    assert torch.equal(sharded.weight, ref.weight.detach()[sharded.start : sharded.stop])

    gen = torch.Generator().manual_seed(123)
    for step in range(steps):
        # Two lookups per step (two "layers' worth"), skewed so the splits are uneven and the
        # ids repeat: rank r draws mostly from the low rows (rank 0's shard).
        lookups = []
        for _ in range(2):
            per_rank = []
            for r in range(W):
                n = 40 + 12 * r  # n + n // 2 stays even
                low = torch.randint(0, max(1, num_rows // 3), (n,), generator=gen)
                anywhere = torch.randint(0, num_rows, (n // 2,), generator=gen)
                per_rank.append(torch.cat([low, anywhere]).view(-1, 2))  # (n', 2): any shape
            coeff = [torch.randn(*ids.shape, dim, generator=gen) for ids in per_rank]
            lookups.append((per_rank, coeff))

        before = sharded.stats.as_dict()
        loss = torch.zeros(())
        for per_rank, coeff in lookups:
            e = sharded.gather(per_rank[rank])  # (n', 2, dim)
            want = ref.gather(per_rank[rank]).detach()
            if step == 0:  # untrained: the very same rows
                assert torch.equal(e.detach(), want), "served rows"
            else:  # trained: the same up to the reference's summation order
                assert torch.allclose(e.detach(), want, rtol=1e-5, atol=1e-6), "served rows"
            loss = loss + (e * coeff[rank]).mean()
        loss.backward()
        sharded.adam_step(lr, betas, eps)
        sharded.zero_grad()

        after = sharded.stats.as_dict()
        uniq = [torch.unique(pr[rank]) for pr, _ in lookups]
        remote = sum(int((sharding.owner(u) != rank).sum()) for u in uniq)
        served = sum(
            int((sharding.owner(torch.unique(pr[r])) == rank).sum())
            for pr, _ in lookups
            for r in range(W)
            if r != rank
        )
        assert after["remote_ids"] - before["remote_ids"] == remote
        assert after["id_bytes_sent"] - before["id_bytes_sent"] == remote * 8
        assert after["row_bytes_sent"] - before["row_bytes_sent"] == served * dim * 4
        assert after["grad_bytes_sent"] - before["grad_bytes_sent"] == remote * dim * 4
        assert after["row_bytes_received"] - before["row_bytes_received"] == remote * dim * 4
        dup = sum(int((sharding.owner(pr[rank]) != rank).sum()) for pr, _ in lookups)
        assert after["remote_ids_dup"] - before["remote_ids_dup"] == dup
        assert after["unique_ids"] - before["unique_ids"] == sum(u.numel() for u in uniq)

        # The reference: one process, the whole global batch, loss = mean of the ranks' losses.
        ref_loss = torch.zeros(())
        for per_rank, coeff in lookups:
            for r in range(W):
                ref_loss = ref_loss + (ref.gather(per_rank[r]) * coeff[r]).mean() / W
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()

        mine = ref.weight.detach()[sharded.start : sharded.stop]
        assert torch.allclose(sharded.weight, mine, rtol=1e-5, atol=1e-6), (
            f"step {step}: max |diff| {float((sharded.weight - mine).abs().max())}"
        )
    state = ref_opt.state[ref.weight]
    for part in ("exp_avg", "exp_avg_sq"):
        want = state[part][sharded.start : sharded.stop]
        assert torch.allclose(getattr(sharded, part), want, rtol=1e-4, atol=1e-9), part
    assert sharded.step_count == state["step"] == steps
    # A lookup made without grad takes the same route and returns the same rows.
    with torch.no_grad():
        ids = torch.arange(num_rows).flip(0)[: num_rows // 2 + rank]
        assert torch.allclose(sharded.gather(ids), ref.gather(ids), rtol=1e-5, atol=1e-6)
    shutdown(ctx)
    print(f"rank {rank}: ok, rows [{sharded.start}, {sharded.stop})")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
