"""Prefill compute of a DeepSeek-V2-family model, and what skipping part of it saves.

Counting convention (one multiply-add = 2 FLOPs; norms, activations, RoPE, softmax and the
δ-rotation of reused k_pe are ignored: together well under 0.1% of a layer's matmuls).

Per layer ``l`` and per token, the weights a token multiplies by (its *active* parameters):

- MLA attention: ``q`` projection (``hidden*H*dqk`` without q-LoRA, or
  ``hidden*q_lora + q_lora*H*dqk`` with it), ``kv_a`` (``hidden*(kv_lora + d_rope)``),
  ``kv_b`` (``kv_lora*H*(d_nope + dv)``) and ``o`` (``H*dv*hidden``), where
  ``dqk = d_nope + d_rope``.
- MLP: a dense layer (``l < first_k_dense_replace``, or ``l % moe_layer_freq != 0``, or no
  routed experts) has ``3*hidden*intermediate_size``; an MoE layer has the router
  (``hidden*n_routed_experts``) plus ``(num_experts_per_tok + n_shared_experts)`` experts of
  ``3*hidden*moe_intermediate_size`` each.

``A`` is their sum over layers. The embedding table is a lookup (0 FLOPs); the LM head
(``hidden*vocab``) runs only on the positions whose logits are wanted, one in serving.

Prefilling ``T`` tokens at positions ``[C, C+T)`` after ``C`` cached tokens costs::

    F(T, C) = 2*A*T + 2*hidden*vocab*logits_tokens
              + 2*layers*H*(dqk + dv) * (T*C + T*(T+1)/2)

The last term is attention in MLA's non-absorbed form (the one used for prefill): for each key
a query attends to, ``q.k`` over ``dqk`` dims and ``p*v`` over ``dv`` dims, per head and layer;
with a causal mask the query at position ``p`` attends to ``p+1`` keys, and
``sum_{p=C}^{C+T-1} (p+1) = T*C + T*(T+1)/2``.

Energy is ``flops / flops_per_joule``. The default, 400 TFLOP/s sustained by an H100 SXM in
bf16 (about 40% of its dense peak) at its 700 W board power, gives 5.7e11 FLOP/J.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from irminsul.engine_adapter.contract import ReuseCounts

DEFAULT_FLOPS_PER_JOULE = 400e12 / 700.0


@dataclass(frozen=True)
class ModelDims:
    """The shape numbers of a DeepSeek-V2-family model that its compute depends on."""

    hidden: int
    layers: int
    heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    intermediate_size: int
    vocab: int
    n_routed_experts: int | None = None
    num_experts_per_tok: int = 0
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    tie_word_embeddings: bool = False

    def __post_init__(self):
        for name in ("hidden", "layers", "heads", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "vocab", "moe_layer_freq"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"q_lora_rank must be positive or None, got {self.q_lora_rank}")
        if self.n_routed_experts:
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise ValueError("num_experts_per_tok must be in [1, n_routed_experts]")
            if self.moe_intermediate_size <= 0:
                raise ValueError("moe_intermediate_size must be positive for an MoE model")
        if self.first_k_dense_replace < 0 or self.n_shared_experts < 0:
            raise ValueError("first_k_dense_replace and n_shared_experts must be >= 0")
        if self.intermediate_size <= 0 and self.dense_layers:
            raise ValueError("intermediate_size must be positive when a layer is dense")

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelDims:
        """From a Hugging Face ``config.json`` dict (DeepSeek-V2/V3, Kimi K2, Moonlight)."""
        try:
            return cls(
                hidden=int(cfg["hidden_size"]),
                layers=int(cfg["num_hidden_layers"]),
                heads=int(cfg["num_attention_heads"]),
                q_lora_rank=None if cfg.get("q_lora_rank") is None else int(cfg["q_lora_rank"]),
                kv_lora_rank=int(cfg["kv_lora_rank"]),
                qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
                qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
                v_head_dim=int(cfg["v_head_dim"]),
                intermediate_size=int(cfg.get("intermediate_size") or 0),
                vocab=int(cfg["vocab_size"]),
                n_routed_experts=cfg.get("n_routed_experts") or None,
                num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
                n_shared_experts=int(cfg.get("n_shared_experts") or 0),
                moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
                first_k_dense_replace=int(cfg.get("first_k_dense_replace") or 0),
                moe_layer_freq=int(cfg.get("moe_layer_freq") or 1),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise ValueError(
                f"model config lacks {e.args[0]!r}: not a DeepSeek-V2-family config"
            ) from e

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        """The rule of DeepSeek's modeling code for which layers route to experts."""
        return (
            bool(self.n_routed_experts)
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.layers))

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers


class ParamCounts(NamedTuple):
    """Parameter counts. ``per_token`` is A in the module formula."""

    attention: int  # all layers' MLA projections
    mlp_active: int  # dense MLPs + routers + the experts one token goes through
    lm_head: int
    embedding: int
    total: int  # every weight of the checkpoint (norms included, MTP layers not)

    @property
    def per_token(self) -> int:
        """Weights every prompt token multiplies by (attention + active MLP)."""
        return self.attention + self.mlp_active

    @property
    def activated(self) -> int:
        """Per-token weights plus the LM head: the "activated parameters" models are quoted by."""
        return self.per_token + self.lm_head


