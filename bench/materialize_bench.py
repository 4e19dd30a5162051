"""The fused materialisation kernel against the GPU's own copy bandwidth, in one run.

Usage (on a CUDA GPU): python bench/materialize_bench.py [--layers 27] [--tokens 8192 32768]

DeepSeek-V2-Lite's KV shape by default (27 layers, c_KV 512 + k_pe 64, bf16). For each size,
three ways to place N cached tokens: a plain device copy of the same bytes (the floor: what
moving them costs with no gather, no scatter, no rotation), the fused Triton kernel (gather by
source index, δ-rotate k_pe, scatter to destination slots: contiguous slots as the embedded
engine's buffer, and random slots in a pool-shaped [layers, slots, 576] buffer as SGLang's MLA
pool), and the torch reference. Bytes counted = read + write of every c_KV and k_pe row.
Correctness is checked in the same run before timing. Prints a table last.
"""

from __future__ import annotations

import argparse

import torch
import triton

from irminsul.kernels.materialize import materialize_indexed_ref
from irminsul.kernels.materialize_triton import materialize_indexed_triton
from irminsul.kernels.rope import RopeSpec

V2_LITE_ROPE = {"model_type": "deepseek_v2", "qk_rope_head_dim": 64,
                "max_position_embeddings": 163840,
                "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40,
                                    "original_max_position_embeddings": 4096, "beta_fast": 32,
                                    "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def run(layers: int, n: int, rank: int, dtype) -> list[tuple[str, float, float]]:
    spec = RopeSpec.from_hf_config(V2_LITE_ROPE)
    dev = "cuda"
    src_ckv = torch.randn(layers, n, rank, device=dev).to(dtype)
    src_kpe = torch.randn(layers, n, 64, device=dev).to(dtype)
    src_index = torch.randperm(n, device=dev)
    src_pos = torch.randint(0, 100_000, (n,), device=dev)
    dst_pos = src_pos + 200  # content moved behind a new 200-token header
    slots = 2 * n
    # the embedded engine: separate contiguous buffers, tokens at consecutive slots
    e_ckv = torch.empty(layers, slots, rank, device=dev, dtype=dtype)
    e_kpe = torch.empty(layers, slots, 64, device=dev, dtype=dtype)
    e_index = torch.arange(n, device=dev) + 200
    # SGLang-like pool: one [slots, 576] row per token and layer, random free slots
    pool = torch.empty(layers, slots, rank + 64, device=dev, dtype=dtype)
    p_ckv, p_kpe = pool[..., :rank], pool[..., rank:]
    p_index = torch.randperm(slots, device=dev)[:n]
    # the floor: a plain copy of the same bytes (read + write of every row)
    copy_dst_ckv, copy_dst_kpe = torch.empty_like(src_ckv), torch.empty_like(src_kpe)

    def copy():
        copy_dst_ckv.copy_(src_ckv)
        copy_dst_kpe.copy_(src_kpe)

    cases = {
        "device copy (floor)": copy,
        "triton, contiguous slots": lambda: materialize_indexed_triton(
            src_ckv, src_kpe, src_index, src_pos, e_ckv, e_kpe, e_index, dst_pos, spec),
        "triton, random pool slots": lambda: materialize_indexed_triton(
            src_ckv, src_kpe, src_index, src_pos, p_ckv, p_kpe, p_index, dst_pos, spec),
        "torch reference, pool slots": lambda: materialize_indexed_ref(
            src_ckv, src_kpe, src_index, src_pos, p_ckv, p_kpe, p_index, dst_pos, spec),
    }
    # correctness in the same run: kernel vs reference on poisoned pools
    for fn_name in ("triton", "ref"):
        pool.fill_(1234.0)
        fn = materialize_indexed_triton if fn_name == "triton" else materialize_indexed_ref
        fn(src_ckv, src_kpe, src_index, src_pos, p_ckv, p_kpe, p_index, dst_pos, spec)
        if fn_name == "triton":
            got = pool.clone()
    assert torch.equal(got[..., :rank], pool[..., :rank]), "c_KV differs from the reference"
    kerr = (got[..., rank:].float() - pool[..., rank:].float()).abs().max().item()
    written = torch.zeros(slots, dtype=torch.bool, device=dev)
    written[p_index] = True
    assert (got[:, ~written] == 1234.0).all(), "the kernel wrote outside its slots"
    moved = 2 * layers * n * (rank + 64) * src_ckv.element_size()
    rows = []
    for name, fn in cases.items():
        t = ms(fn)
        rows.append((name, t, moved / (t * 1e-3) / 1e9))  # t in ms
    print(f"  checked: c_KV bit-identical, k_pe max |diff| vs reference {kerr:.2e}, "
          "no stray writes")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    a = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}; {a.layers} layers, c_KV {a.rank} + k_pe 64, bf16")
    table = []
    for n in a.tokens:
        print(f"{n} tokens ({2 * a.layers * n * (a.rank + 64) * 2 / 2**20:.0f} MiB read+write):")
        table.append((n, run(a.layers, n, a.rank, torch.bfloat16)))
    print(f"\n{'tokens':>7}  {'case':<28}{'ms':>9}{'GB/s':>9}{'of copy':>9}")
    for n, rows in table:
        floor = rows[0][2]
        for name, t, bw in rows:
            print(f"{n:>7}  {name:<28}{t:>9.3f}{bw:>9.0f}{bw / floor:>8.0%}")


if __name__ == "__main__":
    main()
