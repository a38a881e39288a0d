"""Tokenizer compression (SPEC section 2) and the built-in GPT-2 tokenizer."""

from __future__ import annotations

import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, normalizers

import engram.compress as compress_mod
from engram.compress import (
    TokenizerCompressor,
    cache_file_name,
    default_cache_dir,
    tokenizer_fingerprint,
)
from engram.tokenizer import EOT_ID, load_builtin_tokenizer

GPT2_VOCAB = 50257
GPT2_COMPRESSED = 32962  # golden: measured V' of the built-in GPT-2 tokenizer (34.4% fewer ids)


def reference_lookup(tok: Tokenizer, ids: range) -> list[int]:
    """DeepSeek's CompressedTokenizer loop, transcribed literally (one decode per id)."""
    sentinel = "\ue000"
    normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), sentinel),
            normalizers.Strip(),
            normalizers.Replace(sentinel, " "),
        ]
    )
    key2new: dict[str, int] = {}
    out = []
    for tid in ids:
        text = tok.decode([tid], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tok.id_to_token(tid)
        else:
            norm = normalizer.normalize_str(text)
            key = norm if norm else text
        if key not in key2new:
            key2new[key] = len(key2new)
        out.append(key2new[key])
    return out


def ids_of(tok: Tokenizer, *tokens: str) -> list[int]:
    ids = [tok.token_to_id(t) for t in tokens]
    assert None not in ids, dict(zip(tokens, ids, strict=True))
    return ids


class TransformersLike:
    """A duck-typed transformers tokenizer backed by an HF tokenizer (no transformers import)."""

    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(i) for i in ids]

    def decode(self, token_ids, skip_special_tokens=False, **kwargs):
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


# --------------------------------------------------------------------------- built-in tokenizer


def test_builtin_tokenizer_matches_gpt2_ids(gpt2_tokenizer: Tokenizer) -> None:
    tok = gpt2_tokenizer
    assert tok.get_vocab_size(with_added_tokens=True) == GPT2_VOCAB
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.encode("The quick brown fox").ids == [464, 2068, 7586, 21831]
    assert tok.encode(" the\n").ids == [262, 198]
    assert tok.encode("a<|endoftext|>b").ids == [64, EOT_ID, 65]
    assert tok.id_to_token(EOT_ID) == "<|endoftext|>"


def test_builtin_tokenizer_round_trips_real_text(gpt2_tokenizer: Tokenizer) -> None:
    text = Path(compress_mod.__file__).read_text(encoding="utf-8")
    text += "\n\tCafé naïve 日本語 🤖  don't   WAIT!!\r\n<|endoftext|> x"
    ids = gpt2_tokenizer.encode(text).ids
    assert len(ids) > 1000
    assert gpt2_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_builtin_tokenizer_is_fresh_each_call() -> None:
    a, b = load_builtin_tokenizer(), load_builtin_tokenizer()
    assert a is not b and a.to_str() == b.to_str()


# --------------------------------------------------------------------------- the lookup table


def test_gpt2_golden_compressed_size(gpt2_compressor: TokenizerCompressor) -> None:
    c = gpt2_compressor
    assert c.vocab_size == GPT2_VOCAB
    assert c.compressed_vocab_size == len(c) == GPT2_COMPRESSED
    assert c.lookup.shape == (GPT2_VOCAB,) and c.lookup.dtype == np.int64


def test_matches_reference_loop_on_full_vocab(
    gpt2_tokenizer: Tokenizer, gpt2_compressor: TokenizerCompressor
) -> None:
    expected = reference_lookup(gpt2_tokenizer, range(GPT2_VOCAB))
    np.testing.assert_array_equal(gpt2_compressor.lookup, np.array(expected, dtype=np.int64))
    assert max(expected) + 1 == GPT2_COMPRESSED


