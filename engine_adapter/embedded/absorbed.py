"""MLA attention in the absorbed form, over the runner's latent slot buffer.

The library's attention expands every visible slot's latent c_KV into per-head keys and
values (kv_b_proj) before attending. For a block of few queries over many placed slots (pic's
recomputed tokens, a decode step) that expansion dominates: on an H100 a pic request at 8K
tokens spent its time expanding and writing 8K slots x 27 layers of per-head K/V, and the
memo that keeps them (model_runner._MemoExpand) costs a host sync per layer and ~2 GiB per
8K-token request in V2-Lite's shape. The absorbed form folds kv_b_proj into the queries
instead (DeepSeek-V2 paper, section 2.1.2):

    score(h, i, s) = (W_UK[h]^T q_nope[h, i]) . c_KV[s] + q_pe[h, i] . k_pe[s]
    out(h, i)      = W_UV[h] (sum_s p(h, i, s) c_KV[s])

so attention reads the 576 latent values of each slot once, and nothing is expanded or
stored per head. The projections, norms and RoPE are the library module's own weights and
functions; only the order of the products changes (float32: equal up to rounding; bf16:
scores are accumulated and kept in float32 where torch offers it, as the fused kernels do).
It pays for few queries (its score costs rank + rope_dim per head and slot against the
expanded form's qk_head_dim), so the runner uses it for blocks up to a query count
(EngineConfig.absorbed_max_queries) and the library's path above that.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def library_rope(attn: nn.Module):
    """The RoPE function the attention module's own forward applies: (q_pe, k_pe, position
    embeddings) -> (q_pe, k_pe), position embeddings as the model's rotary_emb returns them."""
    mod = sys.modules[type(attn).__module__]
    if hasattr(mod, "apply_rotary_emb"):  # DeepSeek-V2: complex freqs_cis
        return mod.apply_rotary_emb
    interleave = getattr(attn.config, "rope_interleave", False)
    fn = getattr(mod, "apply_rotary_pos_emb_interleave" if interleave else "apply_rotary_pos_emb",
                 None)
    if fn is None:  # a library version that names it otherwise: the runner keeps its path
        return None

    def rope(q, k, pe):
        cos, sin = pe
        return fn(q, k, cos, sin)

    return rope


def supports(attn: nn.Module) -> bool:
    """A plain linear kv_b_proj (no quantised or sharded weight), which the fold needs, and a
    RoPE function found in the module's library file."""
    w = getattr(getattr(attn, "kv_b_proj", None), "weight", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and w.dtype.is_floating_point
            and library_rope(attn) is not None)


# Float32 scores held at once: heads are taken in groups under this many bytes (512 queries
# over 32K slots for 16 heads would otherwise hold 1 GiB of scores).
SCORE_BYTES = 256 << 20

_OUT_DTYPE: dict[str, bool] = {}


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result. On CUDA in bf16 the product is accumulated in float32 and
    returned unrounded (torch.mm's out_dtype), as a fused attention kernel keeps its scores;
    elsewhere (CPU, float32, a torch without out_dtype) the plain product, cast."""
    if a.is_cuda and a.dtype != torch.float32:
        key = str(a.device)
        if _OUT_DTYPE.get(key, True):
            try:
                return torch.mm(a, b, out_dtype=torch.float32)
            except (RuntimeError, TypeError):
                _OUT_DTYPE[key] = False
    return (a @ b).float()


def absorbed_attention(attn: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None,
                       cache, position_embeddings, rope,
                       positions: torch.Tensor | None = None, splits: int = 1) -> torch.Tensor:
    """One attention module's output [1, q, hidden] for queries ``hidden`` [1, q, hidden].

    ``cache.update(c_kv, k_pe, layer)`` writes the queries' own latents into their slots and
    returns the visible slots' ([1, 1, t, rank], [1, 1, t, rope_dim]); ``mask`` is the
    additive [1, 1, q, t] mask (None: every query sees every visible slot). With the queries'
    ``positions`` [q] the fused kernel (kernels/mla_attention_triton.py) attends instead, each
    query seeing the slots up to its position (the mask is then unused), its slots divided
    among ``splits`` programs."""
    _, q, _ = hidden.shape
    heads, nope, rdim = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim
    vdim, rank = attn.v_head_dim, attn.kv_lora_rank
    if attn.q_lora_rank is None:
        qs = attn.q_proj(hidden)
    else:
        qs = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(hidden)))
    qs = qs.view(1, q, heads, nope + rdim).transpose(1, 2)
    q_nope, q_pe = torch.split(qs, [nope, rdim], dim=-1)
    c, k_pe = torch.split(attn.kv_a_proj_with_mqa(hidden), [rank, rdim], dim=-1)
    c = attn.kv_a_layernorm(c).view(1, 1, q, rank)
    q_pe, k_pe = rope(q_pe, k_pe.view(1, 1, q, rdim), position_embeddings)
    c_all, pe_all = cache.update(c, k_pe, attn.layer_idx)
    latent, rot = c_all[0, 0], pe_all[0, 0]  # [t, rank], [t, rope_dim]
    w = attn.kv_b_proj.weight.view(heads, nope + vdim, rank)
    w_uk, w_uv = w[:, :nope], w[:, nope:]  # [H, nope, rank], [H, v, rank]
    q_lat = torch.bmm(q_nope[0], w_uk)  # [H, q, rank]
    if positions is not None:
        from ...kernels.mla_attention_triton import mla_attention_triton

        o_lat = mla_attention_triton(q_lat, q_pe[0], latent, rot, positions, attn.scaling,
                                     splits=splits)
    else:
        o_lat = attend(q_lat, q_pe[0], latent, rot, mask, attn.scaling)
    out = torch.bmm(o_lat, w_uv.transpose(1, 2))  # [H, q, v]
    return attn.o_proj(out.transpose(0, 1).reshape(1, q, heads * vdim))


def attend(q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, rot: torch.Tensor,
           mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """The torch form of the absorbed attention: o_lat [H, q, rank] for q_lat [H, q, rank],
    q_pe [H, q, rope_dim] over latent [t, rank] / rot [t, rope_dim] under the additive mask
    [1, 1, q, t] (None: all visible). Scores are materialised in float32, heads in groups
    within SCORE_BYTES."""
    heads, q, rank = q_lat.shape
    t = latent.shape[0]
    bias = None if mask is None else mask[0, 0].float()
    step = max(1, SCORE_BYTES // (q * t * 4))
    parts = []
    for h0 in range(0, heads, step):
        h1 = min(heads, h0 + step)
        scores = (_mm_f32(q_lat[h0:h1].reshape(-1, rank), latent.T)
                  + _mm_f32(q_pe[h0:h1].reshape(-1, q_pe.shape[-1]), rot.T))
        scores = scores.view(h1 - h0, q, t).mul_(scaling)
        if bias is not None:
            scores.add_(bias)
        probs = scores.softmax(dim=-1).to(latent.dtype).view(-1, t)
        parts.append((probs @ latent).view(h1 - h0, q, rank))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
