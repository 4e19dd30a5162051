"""Write the weights of the shipped tiny MLA model: examples/models/tiny-mla/.

Usage: python examples/models/make_tiny_model.py [--out DIR] [--seed N] [--dtype bfloat16]

The model is the engine's "tiny-mla" preset (DeepSeek-V2 architecture: MLA with a 512-dim
latent, 64-dim decoupled RoPE key with DeepSeek's YaRN, a small MoE) with transformers'
random initialisation under a fixed seed: it is not trained and its text is noise, but it
exercises every code path of a real DeepSeek-V2 checkpoint. The tokenizer files already in
the directory (written by make_tokenizer.py) are kept, and their special-token IDs go into
config.json. Same seed, torch and transformers versions: the same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from irminsul.engine_adapter.embedded.presets import build_checkpoint

HERE = Path(__file__).resolve().parent / "tiny-mla"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="output directory [%(default)s]")
    ap.add_argument("--seed", type=int, default=0, help="weight seed [%(default)s]")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="stored weight dtype; bfloat16 keeps the file small [%(default)s]")
    ap.add_argument("--tokenizer", type=Path, default=HERE,
                    help="directory holding tokenizer.json [%(default)s]")
    a = ap.parse_args()
    out = build_checkpoint("tiny-mla", a.out, seed=a.seed, tokenizer_dir=a.tokenizer,
                           dtype=a.dtype)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
