"""The SGLang backend against SGLang 0.5.23's real classes, on CPU tensors.

Built from SGLang itself: ServerArgs, ReqToTokenPool, MLATokenToKVPool, TokenToKVPoolAllocator,
UnifiedRadixCache (our subclass), Req, release_kv_cache, the kv_hints decoder and
DeepseekScalingRotaryEmbedding (the rotary SGLang's DeepSeek model uses). The scheduler itself
is not run (it needs a model runner and GPU kernels); each test drives the cache through the
calls the scheduler makes, in its order (see cache.py's docstring).

Needs sglang==0.5.23 importable (pip install --no-deps, plus the pure-Python modules its cache
modules import; see engine_adapter/sglang/DESIGN.md, "Testing on CPU"). IRMINSUL_SGLANG_SITE
(os.pathsep-separated directories) is put on sys.path first. Skips, with the reason, otherwise.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from array import array

import numpy as np
import pytest
import torch

for _p in reversed([p for p in os.environ.get("IRMINSUL_SGLANG_SITE", "").split(os.pathsep) if p]):
    if _p not in sys.path:
        sys.path.insert(0, _p)


class _AbsentModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AbsentMeta(name, (), {})


class _AbsentMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AbsentMeta(name, (), {})


class _TorchvisionPlaceholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """SGLang's config package imports torchvision for InternVL/DeepSeek-OCR image transforms
    (``srt/configs/__init__.py`` -> ``multimodal/internvl_utils.py``). PyPI's torchvision is
    CUDA-linked and fails to load against CPU torch, and nothing on the cache path calls it:
    where the real one cannot be imported, an empty stand-in lets the import finish."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _AbsentModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []
        module.__version__ = "0.0.0"  # transformers compares versions; 0.0.0 disables it


def _import_sglang():
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or a CUDA build on CPU torch: same remedy
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _TorchvisionPlaceholder())
    try:
        import sglang
    except ImportError as e:
        pytest.skip(f"sglang==0.5.23 is not importable: {e}", allow_module_level=True)
    if sglang.__version__ != "0.5.23":
        pytest.skip(f"these tests are for sglang 0.5.23, found {sglang.__version__}",
                    allow_module_level=True)
    try:
        import sglang.srt.mem_cache.unified_radix_cache
    except ImportError as e:
        pytest.skip(f"sglang's cache modules do not import here: {e}", allow_module_level=True)


_import_sglang()

from sglang.srt.layers.rotary_embedding import base as rope_base
from sglang.srt.layers.rotary_embedding.rope_variant import (
    DeepseekScalingRotaryEmbedding,
)
from sglang.srt.managers.kv_hints import decode_kv_hints_envelope
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache import registry
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    InitLoadBackParams,
    MatchPrefixParams,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import release_kv_cache
from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import (
    ServerArgs,
    set_global_server_args_for_scheduler,
)

from irminsul.chunking.config import ChunkerConfig
from irminsul.engine_adapter.contract import Annotation, seq_hash
from irminsul.engine_adapter.sglang import plugin
from irminsul.engine_adapter.sglang.cache import REQ_COUNTS_ATTR, IrminsulRadixCache
from irminsul.engine_adapter.sglang.config import SGLangReuseConfig
from irminsul.engine_adapter.sglang.hints import (
    annotation_from_kv_hints,
    kv_hints_envelope,
)
from irminsul.kernels.rope import apply_rope, delta_rotate

RANK, ROPE, LAYERS, SLOTS = 32, 64, 2, 2048


@pytest.fixture(scope="module")
def rope(request):
    """SGLang's DeepSeek YaRN rotary (mscale != 1), on its torch-native CPU path."""
    mp = pytest.MonkeyPatch()
    mp.setattr(rope_base, "_is_cpu", True)  # choose forward_native's setup, as on a CPU engine
    try:
        r = DeepseekScalingRotaryEmbedding(
            ROPE, ROPE, 1024, 10000, False, 4.0, torch.float32,
            beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.0, device="cpu")
    finally:
        mp.undo()
    assert r.mscale != 1.0 and not r.is_neox_style
    return r


