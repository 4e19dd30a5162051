"""Irminsul: position-independent KV caching for Multi-Head Latent Attention models."""

__version__ = "0.1.0"

import os as _os
import sys as _sys
from pathlib import Path as _Path

_HERE = _Path(__file__).resolve().parent


def _drop_checkout_from_sys_path() -> None:
    """The repository root is this package. `python -m pytest` or `python -m irminsul.cli`
    started there puts it first on sys.path, which makes our folders importable as bare
    top-level modules: `kernels/` then shadows Hugging Face's `kernels` package, which
    transformers imports when it is installed (a dependency of transformers >= 5.2x), and
    transformers fails to import. Irminsul itself is always imported as `irminsul.…`, so that
    entry serves nothing; drop it."""
    cwd = _os.getcwd()
    _sys.path[:] = [p for p in _sys.path
                    if _Path(p or cwd).resolve() != _HERE]
    shadow = getattr(_sys.modules.get("kernels"), "__file__", None)
    if shadow and _Path(shadow).resolve().parent == _HERE / "kernels":
        del _sys.modules["kernels"]  # imported from the root before this ran


_drop_checkout_from_sys_path()

# The model the project ships: the default of `irminsul serve` and of the proxy's embedded mode.
SHIPPED_MODEL_DIR = _HERE / "examples" / "models" / "irminsul-mla"
