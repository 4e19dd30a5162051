"""Drives transformers' DeepSeek-V2/V3 modules over a position-slotted latent KV buffer.

The library's attention computes k_nope = kv_a_layernorm(c_KV) and the RoPE'd k_pe for the
tokens it is given and hands them to ``past_key_values.update(k_nope, k_pe, layer_idx)``,
using whatever comes back as the keys/values to attend over. Our cache object scatters the
new tokens into a per-request buffer indexed by position and returns the whole buffer, and an
explicit additive mask lets the query at position p see slots <= p. So any subset of the
prompt can be computed while the other slots hold KV placed from the store, and the maths
(projections, RoPE, attention, MoE) stay the library's own.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch

from ...kernels.mla_attention import splits_for
from ...kernels.rope import RopeSpec, apply_rope
from . import absorbed, attention, graphs

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


def cache_kwarg(module_class) -> str:
    """The name the library's modules take their cache by: ``past_key_values`` in
    transformers 5.17 (and up to 5.24 at least), ``cache`` in 5.25, where the old name is
    renamed with a warning on the decoder layer and model, and the attention sees only the
    new one."""
    return "cache" if "cache" in inspect.signature(module_class.forward).parameters \
        else "past_key_values"


# Which form of the absorbed attention is faster for a block: one layer's cost in ms,
# measured on an H100 with DeepSeek-V2-Lite's widths (16 heads, rank 512) by
# bench/mla_attention_bench.py (bench/results/2026-11-24-h100-mla_attention-split.txt; the
# bench prints this model's prediction beside each measurement, and the H200 run beside it
# shows the same picks but two near-ties). The torch form costs the same per (query, visible
# slot) pair wherever the queries sit. The fused kernel walks, per query, only the slots up
# to its position, but one program walks a run of them in sequence: its time is the longest
# run (a query's slots divided among ``splits`` programs) or the pairs walked over the whole
# GPU, whichever binds; more than one split adds the partial buffers and a combine pass,
# ~0.15 ms of launches whatever the sizes, which is why few queries over many slots (a
# decode step, a lone carve-out deep in the prompt) stay on the torch form.
TORCH_MS = (0.15, 3.8e-7)  # fixed, per pair
KERNEL_MS = (0.06, 4.5e-5, 3.0e-7)  # fixed, per slot of the longest run, per pair walked
COMBINE_MS = (0.15, 1.3e-5)  # fixed, per (split, query)


def attention_costs(positions: torch.Tensor, visible: int, heads: int, rank: int
                    ) -> tuple[float, float, int]:
    """(torch form ms, kernel ms, the kernel's splits) for one block's host positions."""
    reach = positions.clamp(max=visible - 1) + 1
    q, longest, pairs = positions.numel(), int(reach.max()), int(reach.sum())
    splits = splits_for(longest, q * heads, rank)
    run = -(-longest // splits)
    kernel = KERNEL_MS[0] + max(KERNEL_MS[1] * run, KERNEL_MS[2] * pairs)
    if splits > 1:
        kernel += COMBINE_MS[0] + COMBINE_MS[1] * splits * q
    return TORCH_MS[0] + TORCH_MS[1] * q * visible, kernel, splits


class KVBuffer:
    """One request's latent KV: c_kv [L, capacity, rank] and k_pe [L, capacity, rope_dim].

    Slot i holds the token at position i. ``length`` is how many leading slots are valid.
    ``keys``/``values`` memoise each layer's per-head expansion of the latents (the library's
    expand_kv), valid where ``expanded`` is set; a write to a slot's latents clears it. They
    cover the slots a request asked for (``wanted``), growing past it only when used: a buffer
    over the CUDA graphs' arena has room for the longest context, and a per-head memo that
    large (~9x the latents) does not fit beside it.
    """

    def __init__(self, c_kv: torch.Tensor, k_pe: torch.Tensor, arena=None,
                 wanted: int | None = None):
        self.c_kv, self.k_pe = c_kv, k_pe
        self.arena = arena  # the graphs.Graphs whose arena these tensors are, if any
        layers, capacity = c_kv.shape[:2]
        self.wanted = capacity if wanted is None else min(wanted, capacity)
        self.length = 0
        self.expanded = torch.zeros(layers, capacity, dtype=torch.bool, device=c_kv.device)
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers

    @classmethod
    def zeros(cls, layers: int, capacity: int, rank: int, rope_dim: int, dtype, device):
        return cls(torch.zeros(layers, capacity, rank, dtype=dtype, device=device),
                   torch.zeros(layers, capacity, rope_dim, dtype=dtype, device=device))

    @property
    def capacity(self) -> int:
        return self.c_kv.shape[1]

    def reserve(self, slots: int) -> None:
        """Grow (at least doubling, contents kept) so that ``slots`` slots fit."""
        old = self.capacity
        if slots <= old:
            return
        cap = max(slots, 2 * old)

        def grown(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = cap
            out = t.new_zeros(shape)
            out.narrow(dim, 0, old).copy_(t)
            return out

        self.c_kv, self.k_pe = grown(self.c_kv, 1), grown(self.k_pe, 1)
        self.arena = None  # moved out of it: graphs no longer apply
        self.expanded = grown(self.expanded, 1)
        self.wanted = max(self.wanted, slots)  # the memo grows when used (_MemoExpand)


class _SlotCache:
    """The ``past_key_values`` the library's attention sees for one block of query tokens."""

    def __init__(self, kv: KVBuffer, slots: torch.Tensor, visible: int):
        self.kv, self.slots, self.visible = kv, slots, visible

    def update(self, k_nope, k_pe, layer_idx, *args, **kwargs):
        """Write the block's new latents into their slots; return slots [0, visible)."""
        kv, t = self.kv, self.visible
        kv.c_kv[layer_idx].index_copy_(0, self.slots, k_nope[0, 0])
        kv.k_pe[layer_idx].index_copy_(0, self.slots, k_pe[0, 0])
        kv.expanded[layer_idx, self.slots] = False
        return kv.c_kv[layer_idx, :t][None, None], kv.k_pe[layer_idx, :t][None, None]