def _fresh_kpe(rope, raw: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """k_pe as SGLang's prefill writes it: raw [T, 64] rotated at ``positions``."""
    q = torch.zeros(len(positions), 1, ROPE)
    _, k = rope.forward_native(positions, q, raw.reshape(-1, 1, ROPE).clone())
    return k.reshape(-1, ROPE)


class Engine:
    """SGLang's pools and our cache, plus the few scheduler steps the tests need."""

    def __init__(self, rope, *, dtype=torch.float32, policy="pic", page_size=1):
        set_global_server_args_for_scheduler(ServerArgs(model_path="dummy", page_size=page_size))
        self.rope = rope
        self.reqs = ReqToTokenPool(size=8, max_context_len=1024, device="cpu",
                                   enable_memory_saver=False)
        self.pool = MLATokenToKVPool(SLOTS, page_size, dtype, RANK, ROPE, LAYERS, "cpu", False)
        if page_size == 1:
            self.alloc = TokenToKVPoolAllocator(SLOTS, dtype, "cpu", self.pool, need_sort=False)
        else:
            self.alloc = PagedTokenToKVPoolAllocator(SLOTS, page_size, dtype, "cpu", self.pool,
                                                     need_sort=False)
        params = CacheInitParams(disable=False, req_to_token_pool=self.reqs,
                                 token_to_kv_pool_allocator=self.alloc, page_size=page_size,
                                 tree_components=(ComponentType.FULL,))
        self.cache = IrminsulRadixCache(params)
        self.config = SGLangReuseConfig(policy=policy, pic_k=0,
                                        chunker=ChunkerConfig(min_tokens=16, avg_tokens=32,
                                                              max_tokens=64))
        self.cache.attach(self.config, plugin.rope_spec_from_sglang(rope), self.pool)
        self.raw: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # rid -> (c_kv, raw k)
        self.n = 0
        self.total = self.alloc.available_size()

    def request(self, ids, anchors=(), *, namespace="", extra_key=None) -> Req:
        self.n += 1
        ann = Annotation(len(ids), seq_hash(ids), (), anchors=tuple(anchors),
                         namespace=namespace)
        hints = decode_kv_hints_envelope(kv_hints_envelope(ann, f"m{self.n}"))
        req = Req(rid=f"r{self.n}", origin_input_text="", origin_input_ids=array("q", ids),
                  sampling_params=SamplingParams(temperature=0, max_new_tokens=1),
                  kv_hints=hints, extra_key=extra_key)
        self.reqs.alloc([req])
        return req

    def admit(self, req: Req) -> int:
        """Scheduler admission: match, then load the host hit; returns the placed length."""
        req.init_next_round_input(self.cache)
        placed = 0
        if req.host_hit_length:
            loaded = self.cache.init_load_back(InitLoadBackParams(
                best_match_node=req.best_match_node, host_hit_length=req.host_hit_length,
                req=req))
            placed, req.last_node = loaded
            req.host_loaded_length = placed
            req.prefix_len += placed
        req.lock = self.cache.lock(req.last_node)
        return placed

    def prefill(self, req: Req, seed: int) -> torch.Tensor:
        """Allocate the row (prefix slots from the cache, new slots for the rest) and write
        fresh KV for the computed tokens with SGLang's pool writer; returns the row."""
        n = len(req.origin_input_ids)
        prefix = self.cache.prefix_device_indices(req)
        assert len(prefix) == req.prefix_len
        new = self.alloc.alloc(n - req.prefix_len)
        row = torch.cat([prefix.to(torch.int64), new.to(torch.int64)])
        self.reqs.write((req.kv.req_pool_idx, slice(0, n)), row.to(torch.int32))
        g = torch.Generator().manual_seed(seed)
        ckv = torch.randn(LAYERS, n, RANK, generator=g)
        raw = torch.randn(LAYERS, n, ROPE, generator=g)
        pos = torch.arange(req.prefix_len, n)
        for layer in range(LAYERS):
            kpe = _fresh_kpe(self.rope, raw[layer, req.prefix_len :], pos)
            self.pool.set_mla_kv_buffer(
                None, new, ckv[layer, req.prefix_len :, None].to(self.pool.dtype),
                kpe[:, None].to(self.pool.dtype), layer_id_override=layer)
        self.raw[req.rid] = (ckv, raw)
        req.full_untruncated_fill_ids = array("q", req.origin_input_ids)
        req.extend_end = n
        req.kv.kv_committed_len = n
        req.kv.kv_allocated_len = n
        return row

    def serve(self, ids, anchors=(), *, seed: int, **kw) -> tuple[Req, torch.Tensor]:
        """One whole request as the scheduler runs it: admit, prefill (fresh KV drawn from
        ``seed``), finish; returns it and its row."""
        req = self.request(ids, anchors, **kw)
        self.admit(req)
        row = self.prefill(req, seed)
        self.finish(req)
        return req, row

    def finish(self, req: Req) -> None:
        from sglang.srt.managers.schedule_batch import FINISH_LENGTH

        req.finished_reason = FINISH_LENGTH(length=0)
        release_kv_cache(req, self.cache, checkpoint=True)

    def read(self, slots: torch.Tensor):
        """c_KV [L, T, rank] and k_pe [L, T, 64] at ``slots``, through SGLang's accessors
        (get_mla_kv_buffer runs a Triton kernel, which needs a GPU)."""
        rows = torch.stack([self.pool.get_key_buffer(layer)[slots.long(), 0].float()
                            for layer in range(LAYERS)])
        assert torch.equal(rows[..., :RANK], torch.stack(
            [self.pool.get_value_buffer(layer)[slots.long(), 0].float()
             for layer in range(LAYERS)]))
        return rows[..., :RANK], rows[..., RANK:]

    def exact_match(self, ids) -> int:
        key = RadixKey(array("q", ids))
        return IrminsulRadixCache.__mro__[1].match_prefix(
            self.cache, MatchPrefixParams(key=key)).device_prefix_len


def _segments(seed: int, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, 30000, size=n).tolist() for n in lengths]


