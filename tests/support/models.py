"""Tiny random-weight DeepSeek-V2 checkpoints for engine tests (built once per session).

Import the fixtures into a test module: ``from support.models import yarn_model, plain_model``
(and ``aux_model``, the clip policy's auxiliary model).
Each is a directory with config.json, model.safetensors (float32) and the shipped tiny
tokenizer, for the YaRN and the plain-RoPE variant of the "tiny-mla" preset.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import irminsul
from irminsul.engine_adapter.embedded.presets import build_checkpoint

SHIPPED = Path(irminsul.__file__).parent / "examples" / "models" / "tiny-mla"
_BUILT: dict[tuple[str, int], Path] = {}


def checkpoint(tmp_path_factory, preset: str, seed: int = 0) -> Path:
    """A float32 checkpoint of ``preset`` with the shipped tokenizer, built once per session
    (cached here so modules that import the fixtures share one build)."""
    key = (preset, seed)
    if key not in _BUILT:
        out = tmp_path_factory.mktemp(f"{preset}-{seed}")
        _BUILT[key] = build_checkpoint(preset, out, seed=seed, tokenizer_dir=SHIPPED)
    return _BUILT[key]


@pytest.fixture(scope="session")
def yarn_model(tmp_path_factory) -> Path:
    """tiny-mla with DeepSeek-V2's YaRN rope_parameters (factor 40, mscale 0.707)."""
    return checkpoint(tmp_path_factory, "tiny-mla")


@pytest.fixture(scope="session")
def plain_model(tmp_path_factory) -> Path:
    """tiny-mla with plain RoPE (rope_theta 10000)."""
    return checkpoint(tmp_path_factory, "tiny-mla-plain")


@pytest.fixture(scope="session")
def aux_model(tmp_path_factory) -> Path:
    """The "tiny-aux" preset: a 2-layer CacheClip auxiliary model sharing the tiny tokenizer."""
    return checkpoint(tmp_path_factory, "tiny-aux")
