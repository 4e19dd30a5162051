"""A cheap fingerprint of a model checkpoint, so chunk keys of different models never meet.

Reads config.json and the tokenizer in full, but of each weight file only its name, size,
safetensors JSON header and first 64 KiB of tensor data: a few MB of I/O even for a
600 GB, 163-shard checkpoint, while a changed dtype, shape, shard layout or fine-tune
(whose first tensor bytes differ) still changes the digest.
"""

from __future__ import annotations

import struct
from pathlib import Path

import xxhash

_HEAD_BYTES = 64 * 1024
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on its JSON header
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _record(h: xxhash.xxh3_128, tag: str, data: bytes) -> None:
    """Length-prefixed tag and data, so no two different file sets hash the same stream."""
    t = tag.encode()
    h.update(struct.pack("<Q", len(t)) + t + struct.pack("<Q", len(data)))
    h.update(data)


def _safetensors_head(path: Path, size: int) -> bytes:
    """The 8-byte length, the JSON header and the first 64 KiB of tensor data."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path}: invalid safetensors header length {n} (file {size} bytes)")
        return raw + f.read(n + _HEAD_BYTES)


def model_fingerprint(model_dir: str | Path) -> str:
    """xxh3_128 hex digest identifying the model in model_dir; reads no weights beyond heads.

    Covers config.json (required), tokenizer.json / tokenizer.model / tiktoken.model when
    present, and for every top-level *.safetensors / *.bin file its name, size and head
    (safetensors: header + 64 KiB of data; .bin: its first 64 KiB). Raises FileNotFoundError
    naming the path when model_dir or its config.json is missing, ValueError for a corrupt
    safetensors header.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory not found: {root}")
    config = root / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: {root} is not a model directory")
    h = xxhash.xxh3_128()
    _record(h, "config.json", config.read_bytes())
    for name in _TOKENIZER_FILES:
        p = root / name
        if p.is_file():
            _record(h, name, p.read_bytes())
    weights = sorted(
        (p for p in root.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES) and p.is_file()),
        key=lambda p: p.name,
    )
    for p in weights:
        size = p.stat().st_size
        if p.name.endswith(".safetensors"):
            head = _safetensors_head(p, size)
        else:
            with p.open("rb") as f:
                head = f.read(_HEAD_BYTES)
        _record(h, f"weight:{p.name}:{size}", head)
    return h.hexdigest()