@pytest.fixture
def docs():
    sys_, doc1, doc2, tail, gap, q = _segments(7, (40, 96, 96, 10, 20, 10))
    return sys_, doc1, doc2, tail, gap, q


def _with_anchors(*segments):
    ids, anchors = [], []
    for s in segments:
        anchors.append(len(ids))
        ids += s
    return ids, anchors


def test_envelope_passes_sglang_decoder():
    ann = Annotation(3, seq_hash([1, 2, 3]), (), anchors=(0, 2), namespace="t")
    decoded = decode_kv_hints_envelope(kv_hints_envelope(ann, "rid"))
    assert annotation_from_kv_hints(decoded) == ann
    with pytest.raises(ValueError, match="Malformed kv_hints"):
        decode_kv_hints_envelope(ann.to_json())  # the bare annotation SGLang refuses


def test_rope_spec_matches_sglang_rotary(rope):
    spec = plugin.rope_spec_from_sglang(rope)
    raw = torch.randn(5, ROPE)
    pos = torch.tensor([0, 1, 77, 900, 3000])
    ours = apply_rope(raw, pos, spec)
    torch.testing.assert_close(ours, _fresh_kpe(rope, raw, pos), rtol=1e-5, atol=1e-5)


def test_content_hit_is_placed_rotated_and_never_enters_the_tree(rope, docs):
    sys_, doc1, doc2, tail, gap, q = docs
    eng = Engine(rope)
    a_ids, a_anchors = _with_anchors(sys_, doc1, doc2, tail)
    a = eng.request(a_ids, a_anchors)
    assert eng.admit(a) == 0  # empty cache
    a_row = eng.prefill(a, seed=1)
    eng.finish(a)
    assert eng.exact_match(a_ids) == len(a_ids)  # A is in SGLang's tree, exactly
    free_before = eng.alloc.available_size()

    b_ids, b_anchors = _with_anchors(sys_, doc2, gap, doc1, q)
    b = eng.request(b_ids, b_anchors)
    placed = eng.admit(b)
    exact = len(sys_)
    assert b.prefix_len - placed == exact  # SGLang's own radix prefix first
    assert placed == len(doc2)  # then the run of doc2's chunks; doc1 lies past a hole
    counts = getattr(b, REQ_COUNTS_ATTR)
    assert (counts.exact_prefix_tokens, counts.reused_tokens) == (exact, len(doc2))
    assert counts.recomputed_tokens == len(doc1)  # hits behind the hole are computed
    assert counts.prompt_tokens == len(b_ids)
    assert not b.skip_radix_cache_insert and b.already_computed == placed

    b_row = eng.prefill(b, seed=2)
    assert torch.equal(b_row[:exact], a_row[:exact])  # shared prefix slots
    src = slice(len(sys_) + len(doc1), len(sys_) + len(doc1) + len(doc2))  # doc2 in A
    dst = slice(exact, exact + placed)
    assert not set(b_row[dst].tolist()) & set(a_row.tolist())  # private slots
    got_ckv, got_kpe = eng.read(b_row[dst])
    src_ckv, src_kpe = eng.read(a_row[src])
    assert torch.equal(got_ckv, src_ckv)  # c_KV copied as is
    src_pos, dst_pos = torch.arange(src.start, src.stop), torch.arange(dst.start, dst.stop)
    spec = plugin.rope_spec_from_sglang(rope)
    assert torch.equal(got_kpe, delta_rotate(src_kpe, src_pos, dst_pos, spec))
    # ... and equal to what SGLang's own prefill writes at the new positions
    a_raw = eng.raw[a.rid][1]
    for layer in range(LAYERS):
        fresh = _fresh_kpe(rope, a_raw[layer, src], dst_pos)
        torch.testing.assert_close(got_kpe[layer], fresh, rtol=1e-5, atol=2e-5)

    eng.finish(b)
    assert eng.exact_match(b_ids) == exact  # composed KV is no exact radix key
    # ... it is kept under the derived key (tokens [exact, N)); nothing else is held
    assert eng.alloc.available_size() == free_before - (len(b_ids) - exact)
    eng.cache.evict(EvictParams(num_tokens=SLOTS))
    assert eng.exact_match(a_ids) == 0
    assert eng.alloc.available_size() == eng.total  # SGLang's eviction freed them too


