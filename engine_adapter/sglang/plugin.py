"""SGLang plugin entry point: registers the radix-cache backend ``irminsul``.

pyproject declares ``[project.entry-points."sglang.srt.plugins"] irminsul = ...:register``.
SGLang (``srt/plugins/__init__.py`` ``load_plugins``) calls :func:`register` once per process,
in every process, whether or not the backend is used; so register() only adds a name to
SGLang's registry (``srt/mem_cache/registry.py`` ``register_radix_cache_backend``) and imports
nothing else of Irminsul's. SGLang behaves as before unless the server is started with
``--radix-cache-backend irminsul``, which makes ``create_tree_cache`` call :func:`build_cache`.

The backend is written against SGLang 0.5.23's private cache classes, so any other version is
refused: registering still happens (a clear error then beats "not registered"), and selecting
the backend raises :class:`IncompatibleSGLang` naming both versions.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.23"
BACKEND_NAME = "irminsul"


class IncompatibleSGLang(RuntimeError):
    """The installed SGLang is not the release this backend was written for."""


def check_version(version: str) -> None:
    if version != SGLANG_VERSION:
        raise IncompatibleSGLang(
            f"irminsul's SGLang backend supports sglang=={SGLANG_VERSION} only, but sglang "
            f"{version} is installed; install it with `pip install 'irminsul[sglang]'` or run "
            "without --radix-cache-backend irminsul (SGLang's own cache)")


def register() -> None:
    """Entry point of group ``sglang.srt.plugins``: add the ``irminsul`` backend name."""
    import sglang
    from sglang.srt.mem_cache.registry import (
        get_radix_cache_factory,
        register_radix_cache_backend,
    )

    try:
        check_version(sglang.__version__)
    except IncompatibleSGLang as e:
        log.warning("%s", e)
    if get_radix_cache_factory(BACKEND_NAME) is None:  # idempotent per process
        register_radix_cache_backend(BACKEND_NAME, build_cache)


def build_cache(ctx: Any):
    """The factory (``RadixCacheFactory``): a TreeCacheBuildContext in, the cache out."""
    import sglang

    check_version(sglang.__version__)
    from sglang.srt.mem_cache.registry import create_unified_radix_cache
    from sglang.srt.runtime_context import get_memory

    from .cache import IrminsulRadixCache
    from .config import SGLangReuseConfig

    refused = {
        "--enable-hierarchical-cache": ctx.enable_hierarchical_cache,
        "--enable-lmcache": get_memory().enable_lmcache,
        "a sliding-window (SWA) model": ctx.is_hybrid_swa,
        "a model with mamba state": ctx.is_hybrid_ssm,
        "a DSA model": ctx.is_dsa,
    }
    bad = [name for name, on in refused.items() if on]
    if bad:
        raise ValueError(f"--radix-cache-backend {BACKEND_NAME} does not support "
                         f"{', '.join(bad)}")
    config = SGLangReuseConfig.from_env()
    cache = create_unified_radix_cache(ctx, cache_class=IrminsulRadixCache)
    if ctx.disable_radix_cache:
        log.warning("irminsul: --disable-radix-cache is set; content reuse is off")
        return cache
    pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    spec = rope_spec_from_sglang(find_rotary(ctx.tp_worker.model_runner.model))
    cache.attach(config, spec, pool)
    if getattr(ctx.params, "enable_kv_cache_events", False):
        # Event hashes of an extra_key without cache_salt start from no parent, so composed
        # nodes are announced like plain prompts that begin at their first token (DESIGN.md).
        log.warning("irminsul: --enable-kv-cache-events announces composed KV (kept under a "
                    "derived extra_key) as ordinary blocks; a KV-aware router may count them")
    _install_reuse_report()
    log.info("irminsul: content reuse on (policy %s, k %d)", config.policy, config.pic_k)
    return cache


def _install_reuse_report() -> None:
    """Report placed tokens next to SGLang's cached_tokens (cache.py ``reuse_details``).
    Hooked here, in the process that built the backend, so servers without it are untouched."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from .cache import DETAILS_TARGET, reuse_details

    if not any(h is reuse_details for _, h, _ in HookRegistry._hooks.get(DETAILS_TARGET, ())):
        HookRegistry.register(DETAILS_TARGET, reuse_details, HookType.AFTER)
    HookRegistry.apply_hooks()  # patches only targets not patched yet


def find_rotary(model: Any):
    """The rotary embedding of the model's first MLA attention (DeepseekV2AttentionMLA)."""
    for module in model.modules():
        rope = getattr(module, "rotary_emb", None)
        if rope is not None and hasattr(module, "kv_lora_rank"):
            return rope
    raise ValueError("irminsul needs an MLA model (DeepSeek-V2/V3 family); found no MLA "
                     f"attention with a rotary embedding in {type(model).__name__}")


def rope_spec_from_sglang(rope: Any):
    """RopeSpec with SGLang's own inverse frequencies, so δ-rotation reproduces the angles
    SGLang's prefill uses (``_compute_cos_sin_cache``: fl(position * inv_freq))."""
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding
    from sglang.srt.layers.rotary_embedding.rope_variant import DeepseekScalingRotaryEmbedding

    from ...kernels.rope import RopeSpec

    if isinstance(rope, DeepseekScalingRotaryEmbedding):
        inv, scaling, kind = rope._compute_inv_freq(rope.scaling_factor), rope.mscale, "yarn"
    elif type(rope) is RotaryEmbedding:
        inv, scaling, kind = rope._compute_inv_freq(rope.base), 1.0, "default"
    else:
        raise ValueError(f"irminsul cannot δ-rotate {type(rope).__name__} (DeepSeek YaRN and "
                         "plain RoPE only)")
    if rope.rotary_dim != rope.head_size:
        raise ValueError("partial rotary (rotary_dim != head_size) is not supported")
    layout = "half" if rope.is_neox_style else "interleaved"
    return RopeSpec(rope.rotary_dim, tuple(inv.float().cpu().tolist()), float(scaling),
                    layout, layout, rope_type=kind)
