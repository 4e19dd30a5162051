"""Prefill attention without a dense mask: FlexAttention with a block mask built from positions.

A prefill block's queries are prompt tokens at sorted positions that may sit anywhere in the
prompt (pic/blend recompute a few tokens per placed run); each attends to every slot at or
before its own position, whether that slot's KV was placed from the store or computed. The
dense path hands the library's attention an additive [1, 1, q, visible] mask, so the kernel
reads the mask and computes every (query, slot) pair. Here the same rule is a FlexAttention
block mask: per block of 128 queries, the key blocks wholly before its first position are
"full" (no mask evaluated), those up to its last position are partial (mask_mod: slot <=
position), and the rest are skipped, so work follows the visible pairs.

The library's attention function is looked up by name from the model config, so the runner
switches the model to a registered dispatcher (``install``) that runs FlexAttention when the
mask is a BlockMask and the configured library attention (sdpa/eager) otherwise: decode
steps and the dense path are unchanged.
"""

from __future__ import annotations

import inspect

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128  # FlexAttention's default block size, for queries and keys

_compiled = None


def _flex():
    """flex_attention compiled once with dynamic shapes on CUDA (the eager form materialises
    the scores; query count and visible length change per request). CPU runs it eagerly:
    the reference form, for tests."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=True)
    return _compiled


def dispatcher_name(base: str) -> str:
    """Register (once) and return the attention implementation name wrapping ``base``."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = f"irminsul_flex_{base}"
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    if base == "eager":
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import eager_attention_forward

        inner = eager_attention_forward
    else:
        inner = ALL_ATTENTION_FUNCTIONS[base]

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if not isinstance(attention_mask, BlockMask):
            return inner(module, query, key, value, attention_mask, scaling=scaling,
                         dropout=dropout, **kwargs)
        run = _flex() if query.is_cuda else flex_attention
        out = run(query, key, value, block_mask=attention_mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attend)
    return name


def install(model, base: str) -> None:
    """Make ``model``'s attention the dispatcher around ``base`` (idempotent)."""
    name = dispatcher_name(base)
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)


_HAS_Q_BLOCKS = "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


def position_block_mask(positions: torch.Tensor, visible: int) -> BlockMask:
    """Block mask for queries at sorted ``positions`` [q] over slots [0, visible): query i
    sees slot s iff s <= positions[i]. Built from the positions alone (no q x visible grid)."""
    q = positions.numel()
    if q == 0 or visible <= 0:
        raise ValueError("need at least one query and one visible slot")
    dev = positions.device
    qb, kvb = -(-q // BLOCK), -(-visible // BLOCK)
    # Padded rows repeat the last position, so mask_mod never indexes out of range and a
    # block's first / last row are its lowest / highest position (positions are sorted).
    qpos = positions.new_full((qb * BLOCK,), 0)
    qpos[:q] = positions
    qpos[q:] = positions[-1]
    rows = qpos.view(qb, BLOCK)
    lo, hi = rows[:, 0], rows[:, -1]
    n_full = torch.div(lo + 1, BLOCK, rounding_mode="floor").clamp(max=kvb)
    n_part = (torch.div(hi, BLOCK, rounding_mode="floor") + 1 - n_full).clamp(min=0)
    n_part = torch.minimum(n_part, kvb - n_full)
    cols = torch.arange(kvb, device=dev)
    full_idx = cols.expand(qb, kvb)
    part_idx = (n_full[:, None] + cols[None, :]).clamp(max=kvb - 1)

    def shaped(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.int32).reshape(1, 1, *t.shape).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= qpos[q_idx]

    extra = {"compute_q_blocks": False} if _HAS_Q_BLOCKS else {}
    return BlockMask.from_kv_blocks(
        shaped(n_part), shaped(part_idx), shaped(n_full), shaped(full_idx),
        BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(q, visible), **extra)

