"""Chunk keys, the Chunker, and the model fingerprint."""

import itertools
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import xxhash

from irminsul.chunking.config import ChunkerConfig
from irminsul.chunking.fingerprint import model_fingerprint
from irminsul.chunking.keys import Chunker, chunk_key, chunk_keys, key_prefix
from irminsul.engine_adapter.contract import ChunkRef

# --- keys ------------------------------------------------------------------------------------


def test_chunk_key_is_xxh3_128_over_length_prefixed_strings_and_int32_le_ids():
    ids = [1, 70_000, -3, 2**31 - 1]
    want = xxhash.xxh3_128_hexdigest(
        struct.pack("<Q", 2) + b"ns" + struct.pack("<Q", 3) + b"fp1" + struct.pack("<4i", *ids)
    )
    assert chunk_key(ids, namespace="ns", model_fingerprint="fp1") == want
    assert len(want) == 32
    # the key depends on the values, not on the caller's container or dtype
    for form in (np.array(ids, np.int64), np.array(ids, ">i4"), tuple(ids)):
        assert chunk_key(form, namespace="ns", model_fingerprint="fp1") == want


def test_keys_separate_namespaces_and_fingerprints():
    ids = np.arange(64)
    keys = {
        chunk_key(ids, namespace=ns, model_fingerprint=fp)
        for ns, fp in [("ab", "c"), ("a", "bc"), ("", "abc"), ("abc", ""), ("", ""), ("x", "c")]
    }
    assert len(keys) == 6
    assert key_prefix("ab", "c") != key_prefix("a", "bc")
    assert chunk_key(ids) != chunk_key(ids[:-1]) != chunk_key(ids[::-1])
    with pytest.raises(TypeError, match="strings"):
        key_prefix(b"ns", "")


def test_split_tiles_and_keys_each_chunk_by_its_own_tokens():
    ids = np.random.default_rng(0).integers(0, 130_000, 5000)
    anchors = [700, 2100, 2101]
    refs = Chunker().split(ids, anchors=anchors, namespace="t", model_fingerprint="m")
    assert all(isinstance(r, ChunkRef) for r in refs)
    assert refs[0].start == 0 and refs[-1].end == len(ids)
    assert all(a.end == b.start for a, b in itertools.pairwise(refs))
    assert {700, 2100, 2101} <= {r.start for r in refs}
    for r in refs:
        assert r.key == chunk_key(ids[r.start : r.end], namespace="t", model_fingerprint="m")
    spans = [(r.start, r.end) for r in refs]
    assert chunk_keys(ids, spans, namespace="t", model_fingerprint="m") == [r.key for r in refs]
    assert Chunker().split([]) == ()


def test_same_content_after_anchor_gets_same_keys_at_any_offset():
    rng = np.random.default_rng(1)
    content = rng.integers(0, 130_000, 3000)
    chunker = Chunker()
    tails = []
    for head_len in (0, 17, 1000, 4097):
        head = rng.integers(0, 130_000, head_len)
        refs = chunker.split(np.concatenate([head, content]), anchors=[head_len])
        tails.append([r.key for r in refs if r.start >= head_len])
    assert len(tails[0]) > 10
    assert all(t == tails[0] for t in tails)


