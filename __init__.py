"""Irminsul: position-independent KV caching for Multi-Head Latent Attention models."""

__version__ = "0.1.0"

from pathlib import Path as _Path

# The model the project ships: the default of `irminsul serve` and of the proxy's embedded mode.
SHIPPED_MODEL_DIR = _Path(__file__).resolve().parent / "examples" / "models" / "irminsul-mla"
