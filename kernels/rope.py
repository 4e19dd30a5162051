"""RoPE for MLA's decoupled key (k_pe) and the δ-rotation that moves a cached k_pe elsewhere.

MLA caches per token and layer a position-free latent c_KV and a 64-dim key k_pe that already
carries RoPE at the position it was computed at. Moving a cached token from position p0 to p1
needs only k_pe rotated by the angle difference of every frequency pair; c_KV is copied as is.

Exactness: a fresh prefill rotates by the float32 angle fl(p * inv_freq) (transformers'
computation). At 128K positions that angle is quantised to ~2**-7 rad, so rotating by
fl(δ * inv_freq) would miss the fresh result by up to ~4e-3 rad. :func:`delta_rotate` therefore
takes both endpoints and rotates by fl(p1 * f) - fl(p0 * f), the difference taken in float64
where it is exact, applies it in float32 and rounds once to the storage dtype. The rotation has
unit magnitude: the stored k_pe already carries the YaRN attention scaling, once.

:func:`materialize` (gather stored c_KV / k_pe, rotate, scatter into destination slots) is the
single entry point the engine calls; this torch code is the CPU path and the oracle a fused
Triton kernel is checked against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

LAYOUTS = ("interleaved", "half")


@dataclass(frozen=True)
class RopeSpec:
    """How a model applies RoPE to its 64-dim rope part; hashable, so kernels may cache on it.

    ``inv_freq`` holds the float32 inverse frequencies (as Python floats, exactly).
    ``input_layout``/``output_layout`` name how rotation pairs sit in the vector before and
    after RoPE: "interleaved" pairs (2i, 2i+1) (DeepSeek-V2's complex view), "half" pairs
    (i, i + dim/2) (rotate_half). DeepSeek-V3 with rope_interleave reads interleaved pairs and
    writes half ones; the cached k_pe is in ``output_layout``.
    """

    dim: int
    inv_freq: tuple[float, ...]
    attention_scaling: float = 1.0
    input_layout: str = "interleaved"
    output_layout: str = "interleaved"
    rope_type: str = "default"

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.dim % 2:
            raise ValueError(f"rope dim must be a positive even number, got {self.dim}")
        if len(self.inv_freq) != self.dim // 2:
            raise ValueError(f"inv_freq has {len(self.inv_freq)} values, need {self.dim // 2}")
        for name in ("input_layout", "output_layout"):
            if getattr(self, name) not in LAYOUTS:
                raise ValueError(f"{name} must be one of {LAYOUTS}, got {getattr(self, name)!r}")
        if not self.attention_scaling > 0:
            raise ValueError(f"attention_scaling must be > 0, got {self.attention_scaling}")

    def inv_freq_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor(self.inv_freq, dtype=torch.float32, device=device)

    @classmethod
    def from_hf_config(cls, cfg: Any) -> RopeSpec:
        """Spec of a deepseek_v2 / deepseek_v3 config (transformers object or config.json dict).

        inv_freq and attention_scaling are computed with the same float32 operations, in the
        same order, as transformers' default and YaRN initialisers, so they are bit-identical.
        """
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        model_type = get("model_type")
        if model_type not in ("deepseek_v2", "deepseek_v3"):
            raise ValueError(f"unsupported model_type {model_type!r} (need deepseek_v2/v3)")
        dim = int(get("qk_rope_head_dim"))
        params = dict(get("rope_parameters") or {})
        legacy = get("rope_scaling") or {}
        if not params or "rope_theta" not in params:
            params = {**dict(legacy), **params}
            params.setdefault("rope_theta", get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        base = params["rope_theta"]
        if rope_type == "default":
            inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            scaling = 1.0
        elif rope_type == "yarn":
            inv, scaling = _yarn(params, dim, base, get("max_position_embeddings"))
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r} (default and yarn only)")
        if model_type == "deepseek_v2":
            layouts = ("interleaved", "interleaved")
        elif get("rope_interleave", True):
            layouts = ("interleaved", "half")
        else:
            layouts = ("half", "half")
        return cls(dim, tuple(inv.tolist()), float(scaling), *layouts, rope_type=rope_type)


def _yarn(params: dict, dim: int, base: float, max_pos) -> tuple[torch.Tensor, float]:
    """DeepSeek YaRN inverse frequencies and attention factor, as transformers computes them."""
    factor = params.get("factor")
    orig = params["original_max_position_embeddings"]
    if factor is None:
        factor = max_pos / orig

    def mscale_of(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim))
        else:
            attention_factor = mscale_of(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the singularity guard transformers uses
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv, attention_factor


def angles(positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """float32 angles [T, dim/2] = fl(position * inv_freq), exactly as a fresh prefill has them."""
    inv = spec.inv_freq_tensor(positions.device)
    return positions.reshape(-1)[:, None].float() * inv


def _pairs(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (first, second) members of every rotation pair, each [..., dim/2]."""
    if layout == "interleaved":
        return x[..., 0::2], x[..., 1::2]
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def _join(a: torch.Tensor, b: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "interleaved":
        return torch.stack((a, b), dim=-1).flatten(-2)
    return torch.cat((a, b), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """RoPE of x [..., T, dim] at positions [T], as the model's attention computes it.

    Interleaved-to-interleaved (DeepSeek-V2) multiplies complex pairs by polar(1, angle) *
    scaling in float32; the half-layout output (DeepSeek-V3) uses cos/sin cast to x's dtype,
    both as transformers does, so results are bit-identical to the library's.
    """
    if x.shape[-1] != spec.dim:
        raise ValueError(f"last dim {x.shape[-1]} != rope dim {spec.dim}")
    a = angles(positions, spec)
    if spec.output_layout == "interleaved":
        freqs_cis = torch.polar(torch.ones_like(a), a) * spec.attention_scaling
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis).flatten(-2).type_as(x)
    emb = torch.cat((a, a), dim=-1)
    cos = (emb.cos() * spec.attention_scaling).to(x.dtype)[..., : spec.dim // 2]
    sin = (emb.sin() * spec.attention_scaling).to(x.dtype)[..., : spec.dim // 2]
    x1, x2 = _pairs(x, spec.input_layout)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def delta_rotate(
    k_pe: torch.Tensor, src_positions: torch.Tensor, dst_positions: torch.Tensor, spec: RopeSpec
) -> torch.Tensor:
    """k_pe [..., T, dim] computed at src_positions [T], re-rotated to dst_positions [T].

    Returns a new tensor of k_pe's dtype; the input is not changed. The angle difference is
    exact (float64 difference of the two float32 fresh-prefill angles), the rotation is
    applied in float32 and rounded once.
    """
    if k_pe.shape[-1] != spec.dim:
        raise ValueError(f"last dim {k_pe.shape[-1]} != rope dim {spec.dim}")
    if src_positions.shape != dst_positions.shape or src_positions.numel() != k_pe.shape[-2]:
        raise ValueError("need one source and one destination position per token")
    src_positions = src_positions.to(k_pe.device)
    dst_positions = dst_positions.to(k_pe.device)
    d = angles(dst_positions, spec).double() - angles(src_positions, spec).double()
    cos, sin = d.cos().float(), d.sin().float()
    x1, x2 = _pairs(k_pe.float(), spec.output_layout)
    out = _join(x1 * cos - x2 * sin, x2 * cos + x1 * sin, spec.output_layout)
    return out.to(k_pe.dtype)


class Segment(NamedTuple):
    """A run of stored tokens to place: latents [L, T, rank] / k_pe [L, T, dim] computed at
    positions src_position.., going to slots dst_slot.. at positions dst_position.."""

    c_kv: torch.Tensor
    k_pe: torch.Tensor
    src_position: int
    dst_position: int
    dst_slot: int


def materialize(
    dst_ckv: torch.Tensor, dst_kpe: torch.Tensor, segments: Sequence[Segment], spec: RopeSpec
) -> None:
    """Place cached tokens: for every segment, dst_ckv[:, slots] = c_kv (copied as is) and
    dst_kpe[:, slots] = k_pe δ-rotated from its source to its destination positions.

    dst_* are [L, S, rank] / [L, S, dim] buffers, changed in place. All segments' k_pe are
    rotated in one batch. The one call a fused gather-rotate-scatter kernel replaces.
    """
    if not segments:
        return
    dev = dst_kpe.device
    for s in segments:
        dst_ckv[:, s.dst_slot : s.dst_slot + s.c_kv.shape[1]] = s.c_kv
    lengths = [s.k_pe.shape[1] for s in segments]
    src = torch.cat([torch.arange(s.src_position, s.src_position + n)
                     for s, n in zip(segments, lengths)])
    dst = torch.cat([torch.arange(s.dst_position, s.dst_position + n)
                     for s, n in zip(segments, lengths)])
    slots = torch.cat([torch.arange(s.dst_slot, s.dst_slot + n)
                       for s, n in zip(segments, lengths)])
    k_pe = torch.cat([s.k_pe.to(dev) for s in segments], dim=1)
    rotated = delta_rotate(k_pe, src, dst, spec)
    dst_kpe.index_copy_(1, slots.to(dev), rotated.to(dst_kpe.dtype))