def test_decode_batch_equals_single_decode(gpt2_tokenizer: Tokenizer) -> None:
    rng = np.random.default_rng(0)
    sample = sorted(set(rng.integers(0, GPT2_VOCAB, 3000).tolist()) | {0, 94, 198, 220, EOT_ID})
    batch = gpt2_tokenizer.decode_batch([[t] for t in sample], skip_special_tokens=False)
    single = [gpt2_tokenizer.decode([t], skip_special_tokens=False) for t in sample]
    assert batch == single


def test_first_seen_order_and_surjective(gpt2_compressor: TokenizerCompressor) -> None:
    lookup = gpt2_compressor.lookup
    assert lookup[0] == 0
    values, first_raw_id = np.unique(lookup, return_index=True)
    np.testing.assert_array_equal(values, np.arange(GPT2_COMPRESSED))
    assert np.all(np.diff(first_raw_id) > 0)  # new ids appear in increasing raw-id order
    # <|endoftext|> is the last raw id and its key is unique, so it gets the last new id.
    assert gpt2_compressor.compress_id(EOT_ID) == GPT2_COMPRESSED - 1


def test_case_space_and_accent_variants_collapse(
    gpt2_tokenizer: Tokenizer, gpt2_compressor: TokenizerCompressor
) -> None:
    lookup = gpt2_compressor.lookup
    for group in (
        ("ĠApple", "apple", "Apple", "Ġapple"),
        ("ĠHello", "Hello", "hello", "Ġhello"),
        ("Ã©", "e"),  # "é": accent stripped
    ):
        ids = ids_of(gpt2_tokenizer, *group)
        assert len({int(lookup[i]) for i in ids}) == 1, group
    apple, banana = ids_of(gpt2_tokenizer, "Apple", "Ġbanana")
    assert lookup[apple] != lookup[banana]
    # "APPLE" is two tokens, "AP"+"PLE"; they collapse with their lowercase forms where those exist.
    assert gpt2_tokenizer.encode("APPLE").ids == [2969, 16437]


def test_whitespace_tokens_keep_lone_space_key(
    gpt2_tokenizer: Tokenizer, gpt2_compressor: TokenizerCompressor
) -> None:
    lookup = gpt2_compressor.lookup
    space, tab, newline, double_newline, cr = ids_of(gpt2_tokenizer, "Ġ", "ĉ", "Ċ", "ĊĊ", "č")
    # All pure-whitespace tokens normalize to " " (kept alive through Strip by the sentinel).
    assert len({int(lookup[i]) for i in (space, tab, newline, double_newline, cr)}) == 1
    # Vertical tab / form feed normalize to "" and so keep their own text as key: distinct ids.
    vt, ff = 199, 200
    assert gpt2_tokenizer.decode([vt]) == "\x0b" and gpt2_tokenizer.decode([ff]) == "\x0c"
    assert len({int(lookup[space]), int(lookup[vt]), int(lookup[ff])}) == 3


def test_byte_fragments_keyed_by_raw_token(
    gpt2_tokenizer: Tokenizer, gpt2_compressor: TokenizerCompressor
) -> None:
    lookup = gpt2_compressor.lookup
    texts = gpt2_tokenizer.decode_batch([[t] for t in range(GPT2_VOCAB)], skip_special_tokens=False)
    fragments = [t for t, s in enumerate(texts) if "\ufffd" in s]
    assert len(fragments) == 352
    # Raw token strings are unique, so fragments never merge with each other ...
    assert len({int(lookup[t]) for t in fragments}) == len(fragments)
    # ... but a fragment's raw string can equal a real character's key, exactly as in the
    # reference: raw token "£" (the lone byte 0xA3) meets the decoded characters "£" and " £".
    frag, real, spaced = ids_of(gpt2_tokenizer, "£", "Â£", "ĠÂ£")
    assert texts[frag] == "\ufffd" and texts[real] == "£" and texts[spaced] == " £"
    assert lookup[frag] == lookup[real] == lookup[spaced]