def test_a_rewritten_header_gets_its_hits_only_after_a_prewarm_request(rope, docs):
    """The limit of one placed run per request, in the case agents hit most (DESIGN.md,
    Holes): new tokens right after the exact prefix (a header rewritten every turn) leave the
    hits behind them unplaced. The way out: the prompt up to the hits, sent first as its own
    request (a pre-warm with max_new_tokens 0), enters the tree exactly; the real request's
    exact prefix then reaches the hits, and their run is placed, δ-rotated to its new place."""
    sys_, doc1, doc2, tail, hdr_a, q = docs
    (hdr_b,) = _segments(11, (23,))  # 3 tokens longer: the documents move by 3
    assert hdr_b[0] != hdr_a[0]
    a_ids, a_anchors = _with_anchors(sys_, hdr_a, doc1, doc2, tail)
    b_ids, b_anchors = _with_anchors(sys_, hdr_b, doc1, doc2, q)
    head = len(sys_) + len(hdr_b)

    alone = Engine(rope)
    alone.serve(a_ids, a_anchors, seed=1)
    b = alone.request(b_ids, b_anchors)
    assert alone.admit(b) == 0  # the header's new tokens come first: nothing placed
    assert b.prefix_len == len(sys_)  # SGLang's exact prefix; the documents are computed
    assert getattr(b, REQ_COUNTS_ATTR, None) is None

    eng = Engine(rope)
    _, a_row = eng.serve(a_ids, a_anchors, seed=1)
    warm = eng.request(b_ids[:head], b_anchors[:2])  # the pre-warm: up to the first hit
    assert eng.admit(warm) == 0
    eng.prefill(warm, seed=2)
    eng.finish(warm)
    assert eng.exact_match(b_ids) == head  # stored exactly: nothing in it was placed
    b = eng.request(b_ids, b_anchors)
    placed = eng.admit(b)
    assert b.prefix_len - placed == head and placed == len(doc1) + len(doc2)
    counts = getattr(b, REQ_COUNTS_ATTR)
    assert (counts.exact_prefix_tokens, counts.reused_tokens) == (head, placed)
    assert counts.recomputed_tokens == 0
    b_row = eng.prefill(b, seed=3)
    src = slice(len(sys_) + len(hdr_a), len(sys_) + len(hdr_a) + placed)  # the docs in A
    got_ckv, got_kpe = eng.read(b_row[head : head + placed])
    src_ckv, src_kpe = eng.read(a_row[src])
    assert torch.equal(got_ckv, src_ckv)
    shift = torch.arange(src.start, src.stop), torch.arange(head, head + placed)
    spec = plugin.rope_spec_from_sglang(rope)
    torch.testing.assert_close(got_kpe, delta_rotate(src_kpe, *shift, spec), rtol=0, atol=0)