def test_early_edit_rekeys_only_chunks_around_it():
    """Insert or delete 1-5 tokens in the first quarter of a 16K prompt; count new keys."""
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 130_000, 16_384)
    chunker = Chunker()
    before = chunker.split(ids)
    old_keys = {r.key for r in before}
    rekeyed = []
    for _ in range(60):
        pos, k = int(rng.integers(0, len(ids) // 4)), int(rng.integers(1, 6))
        if rng.random() < 0.5:
            edited = np.concatenate([ids[:pos], rng.integers(0, 130_000, k), ids[pos:]])
        else:
            edited = np.concatenate([ids[:pos], ids[pos + k :]])
        after = chunker.split(edited)
        # chunks ending before the edit are untouched
        assert [r for r in after if r.end <= pos] == [r for r in before if r.end <= pos]
        rekeyed.append(sum(r.key not in old_keys for r in after))
    mean = float(np.mean(rekeyed))
    print(f"chunks re-keyed per edit: mean {mean:.2f}, max {max(rekeyed)} of {len(before)}")
    assert min(rekeyed) >= 1  # the edited chunk itself always changes
    assert mean <= 3


def test_keys_equal_across_processes():
    code = (
        "import json, numpy as np; from irminsul.chunking.keys import Chunker; "
        "ids = np.random.default_rng(7).integers(0, 130000, 3000); "
        "print(json.dumps([[r.key, r.start, r.end] for r in "
        "Chunker().split(ids, anchors=[500], namespace='n', model_fingerprint='f')]))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    ids = np.random.default_rng(7).integers(0, 130000, 3000)
    here = Chunker().split(ids, anchors=[500], namespace="n", model_fingerprint="f")
    assert json.loads(out) == [[r.key, r.start, r.end] for r in here]


def test_chunker_uses_its_config():
    ids = np.random.default_rng(3).integers(0, 130_000, 4000)
    small = Chunker(ChunkerConfig(8, 16, 32)).split(ids)
    assert len(small) > len(Chunker().split(ids))
    assert all(r.end - r.start <= 32 for r in small)


# --- model fingerprint -----------------------------------------------------------------------


def _write_safetensors(path, dtype="BF16", data=b"\x01" * 100_000):
    header = json.dumps(
        {"w": {"dtype": dtype, "shape": [len(data) // 2], "data_offsets": [0, len(data)]}}
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def _append(path, data):
    with path.open("ab") as f:
        f.write(data)


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "deepseek_v2", "hidden_size": 64}')
    (d / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    _write_safetensors(d / "model-00001-of-00002.safetensors")
    _write_safetensors(d / "model-00002-of-00002.safetensors", data=b"\x02" * 70_000)
    (d / "README.md").write_text("not part of the model")
    return d


def test_fingerprint_is_stable_and_independent_of_location(model_dir, tmp_path):
    fp = model_fingerprint(model_dir)
    assert fp == model_fingerprint(str(model_dir))
    assert len(fp) == 32 and int(fp, 16) >= 0
    copy = tmp_path / "elsewhere"
    shutil.copytree(model_dir, copy)
    (copy / "README.md").write_text("edited, not a model file")
    assert model_fingerprint(copy) == fp


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: (d / "config.json").write_text(
            '{"model_type": "deepseek_v2", "hidden_size": 65}'
        ),
        lambda d: (d / "tokenizer.json").write_text('{"model": {"vocab": {"b": 0}}}'),
        lambda d: _write_safetensors(d / "model-00001-of-00002.safetensors", dtype="F16"),
        lambda d: _write_safetensors(
            d / "model-00002-of-00002.safetensors", data=b"\x02" * 60_000 + b"\x03" * 10_000
        ),
        lambda d: _append(d / "model-00002-of-00002.safetensors", b"\0"),
        lambda d: (d / "model-00002-of-00002.safetensors").rename(d / "renamed.safetensors"),
        lambda d: (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 pickled weights"),
    ],
    ids=["config", "tokenizer", "header", "data", "size", "name", "bin-added"],
)
def test_fingerprint_changes_with_model_files(model_dir, edit):
    fp = model_fingerprint(model_dir)
    edit(model_dir)
    assert model_fingerprint(model_dir) != fp


def test_fingerprint_reads_only_the_head_of_weight_data(model_dir):
    """Bytes past the first 64 KiB of tensor data are not read (that is what keeps it cheap)."""
    fp = model_fingerprint(model_dir)
    path = model_dir / "model-00001-of-00002.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-10:] = b"\xff" * 10
    path.write_bytes(bytes(raw))
    assert model_fingerprint(model_dir) == fp


def test_fingerprint_errors_name_the_path(model_dir, tmp_path):
    (model_dir / "model-00001-of-00002.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(ValueError, match="model-00001-of-00002.safetensors.*header length"):
        model_fingerprint(model_dir)
    (model_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        model_fingerprint(model_dir)
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        model_fingerprint(tmp_path / "missing-dir")