def test_lookup_is_read_only(gpt2_compressor: TokenizerCompressor) -> None:
    with pytest.raises(ValueError):
        gpt2_compressor.lookup[0] = 5


# --------------------------------------------------------------------------- compress()


def test_negative_ids_pass_through(gpt2_compressor: TokenizerCompressor) -> None:
    c = gpt2_compressor
    x = np.array([[-1, 15496, -100], [995, -7, 0]])
    out = c.compress(x)
    np.testing.assert_array_equal(out, [[-1, c.lookup[15496], -100], [c.lookup[995], -7, 0]])
    assert c.compress_id(-100) == -100 and c.compress_id(15496) == int(c.lookup[15496])


@pytest.mark.parametrize("kind", ["numpy", "torch", "list", "id"])
def test_out_of_range_ids_raise(gpt2_compressor: TokenizerCompressor, kind: str) -> None:
    ids = [3, -1, 50300, 7, 50257]
    arg = {"numpy": np.array(ids), "torch": torch.tensor(ids), "list": ids, "id": 50300}[kind]
    fn = gpt2_compressor.compress_id if kind == "id" else gpt2_compressor.compress
    with pytest.raises(ValueError, match=r"token id 50300 .*\[0, 50257\)"):
        fn(arg)


def test_numpy_and_torch_agree(gpt2_compressor: TokenizerCompressor) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(-3, GPT2_VOCAB, size=(4, 5, 6))
    out_np = gpt2_compressor.compress(x.astype(np.int32))
    out_t = gpt2_compressor(torch.from_numpy(x))
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.int64 and out_np.shape == x.shape
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.int64
    np.testing.assert_array_equal(out_np, out_t.numpy())
    np.testing.assert_array_equal(gpt2_compressor.compress(x.tolist()), out_np)
    assert gpt2_compressor.compress(np.zeros((0, 3), np.int64)).shape == (0, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_cuda_stays_on_device(gpt2_compressor: TokenizerCompressor) -> None:
    x = torch.randint(-2, GPT2_VOCAB, (8, 64))
    out = gpt2_compressor.compress(x.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), gpt2_compressor.compress(x))
    with pytest.raises(ValueError, match="50257"):
        gpt2_compressor.compress(torch.tensor([1, GPT2_VOCAB], device="cuda"))


def test_rejects_non_integer_ids(gpt2_compressor: TokenizerCompressor) -> None:
    with pytest.raises(TypeError):
        gpt2_compressor.compress(np.array([1.0, 2.0]))
    with pytest.raises(TypeError):
        gpt2_compressor.compress(torch.tensor([1.0]))
    with pytest.raises(TypeError):
        gpt2_compressor.compress_id(True)


def test_pickle_round_trip(gpt2_compressor: TokenizerCompressor) -> None:
    gpt2_compressor.compress(torch.tensor([1, 2]))  # populate the per-device table
    clone = pickle.loads(pickle.dumps(gpt2_compressor))
    assert clone._device_tables == {}
    np.testing.assert_array_equal(clone.lookup, gpt2_compressor.lookup)
    assert clone.fingerprint == gpt2_compressor.fingerprint
    assert not clone.lookup.flags.writeable


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=-1000, max_value=GPT2_VOCAB - 1), min_size=0, max_size=64),
    st.sampled_from(["numpy", "torch"]),
)
def test_property_deterministic_and_in_range(
    gpt2_compressor: TokenizerCompressor, ids: list[int], kind: str
) -> None:
    x = np.array(ids, dtype=np.int64) if kind == "numpy" else torch.tensor(ids, dtype=torch.int64)
    a, b = gpt2_compressor.compress(x), gpt2_compressor.compress(x)
    a_np = np.asarray(a)
    np.testing.assert_array_equal(a_np, np.asarray(b))
    arr = np.array(ids, dtype=np.int64)
    valid = arr >= 0
    assert np.all((a_np[valid] >= 0) & (a_np[valid] < GPT2_COMPRESSED))
    np.testing.assert_array_equal(a_np[valid], gpt2_compressor.lookup[arr[valid]])
    np.testing.assert_array_equal(a_np[~valid], arr[~valid])
    assert [gpt2_compressor.compress_id(i) for i in ids] == a_np.tolist()