@pytest.mark.parametrize("k", [0, 5])
def test_the_proxys_prewarm_cut_is_where_the_backend_places_a_run(rope, docs, k):
    """The proxy's --prewarm end point (proxy/pipeline.py prewarm_ends: the prompt chunked
    over its token IDs alone, as a chat request reaches the backend, against the earlier
    prompts chunked so), run against the backend with no anchors: the pre-warm up to that
    point, then the request, whose run of hits starts right after its exact prefix. With k,
    the pre-warm also computes the run's first k tokens (pic's carve-out, in their new left
    context), and the run is placed from there."""
    from irminsul.chunking.keys import Chunker
    from irminsul.chunking.runs import cuts
    from irminsul.proxy.pipeline import SeenChunks

    sys_, doc1, doc2, tail, hdr_a, q = docs
    (hdr_b,) = _segments(11, (23,))
    a_ids, b_ids = sys_ + hdr_a + doc1 + doc2 + tail, sys_ + hdr_b + doc1 + doc2 + q
    eng = Engine(rope)
    a = eng.request(a_ids)  # no anchors: what the chat endpoints hand the backend
    eng.admit(a)
    eng.prefill(a, seed=1)
    eng.finish(a)
    chunker = Chunker(eng.config.chunker)  # the backend's (both default to ChunkerConfig())
    seen = SeenChunks(1 << 20)
    seen.observe(np.asarray(a_ids), chunker.split(a_ids))
    b_chunks = chunker.split(b_ids)
    (cut,) = cuts(b_chunks, seen.observe(np.asarray(b_ids), b_chunks), limit=2, min_tokens=64,
                  k=k)
    docs_at = len(sys_) + len(hdr_b)
    assert docs_at + k <= cut < docs_at + len(doc1)
    eng.serve(b_ids[:cut], seed=2)
    b = eng.request(b_ids)
    placed = eng.admit(b)
    assert b.prefix_len - placed == cut  # the pre-warm is b's exact prefix now
    assert placed >= docs_at + len(doc1) + len(doc2) - cut - 64  # the documents' chunks
    counts = getattr(b, REQ_COUNTS_ATTR)
    assert (counts.exact_prefix_tokens, counts.reused_tokens) == (cut, placed)


def test_bfloat16_pool_places_within_one_rounding(rope, docs):
    sys_, doc1, doc2, tail, _gap, q = docs
    eng = Engine(rope, dtype=torch.bfloat16)
    a_ids, a_anchors = _with_anchors(sys_, doc1, doc2, tail)
    a, a_row = eng.serve(a_ids, a_anchors, seed=3)
    b_ids, b_anchors = _with_anchors(doc1, q)
    b = eng.request(b_ids, b_anchors)
    assert eng.admit(b) == len(doc1)
    b_row = eng.prefill(b, seed=4)
    got_ckv, got_kpe = eng.read(b_row[: len(doc1)])
    src = slice(len(sys_), len(sys_) + len(doc1))
    src_ckv, _ = eng.read(a_row[src])
    assert torch.equal(got_ckv, src_ckv)
    a_raw = eng.raw[a.rid][1]
    for layer in range(LAYERS):
        fresh = _fresh_kpe(rope, a_raw[layer, src], torch.arange(len(doc1)))
        torch.testing.assert_close(got_kpe[layer], fresh.bfloat16().float(), rtol=2e-2, atol=2e-2)
    eng.finish(b)


def test_eviction_stays_sglangs(rope, docs):
    sys_, doc1, doc2, tail, _gap, q = docs
    eng = Engine(rope)
    a_ids, a_anchors = _with_anchors(sys_, doc1, doc2, tail)
    eng.serve(a_ids, a_anchors, seed=5)
    eng.cache.evict(EvictParams(num_tokens=SLOTS))  # SGLang evicts A's nodes
    assert eng.exact_match(a_ids) == 0
    b = eng.request(*_with_anchors(doc2, q))
    assert eng.admit(b) == 0  # the index only pointed at A's slots: stale, forgotten
    assert eng.cache._index.stats().chunks == 0


def test_prefix_policy_is_sglangs_radix_cache(rope, docs):
    sys_, doc1, doc2, tail, _gap, q = docs
    eng = Engine(rope, policy="prefix")
    a_ids, a_anchors = _with_anchors(sys_, doc1, doc2, tail)
    eng.serve(a_ids, a_anchors, seed=6)
    b = eng.request(*_with_anchors(sys_, doc2, q))
    assert eng.admit(b) == 0 and b.prefix_len == len(sys_)
    assert not b.skip_radix_cache_insert


def test_plugin_registers_backend_once_and_refuses_other_versions():
    plugin.register()
    plugin.register()  # every SGLang process loads plugins; a second call is harmless
    assert registry.get_radix_cache_factory("irminsul") is plugin.build_cache
    with pytest.raises(plugin.IncompatibleSGLang, match=r"sglang==0\.5\.23 only.*0\.5\.24"):
        plugin.check_version("0.5.24")


class _TinyMLA(torch.nn.Module):
    """Stands for the model runner's model: one attention module shaped like SGLang's
    DeepseekV2AttentionMLA where the factory looks (kv_lora_rank + rotary_emb)."""

    def __init__(self, rope):
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.kv_lora_rank = RANK
        self.attn.rotary_emb = rope