class _MemoExpand:
    """Stands in for one attention module's ``expand_kv``: the library's own expansion
    (kv_b_proj per head, k_pe broadcast) is run only for slots not expanded yet, and the
    per-request buffers are returned. A decode step then expands one token, not the context.
    """

    def __init__(self, runner: ModelRunner, attn):
        self.runner, self.attn, self.inner = runner, attn, attn.expand_kv

    def __call__(self, kv_nope: torch.Tensor, k_rot: torch.Tensor):
        kv = self.runner.active
        if kv is None:
            return self.inner(kv_nope, k_rot)
        layer, t = self.attn.layer_idx, kv_nope.shape[2]
        todo = torch.nonzero(~kv.expanded[layer, :t]).squeeze(1)
        if todo.numel():
            k, v = self.inner(kv_nope[:, :, todo], k_rot[:, :, todo])
            held = 0 if kv.keys[layer] is None else kv.keys[layer].shape[2]
            if held < t:  # first use, or slots past the memo: (re)allocate, keeping it
                size = min(kv.capacity, max(t, kv.wanted, 2 * held))
                for memo, new in ((kv.keys, k), (kv.values, v)):
                    grown = new.new_empty(1, new.shape[1], size, new.shape[-1])
                    if held:
                        grown[:, :, :held] = memo[layer]
                    memo[layer] = grown
            kv.keys[layer][:, :, todo] = k
            kv.values[layer][:, :, todo] = v
            kv.expanded[layer, todo] = True
        return kv.keys[layer][:, :, :t], kv.values[layer][:, :, :t]


class _Attention:
    """Stands in for one attention module's forward: the absorbed form (absorbed.py) while
    the runner runs a block it chose that form for, the library's own forward otherwise."""

    def __init__(self, runner: ModelRunner, attn):
        self.runner, self.attn, self.inner = runner, attn, attn.forward
        self.rope = absorbed.library_rope(attn)

    def __call__(self, *args, **kwargs):
        if not self.runner.absorbing:  # unchanged, whatever the library passes
            return self.inner(*args, **kwargs)
        # the decoder layers the runner drives pass these by name (V2 and V3 alike)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        r = self.runner
        positions = kwargs["position_ids"][0] if r.splits else None
        return absorbed.absorbed_attention(
            self.attn, hidden, kwargs.get("attention_mask"), kwargs.get(r.cache_kwarg),
            kwargs.get("position_embeddings"), self.rope, positions, r.splits), None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA GPU")
    return torch.device(device)


def resolve_placement(placement: str, device: torch.device, name: str = "placement") -> str:
    """auto: the fused Triton kernel on CUDA when Triton imports, else the torch path.
    "triton" on a CPU runs only under Triton's interpreter (TRITON_INTERPRET=1, for tests).
    The same rule picks the attention kernel (``name`` says which in errors)."""
    from ...kernels.materialize import triton_available

    if placement == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if placement == "triton":
        if not triton_available():
            raise ValueError(f"{name} 'triton' needs Triton installed (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{name} 'triton' on a CPU needs TRITON_INTERPRET=1")
    elif placement != "torch":
        raise ValueError(f"{name} must be auto, torch or triton, got {placement!r}")
    return placement