# --------------------------------------------------------------------------- cache and files


@pytest.fixture
def counted_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of build_lookup made by from_tokenizer."""
    calls: list[int] = []
    real = compress_mod.build_lookup

    def counting(tok):
        calls.append(1)
        return real(tok)

    monkeypatch.setattr(compress_mod, "build_lookup", counting)
    return calls


def _cache_copy(gpt2_tokenizer: Tokenizer, gpt2_compressor: TokenizerCompressor, d: Path) -> Path:
    path = d / cache_file_name(tokenizer_fingerprint(gpt2_tokenizer))
    gpt2_compressor.save(path)
    return path


def test_second_construction_loads_cache(
    gpt2_tokenizer: Tokenizer, tmp_path: Path, counted_builds: list[int]
) -> None:
    first = TokenizerCompressor.from_tokenizer(gpt2_tokenizer, tmp_path)
    assert counted_builds == [1]
    files = os.listdir(tmp_path)
    assert files == [cache_file_name(first.fingerprint)]  # no temp files left behind
    t0 = time.perf_counter()
    second = TokenizerCompressor.from_tokenizer(gpt2_tokenizer, tmp_path)
    elapsed = time.perf_counter() - t0
    assert counted_builds == [1]  # loaded, not rebuilt
    assert elapsed < 1.0
    np.testing.assert_array_equal(first.lookup, second.lookup)
    assert second.fingerprint == first.fingerprint == tokenizer_fingerprint(gpt2_tokenizer)


@pytest.mark.parametrize(
    "damage", ["garbage", "truncated", "bitflip", "empty", "other_fingerprint"]
)
def test_corrupt_cache_is_rebuilt(
    gpt2_tokenizer: Tokenizer,
    gpt2_compressor: TokenizerCompressor,
    tmp_path: Path,
    counted_builds: list[int],
    damage: str,
) -> None:
    path = _cache_copy(gpt2_tokenizer, gpt2_compressor, tmp_path)
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file" * 10)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "bitflip":  # flip a low bit of the last table entry: header stays valid
        path.write_bytes(data[:-8] + bytes([data[-8] ^ 1]) + data[-7:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        TokenizerCompressor(gpt2_compressor.lookup, "f" * 64).save(path)
    expected = {"bitflip": "checksum", "other_fingerprint": "fingerprint mismatch"}
    with pytest.raises(ValueError, match=expected.get(damage, "not a readable compressor file")):
        TokenizerCompressor.load(path, expected_fingerprint=gpt2_compressor.fingerprint)
    rebuilt = TokenizerCompressor.from_tokenizer(gpt2_tokenizer, tmp_path)
    assert counted_builds == [1]
    np.testing.assert_array_equal(rebuilt.lookup, gpt2_compressor.lookup)
    # The bad file was replaced by a valid one.
    reloaded = TokenizerCompressor.load(path, expected_fingerprint=gpt2_compressor.fingerprint)
    np.testing.assert_array_equal(reloaded.lookup, gpt2_compressor.lookup)


def test_save_load_round_trip(gpt2_compressor: TokenizerCompressor, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "gpt2.safetensors"
    gpt2_compressor.save(path)
    loaded = TokenizerCompressor.load(path)
    np.testing.assert_array_equal(loaded.lookup, gpt2_compressor.lookup)
    assert loaded.fingerprint == gpt2_compressor.fingerprint
    assert (loaded.vocab_size, len(loaded)) == (GPT2_VOCAB, GPT2_COMPRESSED)
    assert os.listdir(path.parent) == ["gpt2.safetensors"]
    with pytest.raises(FileNotFoundError):
        TokenizerCompressor.load(tmp_path / "missing.safetensors")


def test_fingerprint_mismatch_detected(
    gpt2_tokenizer: Tokenizer, gpt2_compressor: TokenizerCompressor, tmp_path: Path
) -> None:
    path = tmp_path / "c.safetensors"
    gpt2_compressor.save(path)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        TokenizerCompressor.load(path, expected_fingerprint="0" * 64)
    # A changed tokenizer has another fingerprint, hence another cache entry.
    other = load_builtin_tokenizer()
    other.add_special_tokens([AddedToken("<|pad|>", special=True)])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(gpt2_tokenizer)
    assert tokenizer_fingerprint(load_builtin_tokenizer()) == gpt2_compressor.fingerprint
    grown = TokenizerCompressor.from_tokenizer(other, tmp_path)
    assert grown.vocab_size == GPT2_VOCAB + 1 and len(grown) == GPT2_COMPRESSED + 1
    assert grown.compress_id(GPT2_VOCAB) == GPT2_COMPRESSED


def test_failed_save_keeps_old_file(
    gpt2_compressor: TokenizerCompressor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.safetensors"
    gpt2_compressor.save(path)
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(compress_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        TokenizerCompressor(np.zeros(3, np.int64), "x").save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]


def test_unwritable_cache_and_no_cache(
    gpt2_tokenizer: Tokenizer,
    gpt2_compressor: TokenizerCompressor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    c = TokenizerCompressor.from_tokenizer(gpt2_tokenizer, not_a_dir)  # warns, still works
    np.testing.assert_array_equal(c.lookup, gpt2_compressor.lookup)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    c = TokenizerCompressor.from_tokenizer(gpt2_tokenizer, None)
    assert len(c) == GPT2_COMPRESSED and os.listdir(empty) == []


def test_default_cache_dir_from_env(
    gpt2_tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "envcache"))
    assert default_cache_dir() == tmp_path / "envcache"
    c = TokenizerCompressor.from_tokenizer(gpt2_tokenizer)
    assert (tmp_path / "envcache" / cache_file_name(c.fingerprint)).is_file()
    monkeypatch.delenv("ENGRAM_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "engram"


# --------------------------------------------------------------------------- other tokenizers


def test_duck_typed_tokenizer(
    gpt2_tokenizer: Tokenizer, gpt2_compressor: TokenizerCompressor
) -> None:
    duck = TransformersLike(gpt2_tokenizer)
    c = TokenizerCompressor.build(duck)
    np.testing.assert_array_equal(c.lookup, gpt2_compressor.lookup)
    assert c.fingerprint != gpt2_compressor.fingerprint  # fingerprints never cross kinds
    assert c.fingerprint == tokenizer_fingerprint(TransformersLike(load_builtin_tokenizer()))


def test_rejects_non_tokenizers() -> None:
    with pytest.raises(TypeError, match="convert_ids_to_tokens"):
        TokenizerCompressor.build(object())


def test_constructor_validates_lookup() -> None:
    with pytest.raises(ValueError, match="first-seen"):
        TokenizerCompressor(np.array([0, 2, 1]), "x")
    with pytest.raises(ValueError):
        TokenizerCompressor(np.array([1, 0]), "x")
    with pytest.raises(ValueError):
        TokenizerCompressor(np.array([0.0, 1.0]), "x")
    c = TokenizerCompressor(np.array([0, 1, 0, 2, 1]), "x")
    assert (c.vocab_size, len(c)) == (5, 3)


def test_cache_dir_copy_is_portable(
    gpt2_tokenizer: Tokenizer,
    gpt2_compressor: TokenizerCompressor,
    tmp_path: Path,
    counted_builds: list[int],
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    _cache_copy(gpt2_tokenizer, gpt2_compressor, a)
    shutil.copytree(a, b)
    c = TokenizerCompressor.from_tokenizer(gpt2_tokenizer, b)
    assert counted_builds == []
    np.testing.assert_array_equal(c.lookup, gpt2_compressor.lookup)