def _build_ctx(rope, backend, **flags):
    from types import SimpleNamespace

    set_global_server_args_for_scheduler(
        ServerArgs(model_path="dummy", page_size=1, radix_cache_backend=backend))
    pool = MLATokenToKVPool(SLOTS, 1, torch.bfloat16, RANK, ROPE, LAYERS, "cpu", False)
    params = CacheInitParams(
        disable=False,
        req_to_token_pool=ReqToTokenPool(size=4, max_context_len=256, device="cpu",
                                         enable_memory_saver=False),
        token_to_kv_pool_allocator=TokenToKVPoolAllocator(SLOTS, torch.bfloat16, "cpu", pool,
                                                          need_sort=False),
        page_size=1)
    worker = SimpleNamespace(model_runner=SimpleNamespace(model=_TinyMLA(rope)))
    args = {"is_hybrid_swa": False, "is_hybrid_ssm": False, "enable_hierarchical_cache": False,
            "disable_radix_cache": False}
    args.update(flags)
    return registry.TreeCacheBuildContext(
        server_args=None, params=params, tp_worker=worker, model_config=None, tp_size=1,
        tp_rank=0, tp_group=None, **args)


def test_sglang_selects_the_backend_only_when_asked(rope):
    plugin.register()
    default = registry.create_tree_cache(_build_ctx(rope, None))
    assert type(default) is IrminsulRadixCache.__mro__[1]  # SGLang's UnifiedRadixCache
    ours = registry.create_tree_cache(_build_ctx(rope, "irminsul"))
    assert isinstance(ours, IrminsulRadixCache) and ours.reuse_enabled
    with pytest.raises(ValueError, match="enable-hierarchical-cache"):
        registry.create_tree_cache(_build_ctx(rope, "irminsul", enable_hierarchical_cache=True))


def test_meta_info_reports_reuse_apart_from_cached_tokens(rope, docs):
    from types import SimpleNamespace

    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer

    plugin.register()
    registry.create_tree_cache(_build_ctx(rope, "irminsul"))  # installs the report hook
    sys_, doc1, doc2, tail, _gap, q = docs
    eng = Engine(rope)
    a = eng.request(*_with_anchors(sys_, doc1, doc2, tail))
    eng.admit(a)
    eng.prefill(a, seed=8)
    assert SchedulerOutputStreamer.get_cached_tokens_details(SimpleNamespace(), a) is None  # untouched
    eng.finish(a)
    b = eng.request(*_with_anchors(doc2, q))
    placed = eng.admit(b)
    details = SchedulerOutputStreamer.get_cached_tokens_details(SimpleNamespace(), b)
    assert details["device"] == b.cached_tokens == 0  # SGLang's count: exact prefix only
    assert details["irminsul"]["reused_tokens"] == placed == len(doc2)
    assert details["irminsul"]["prompt_tokens"] == len(doc2) + len(q)


def test_paged_pool_places_whole_pages(rope):
    """Page size 4 (FlashMLA serves DeepSeek with 64): runs are cut to whole pages and a chunk
    whose end is not page aligned is still found."""
    sys_, doc1, doc2, tail, q = _segments(11, (40, 96, 96, 12, 12))
    eng = Engine(rope, page_size=4)
    a_ids, a_anchors = _with_anchors(sys_, doc1, doc2, tail)
    a, a_row = eng.serve(a_ids, a_anchors, seed=9)
    free_before = eng.alloc.available_size()
    b_ids, b_anchors = _with_anchors(doc2, q)  # whole pages, so the harness allocates simply
    b = eng.request(b_ids, b_anchors)
    placed = eng.admit(b)
    assert placed == len(doc2) and placed % 4 == 0
    b_row = eng.prefill(b, seed=10)
    assert (b_row[:placed] % 4 == torch.arange(placed) % 4).all()  # slots follow positions
    src = slice(len(sys_) + len(doc1), len(sys_) + len(doc1) + len(doc2))
    got_ckv, got_kpe = eng.read(b_row[:placed])
    src_ckv, _ = eng.read(a_row[src])
    assert torch.equal(got_ckv, src_ckv)
    a_raw = eng.raw[a.rid][1]
    for layer in range(LAYERS):
        fresh = _fresh_kpe(rope, a_raw[layer, src], torch.arange(placed))
        torch.testing.assert_close(got_kpe[layer], fresh, rtol=1e-5, atol=2e-5)
    eng.finish(b)
    # b's whole pages stay in the tree under the composed key (its exact prefix is empty)
    assert eng.alloc.available_size() == free_before - len(b_ids) // 4 * 4
    c = eng.request(b_ids + q)  # the next turn matches them, whole pages only
    assert eng.admit(c) == len(b_ids) // 4 * 4
    eng.prefill(c, seed=11)
    eng.finish(c)
    eng.cache.evict(EvictParams(num_tokens=SLOTS))
    assert eng.alloc.available_size() == eng.total