def resolve_graphs(mode: str, device: torch.device) -> str:
    """"capture" (CUDA graphs), "static" (the same padded blocks run eagerly) or "off"."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"cuda_graphs must be auto, on or off, got {mode!r}")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return "off"
    return "capture" if device.type == "cuda" else "static"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


class ModelRunner:
    """A loaded checkpoint plus the layer-by-layer forward over a :class:`KVBuffer`."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        prefill_block: int = 4096,
        placement: str = "auto",
        prefill_attention: str = "auto",
        absorbed_max_queries: int = 512,
        cuda_graphs: str = "off",
        max_slots: int = 32768,
        attention_kernel: str = "auto",
    ):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        cfg = AutoConfig.from_pretrained(model_dir)
        if cfg.model_type not in MODEL_TYPES:
            raise ValueError(
                f"{model_dir}: model_type {cfg.model_type!r} is not an MLA model this engine "
                f"runs (need one of {', '.join(MODEL_TYPES)})"
            )
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=self.dtype, attn_implementation=attn_implementation
        ).to(self.device)
        self.model.eval()
        self.config = self.model.config
        self.spec = RopeSpec.from_hf_config(self.config)
        self.layers = self.model.model.layers
        self.num_layers = len(self.layers)
        self.cache_kwarg = cache_kwarg(type(self.layers[0].self_attn))
        self.rank = self.config.kv_lora_rank
        self.rope_dim = self.config.qk_rope_head_dim
        self.vocab_size = self.config.vocab_size
        self.prefill_block = prefill_block
        self.attn_implementation = attn_implementation
        # Both may be switched between calls (benchmarks compare them in one process).
        self.placement = resolve_placement(placement, self.device)
        # How a block of queries attends: "dense", the library's attention over expanded K/V
        # with an additive mask; "absorbed" (absorbed.py), over the latents; "auto", absorbed
        # for blocks of at most absorbed_max_queries queries (pic's recomputed tokens, decode
        # steps), dense above; "flex", FlexAttention's block mask (opt-in: on an H100 it was no
        # faster than the dense mask for pic, and a 32K full prefill took 1.92 s with it
        # against 1.40 s dense: bench/results/2026-11-23-h100-gpu_ttft.txt, -v2lite-ttft.txt).
        self.prefill_attention = prefill_attention
        self.absorbed_max_queries = absorbed_max_queries
        # The absorbed form's attention itself: "triton", the fused kernel
        # (kernels/mla_attention_triton.py) for blocks where it pays (attention_costs); "torch",
        # float32 scores materialised (absorbed.attend). auto: triton on CUDA.
        self.attention_kernel = resolve_placement(attention_kernel, self.device,
                                                  "attention_kernel")
        self.active: KVBuffer | None = None  # the buffer run_layers is working on
        self.absorbing = False  # the block being run uses the absorbed form
        self.splits = 0  # ... and attends with the fused kernel over this many splits (0: no)
        self.can_absorb = all(absorbed.supports(layer.self_attn) for layer in self.layers)
        for layer in self.layers:
            layer.self_attn.expand_kv = _MemoExpand(self, layer.self_attn)
            if self.can_absorb:
                layer.self_attn.forward = _Attention(self, layer.self_attn)
        # Blocks in the absorbed form replayed as CUDA graphs (graphs.py): "auto" on CUDA,
        # "on" on a CPU runs the same padded static blocks eagerly (for tests). use_graphs
        # may be switched between calls (benchmarks compare both in one process).
        self.graphs: graphs.Graphs | None = None
        mode = resolve_graphs(cuda_graphs, self.device)
        if mode != "off" and self.can_absorb:
            self.graphs = graphs.Graphs(self, max_slots, capture=mode == "capture")
        self.use_graphs = self.graphs is not None

    def new_kv(self, capacity: int) -> KVBuffer:
        """A buffer for one request: the graphs' arena when it is free and large enough."""
        kv = None if self.graphs is None else self.graphs.lend(capacity)
        return kv if kv is not None else self.alloc_kv(capacity)

    def alloc_kv(self, capacity: int) -> KVBuffer:
        return KVBuffer.zeros(
            self.num_layers, capacity, self.rank, self.rope_dim, self.dtype, self.device
        )

    def kv_bytes_per_token(self) -> int:
        return self.num_layers * (self.rank + self.rope_dim) * torch.finfo(self.dtype).bits // 8

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [1, q, hidden] of ids [q]."""
        return self.model.model.embed_tokens(ids.to(self.device)[None])

    @torch.inference_mode()
    def run_layers(
        self, kv: KVBuffer, hidden: torch.Tensor, positions: torch.Tensor, first: int, last: int
    ) -> torch.Tensor:
        """Run decoder layers [first, last) for tokens at ``positions`` (sorted, [q]).

        Writes those tokens' latents into kv's slots of those layers; every other slot must
        already hold KV. Queries go in blocks of ``prefill_block``: a block sees the slots up
        to its last position, which all earlier blocks have filled. Returns hidden [1, q, h].
        """
        host = positions.cpu()  # block bounds without a device sync
        positions = positions.to(self.device)
        outs = []
        self.active = kv
        try:
            hidden = self._blocks(kv, hidden, positions, host, first, last, outs)
        finally:
            self.active = None
        kv.length = max(kv.length, int(host[-1]) + 1)
        return hidden

    def _blocks(self, kv, hidden, positions, host, first, last, outs):
        for b in range(0, positions.numel(), self.prefill_block):
            pos = positions[b : b + self.prefill_block]
            h = hidden[:, b : b + self.prefill_block]
            visible = int(host[min(b + self.prefill_block, host.numel()) - 1]) + 1
            self.absorbing = self.absorbs(pos.numel())
            self.splits = 0 if not self.absorbing else self.fused_splits(
                host[b : b + self.prefill_block], visible)
            try:
                out = None
                if self.absorbing and self.use_graphs:
                    out = self.graphs.run(kv, h, pos, visible, first, last)
                if out is None:
                    mask = self._mask(pos, visible)
                    out = self.layer_stack(h, pos, mask, _SlotCache(kv, pos, visible),
                                           first, last)
            finally:
                self.absorbing, self.splits = False, 0
            outs.append(out)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def layer_stack(self, h, pos, mask, cache, first: int, last: int) -> torch.Tensor:
        """Decoder layers [first, last) for queries h [1, q, hidden] at positions pos [q]."""
        pe = self.model.model.rotary_emb(h, pos[None])
        for layer in self.layers[first:last]:
            h = layer(h, attention_mask=mask, position_ids=pos[None], use_cache=True,
                      position_embeddings=pe, **{self.cache_kwarg: cache})
        return h

    def fused_splits(self, positions: torch.Tensor, visible: int) -> int:
        """For an absorbed block of queries at these host positions: 0, the torch form, or
        the fused kernel's splits, whichever attention_costs finds faster."""
        if self.attention_kernel != "triton":
            return 0
        torch_ms, kernel_ms, splits = attention_costs(
            positions, visible, self.config.num_attention_heads, self.rank)
        return splits if kernel_ms < torch_ms else 0

    def absorbs(self, queries: int) -> bool:
        """Whether a block of this many queries attends in the absorbed form."""
        if not self.can_absorb or self.prefill_attention in ("dense", "flex"):
            return False
        return self.prefill_attention == "absorbed" or queries <= self.absorbed_max_queries

    def _mask(self, pos: torch.Tensor, visible: int):
        """Query at position p sees slots <= p: an additive [1, 1, q, visible] mask (dense and
        absorbed), or a FlexAttention block mask (flex, attention.py)."""
        if pos.numel() == 1:
            return None  # one query, at visible - 1 (run_layers' blocks end there): sees all
        if self.prefill_attention == "flex" and not self.absorbing:
            attention.install(self.model, self.attn_implementation)
            return attention.position_block_mask(pos, visible)
        slots = torch.arange(visible, device=self.device)
        hidden = slots[None, :] > pos[:, None]
        mask = torch.zeros(hidden.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(hidden, torch.finfo(self.dtype).min)[None, None]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [q, vocab] of final-layer hidden states [1, q, h]."""
        return self.model.lm_head(self.model.model.norm(hidden))[0].float()

    @torch.inference_mode()
    def probe_kv(
        self, layer: int, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The latents (c_kv [q, rank], k_pe [q, rope_dim]) ``layer`` would write for these
        tokens given its input hidden states; writes nothing (CacheBlend's deviation probe)."""
        mod = self.layers[layer]
        attn = mod.self_attn
        x = attn.kv_a_proj_with_mqa(mod.input_layernorm(hidden))[0]
        c, k_pe = torch.split(x, [self.rank, self.rope_dim], dim=-1)
        return attn.kv_a_layernorm(c), apply_rope(k_pe, positions.to(self.device), self.spec)