def param_counts(dims: ModelDims) -> ParamCounts:
    """Count the parameters of ``dims``' model; see the module docstring for what is counted."""
    d, h = dims.hidden, dims.heads
    if dims.q_lora_rank is None:
        q = d * h * dims.qk_head_dim
        q_norm = 0
    else:
        q = d * dims.q_lora_rank + dims.q_lora_rank * h * dims.qk_head_dim
        q_norm = dims.q_lora_rank
    kv = d * (dims.kv_lora_rank + dims.qk_rope_head_dim)
    kv += dims.kv_lora_rank * h * (dims.qk_nope_head_dim + dims.v_head_dim)
    o = h * dims.v_head_dim * d
    attention_layer = q + kv + o
    dense_mlp = 3 * d * dims.intermediate_size
    expert = 3 * d * dims.moe_intermediate_size
    router = d * (dims.n_routed_experts or 0)
    moe_active = router + (dims.num_experts_per_tok + dims.n_shared_experts) * expert
    moe_all = router + ((dims.n_routed_experts or 0) + dims.n_shared_experts) * expert
    norms_layer = 2 * d + dims.kv_lora_rank + q_norm
    embedding = dims.vocab * d
    lm_head = dims.vocab * d
    total = (
        dims.layers * (attention_layer + norms_layer)
        + dims.dense_layers * dense_mlp
        + dims.moe_layers * moe_all
        + embedding
        + (0 if dims.tie_word_embeddings else lm_head)
        + d  # final norm
    )
    return ParamCounts(
        attention=dims.layers * attention_layer,
        mlp_active=dims.dense_layers * dense_mlp + dims.moe_layers * moe_active,
        lm_head=lm_head,
        embedding=embedding,
        total=total,
    )


def attention_flops(dims: ModelDims, tokens: int, context: int = 0) -> float:
    """The attention term of F(T, C): causal, non-absorbed MLA (module docstring)."""
    _check_tokens(tokens, context)
    keys = tokens * context + tokens * (tokens + 1) / 2
    return 2.0 * dims.layers * dims.heads * (dims.qk_head_dim + dims.v_head_dim) * keys


def prefill_flops(
    hf_config: dict[str, Any] | ModelDims, tokens: int, context: int = 0, *, logits_tokens: int = 1
) -> float:
    """F(T, C): FLOPs to prefill ``tokens`` new tokens after ``context`` cached ones.

    ``logits_tokens`` is how many positions go through the LM head (1 in a serving prefill;
    0 to leave the head out, ``tokens`` for a training-style forward).
    """
    dims = hf_config if isinstance(hf_config, ModelDims) else ModelDims.from_hf_config(hf_config)
    if not 0 <= logits_tokens <= max(tokens, 1):
        raise ValueError(f"logits_tokens must be in [0, tokens], got {logits_tokens}")
    counts = param_counts(dims)
    linear = 2.0 * counts.per_token * tokens + 2.0 * counts.lm_head * logits_tokens
    return linear + attention_flops(dims, tokens, context)


def energy_joules(flops: float, flops_per_joule: float = DEFAULT_FLOPS_PER_JOULE) -> float:
    """Energy to run ``flops`` at ``flops_per_joule`` (default: H100 bf16, module docstring)."""
    if flops_per_joule <= 0:
        raise ValueError(f"flops_per_joule must be positive, got {flops_per_joule}")
    return flops / flops_per_joule


class Savings(NamedTuple):
    flops: float
    joules: float


def reuse_savings(
    hf_config: dict[str, Any] | ModelDims,
    counts: ReuseCounts,
    flops_per_joule: float = DEFAULT_FLOPS_PER_JOULE,
) -> Savings:
    """Compute skipped thanks to the cache for one request: a lower bound.

    Saved = F(P, 0) - F(K, P - K), with P the prompt and K = recomputed + new the tokens that
    were computed. That places the computed tokens last, where their attention is the most
    expensive, so the attention saving is never overstated (reused chunks in the middle of a
    prompt save more than this counts). Both sides compute one position's logits, which cancel.
    """
    dims = hf_config if isinstance(hf_config, ModelDims) else ModelDims.from_hf_config(hf_config)
    computed = counts.recomputed_tokens + counts.new_tokens
    prompt = counts.prompt_tokens
    if prompt == 0:
        return Savings(0.0, 0.0)
    full = prefill_flops(dims, prompt, 0)
    done = prefill_flops(dims, computed, prompt - computed, logits_tokens=min(1, computed))
    if computed == 0:
        done += 2.0 * param_counts(dims).lm_head  # the last position's logits are still needed
    saved = full - done
    return Savings(saved, energy_joules(saved, flops_per_joule))


def _check_tokens(tokens: int, context: int) -> None:
    if tokens < 0 or context < 0:
        raise ValueError(f"tokens and context must be >= 0, got {tokens}, {context}")