def test_tenants_and_extra_keys_never_share_content(rope, docs):
    sys_, doc1, doc2, tail, _gap, q = docs
    eng = Engine(rope)
    eng.serve(*_with_anchors(sys_, doc1, doc2, tail), namespace="tenant-a", seed=12)
    ids, anchors = _with_anchors(doc2, q)
    assert eng.admit(eng.request(ids, anchors, namespace="tenant-b")) == 0
    assert eng.admit(eng.request(ids, anchors, namespace="tenant-a", extra_key="lora-x")) == 0
    assert eng.admit(eng.request(ids, anchors, namespace="tenant-a")) == len(doc2)


def test_selecting_the_backend_on_another_sglang_is_refused(rope, monkeypatch):
    import sglang

    plugin.register()
    monkeypatch.setattr(sglang, "__version__", "0.5.24")
    with pytest.raises(plugin.IncompatibleSGLang, match="0.5.24"):
        registry.create_tree_cache(_build_ctx(rope, "irminsul"))


def _conversation(eng: Engine, docs):
    """Turn 1 (exact: sys, doc1, doc2, tail), turn 2 (sys, doc2, gap, doc1, q: doc2 placed,
    the rest computed, doc1 behind the hole). Returns (turn-2 ids, its row, exact length)."""
    sys_, doc1, doc2, tail, gap, q = docs
    eng.serve(*_with_anchors(sys_, doc1, doc2, tail), seed=20)
    b_ids, b_anchors = _with_anchors(sys_, doc2, gap, doc1, q)
    b = eng.request(b_ids, b_anchors)
    assert eng.admit(b) == len(doc2)
    b_row = eng.prefill(b, seed=21)
    eng.finish(b)
    return b, b_ids, b_row, len(sys_)


def test_next_turn_extends_the_composed_prompt_without_recompute(rope, docs):
    sys_, doc1, doc2, _tail, _gap, _q = docs
    eng = Engine(rope)
    b, b_ids, b_row, exact = _conversation(eng, docs)
    answer, q2 = _segments(99, (30, 12))
    c_ids = b_ids + answer + q2  # turn 3 repeats turn 2's prompt and appends to it
    c = eng.request(c_ids)
    served = eng.admit(c)
    assert served == len(b_ids) - exact  # all of turn 2 past the exact prefix: doc1 too
    assert c.prefix_len == len(b_ids)
    counts = getattr(c, REQ_COUNTS_ATTR)
    assert counts.exact_prefix_tokens == exact
    assert counts.reused_tokens == served
    assert counts.recomputed_tokens == 0  # no hole left: only the new tokens are computed
    assert counts.new_tokens == len(answer) + len(q2)
    assert c.already_computed == served  # SGLang's cached_tokens stays the exact prefix
    assert c.kv.cache_protected_len == len(b_ids)  # composed slots are the tree's, not c's
    c_row = eng.prefill(c, seed=22)
    assert torch.equal(c_row[: len(b_ids)], b_row)  # turn 2's slots, shared through the tree
    # ... holding what turn 2 left there: doc2 as placed from turn 1, the rest as computed
    b_ckv = eng.raw[b.rid][0]
    placed_end = exact + len(doc2)
    got_ckv, _ = eng.read(c_row[placed_end : len(b_ids)])
    assert torch.equal(got_ckv, b_ckv[:, placed_end : len(b_ids)])
    a_ckv = eng.raw["r1"][0]
    got_ckv, _ = eng.read(c_row[exact:placed_end])
    doc2_in_a = slice(len(sys_) + len(doc1), len(sys_) + len(doc1) + len(doc2))
    assert torch.equal(got_ckv, a_ckv[:, doc2_in_a])

    free_before = eng.alloc.available_size()
    eng.finish(c)
    assert eng.exact_match(c_ids) == exact  # still no exact key past the exact prefix
    # c's new tokens joined the composed tree; nothing of c's is left unowned
    assert eng.alloc.available_size() == free_before
    d = eng.request(c_ids + _segments(5, (8,))[0])
    assert eng.admit(d) == len(c_ids) - exact  # turn 4 gets turn 3's composed prompt
    eng.prefill(d, seed=25)
    eng.finish(d)


