# Imported first so that its sys.path guard runs before any test module imports transformers:
# `python -m pytest` from the repository root would otherwise let our `kernels/` folder shadow
# Hugging Face's `kernels` package (see irminsul/__init__.py).
import irminsul  # noqa: F401
