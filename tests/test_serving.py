"""Serving from tiers: every store stack gives the RAM model's results; CLI generate and table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from serving_helpers import PROMPTS, generate_prompts  # tests/serving_helpers.py

from engram.cli import main
from engram.serving import TierConfig, load_served
from engram.store import CachedRowStore, MmapRowStore, PrefetchingStore

pytestmark = pytest.mark.usefixtures("one_thread", "analysis_env")


@pytest.mark.parametrize(
    "tier",
    [
        TierConfig(store="mmap", prefetch=False),
        TierConfig(store="mmap", cache_rows=64),
        TierConfig(store="mmap", cache_rows=64, cache_policy="lru", prefetch=False),
        TierConfig(store="mmap", cache_rows=100_000, verify=True),
        TierConfig(store="mmap", cache_bytes=4096, willneed=False),
    ],
    ids=["mmap", "mmap+cache+prefetch", "mmap+lru", "mmap+big-cache", "mmap+cache-bytes"],
)
def test_every_tier_generates_exactly_what_ram_does(run: Path, tier: TierConfig) -> None:
    with load_served(run) as ram:
        ref = generate_prompts(ram, temperature=0.9, seed=1)
    with load_served(run, tier) as served:
        got = generate_prompts(served, temperature=0.9, seed=1)
        layer_store = served.parts.model.engram_layers()[1].store
        stats = served.stats()["1"]
    assert got.tokens == ref.tokens
    assert ref.logits is not None and got.logits is not None
    for a, b in zip(got.logits, ref.logits, strict=True):
        assert torch.equal(a, b)
    inner = layer_store
    kinds = []
    while inner is not None:
        kinds.append(type(inner))
        inner = getattr(inner, "inner", None)
    assert kinds[-1] is MmapRowStore
    assert (CachedRowStore in kinds) == bool(tier.cache_rows or tier.cache_bytes)
    assert (PrefetchingStore in kinds) == tier.prefetch
    if tier.prefetch:  # generate asked for every step's rows ahead, and they were used
        assert stats["prefetch"]["prefetched_hits"] > 0
        assert stats["prefetch"]["sync_gathers"] == 0
    if tier.cache_rows or tier.cache_bytes:
        assert stats["cache"]["lookups"] > 0
    if tier.cache_bytes:
        assert stats["cache"]["capacity"] == 4096 // (4 * 8)  # float32 rows of head_dim 8


def test_int8_tables_are_close_but_smaller(run: Path) -> None:
    with load_served(run) as ram:
        ref = generate_prompts(ram, temperature=0)
    with load_served(run, TierConfig(store="mmap", dtype="int8")) as served:
        got = generate_prompts(served, temperature=0)
        f8 = served.files[1]
    f32 = run / "tables" / "step-000006-float32" / "table_L1.engt"
    assert not f32.exists()  # only the int8 export was made
    with load_served(run, TierConfig(store="mmap")):
        pass
    assert f8.stat().st_size < 0.5 * f32.stat().st_size
    assert ref.logits is not None and got.logits is not None
    torch.testing.assert_close(got.logits[0], ref.logits[0], rtol=0, atol=0.05)


def test_tables_of_another_configuration_are_refused(run: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    assert main(["table", "export", "--ckpt", str(run), "--out", str(other)]) == 0
    # Rewrite the file's fingerprint as if it came from a different hashing configuration.
    from engram.store import read_header, write_table
    from engram.store.tablefile import read_table

    f = other / "table_L1.engt"
    h = read_header(f)
    write_table(f, read_table(f), fingerprint="0" * 64, layer_id=1, meta=h.meta)
    capsys.readouterr()
    code = main(["generate", "--ckpt", str(run), "--prompt", "In the", "--store", "mmap",
                 "--tables", str(other)])  # fmt: skip
    assert code == 2
    assert "built for hash configuration 0000000000000000" in capsys.readouterr().err


def test_verify_refuses_a_table_whose_data_bytes_were_flipped(run: Path, tmp_path: Path) -> None:
    from engram.export import export_tables
    from engram.store import TableFileError, read_header

    f = export_tables(run, tmp_path / "tables")[1]
    h = read_header(f)
    with open(f, "r+b") as fh:  # one bit of one row value, inside the data region
        fh.seek(h.data_offset + h.data_nbytes // 2)
        b = fh.read(1)[0]
        fh.seek(-1, 1)
        fh.write(bytes([b ^ 0x10]))
    assert read_header(f) == h  # the header (and its crc) cannot tell

    with load_served(run, TierConfig(store="mmap", tables=str(tmp_path / "tables"))) as served:
        assert generate_prompts(served, temperature=0).tokens  # serves the flipped row unawares
    tier = TierConfig(store="mmap", tables=str(tmp_path / "tables"), verify=True)
    with pytest.raises(TableFileError, match="is corrupt: data crc32") as e:
        load_served(run, tier)
    assert str(f) in str(e.value)


def test_cli_generate_and_table_commands(run: Path, tmp_path: Path, capsys) -> None:
    argv = ["generate", "--ckpt", str(run), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
            "--max-new-tokens", "5", "--json"]  # fmt: skip
    assert main(argv) == 0
    ram = json.loads(capsys.readouterr().out)
    assert [o["prompt"] for o in ram["outputs"]] == PROMPTS
    assert all(o["completion"] for o in ram["outputs"])
    assert main([*argv, "--store", "mmap", "--cache-rows", "50"]) == 0
    disk = json.loads(capsys.readouterr().out)
    assert disk["outputs"] == ram["outputs"]  # same seed, same tables: same text
    assert disk["tiers"]["1"]["cache"]["lookups"] > 0

    out = tmp_path / "t"
    assert (
        main(["table", "export", "--ckpt", str(run), "--out", str(out), "--dtype", "bfloat16"]) == 0
    )
    assert "layer 1:" in capsys.readouterr().out
    assert main(["table", "inspect", str(out / "table_L1.engt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "bfloat16" and info["verified"] and info["layer_id"] == 1
    assert main(["table", "inspect", str(out / "table_L1.engt")]) == 0
    assert "fingerprint" in capsys.readouterr().out

    # Errors: one line, exit 2.
    damaged = out / "table_L1.engt"
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0x55
    damaged.write_bytes(bytes(data))
    assert main(["table", "inspect", str(damaged)]) == 2
    assert "is corrupt: data crc32" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(run)]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(run), "--prompt", "x", "--cache-rows", "5"]) == 2
    assert "store='mmap' only" in capsys.readouterr().err
    bad_tier = ["--store", "mmap", "--cache-rows", "5", "--cache-mib", "1"]
    assert main(["generate", "--ckpt", str(run), "--prompt", "x", *bad_tier]) == 2
    assert "not both" in capsys.readouterr().err


def test_baseline_has_nothing_to_serve_from_disk(tiny_runs, capsys) -> None:
    code = main(["generate", "--ckpt", str(tiny_runs["moe"]), "--prompt", "In the",
                 "--store", "mmap"])  # fmt: skip
    assert code == 2
    assert "no Engram layers" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(tiny_runs["moe"]), "--prompt", "In the",
                 "--max-new-tokens", "3"]) == 0  # fmt: skip