def test_composed_entries_match_only_their_own_tokens_and_scope(rope, docs):
    eng = Engine(rope)
    _b, b_ids, _row, exact = _conversation(eng, docs)
    ext = _segments(98, (20,))[0]
    # a plain request with the same tokens never sees composed KV as exact
    assert eng.exact_match(b_ids + ext) == exact
    # other tenant, other SGLang namespace: nothing composed (their exact prefix is 0)
    assert eng.admit(eng.request(b_ids + ext, namespace="tenant-b")) == 0
    assert eng.admit(eng.request(b_ids + ext, extra_key="lora-x")) == 0
    # same tokens after a different exact prefix: the key derives from that prefix
    other = eng.request(_segments(97, (40,))[0] + b_ids[exact:] + ext)
    eng.admit(other)
    assert other.prefix_len == 0
    # token IDs are compared: a change right after the exact prefix ends the composed match
    changed = list(b_ids)
    changed[exact + 5] ^= 1
    e = eng.request(changed + ext)
    served = eng.admit(e)
    assert served == 5  # the five composed tokens before the change, nothing past it
    assert getattr(e, REQ_COUNTS_ATTR).reused_tokens == 5
    # a client naming an irminsul~ extra_key gets no composition at all
    assert eng.admit(eng.request(b_ids + ext, extra_key="irminsul~x")) == 0


def test_composed_entries_are_evicted_by_sglang_and_locked_while_in_use(rope, docs):
    eng = Engine(rope)
    _b, b_ids, _row, exact = _conversation(eng, docs)
    ext = _segments(96, (20,))[0]
    c = eng.request(b_ids + ext)
    served = eng.admit(c)
    assert served == len(b_ids) - exact
    eng.prefill(c, seed=23)
    eng.cache.evict(EvictParams(num_tokens=SLOTS))  # c holds locks on both paths
    assert eng.exact_match(b_ids) == exact
    held = eng.request(b_ids + ext + [7])
    assert eng.admit(held) == len(b_ids) - exact  # the locked composed path survived
    eng.prefill(held, seed=24)
    eng.finish(held)
    eng.finish(c)
    eng.cache.evict(EvictParams(num_tokens=SLOTS))
    assert eng.alloc.available_size() == eng.total  # composed nodes freed like any other
    again = eng.request(b_ids + ext)
    assert eng.admit(again) == 0  # nothing composed (or exact) is left
    assert getattr(again, REQ_COUNTS_ATTR, None) is None


def test_composed_checkpoints_mid_prefill_and_dedups_twins(rope, docs):
    """A chunked prefill publishes its composed tokens at each checkpoint; two requests
    composing the same prompt at once end with one copy in the tree (SGLang's insert frees
    the second one's duplicates and the row is repointed), and no slot leaks."""
    from sglang.srt.mem_cache.common import checkpoint_kv_cache

    sys_, doc1, doc2, tail, gap, q = docs
    eng = Engine(rope)
    a_ids, a_anchors = _with_anchors(sys_, doc1, doc2, tail)
    eng.serve(a_ids, a_anchors, seed=30)
    b_ids, b_anchors = _with_anchors(sys_, doc2, gap, doc1, q)
    twins = [eng.request(b_ids, b_anchors) for _ in range(2)]
    rows = []
    for seed, req in enumerate(twins):
        assert eng.admit(req) == len(doc2)
        rows.append(eng.prefill(req, seed=31 + seed))
    exact, half = len(sys_), len(b_ids) // 2
    first = twins[0]
    first.extend_end = half  # as if the first chunk of a chunked prefill ended here
    checkpoint_kv_cache(first, eng.cache)
    assert first.kv.cache_protected_len == half
    assert eng.exact_match(b_ids) == exact
    eng.finish(first)
    eng.finish(twins[1])
    held = len(a_ids) + len(b_ids) - exact  # a exactly, one composed copy of b's tail
    assert eng.alloc.available_size() == eng.total - held
    c = eng.request(b_ids + q)
    assert eng.admit(c) == len(b_ids) - exact
    c_row = eng.prefill(c, seed=40)
    assert torch.equal(c_row[: len(b_ids)], rows[0])  # the first twin's copy won
    eng.finish(c)
    eng.cache.evict(EvictParams(num_tokens=SLOTS))
    assert eng.alloc.available_size() == eng.total
