"""Configuration of the embedded engine (checked on construction)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...chunking.config import ChunkerConfig

DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "bfloat16", "float32")
POLICIES = ("full", "prefix", "pic", "blend", "clip")
ATTENTION = ("sdpa", "eager")
PLACEMENTS = ("auto", "torch", "triton")
PREFILL_ATTENTION = ("auto", "dense", "absorbed", "flex")
CUDA_GRAPHS = ("auto", "on", "off")


@dataclass(frozen=True)
class EngineConfig:
    """What the engine loads and how it reuses KV.

    ``cache_bytes`` bounds the chunk KV store (latent KV of all layers; ~9 KiB per token for
    the tiny model in float32, ~31 KiB for DeepSeek-V2-Lite in bfloat16). ``pic_k`` and
    ``blend_r`` are the defaults of the pic and blend policies; requests may override them.
    ``prefill_block`` caps the query tokens run together (bounds the attention mask memory).

    ``self_check`` runs guard.py at start: δ-rotation against the model's RoPE (relative error
    <= ``check_rope_tol``) and one probe prompt with ``policy`` against ``full`` (first-token
    KL <= ``check_max_kl`` nats, greedy agreement over ``check_tokens`` tokens >=
    ``check_min_agreement``); on failure the engine serves ``prefix`` only. The default
    thresholds only catch gross breakage (random-weight test models pass them). The five
    thresholds (``check_max_kl``, ``check_min_agreement``, ``check_tokens``, ``audit_max_kl``,
    ``audit_min_agreement``) default to None: the model's own gate, ``<model_dir>/irminsul.json``
    (gate.py), else the built-in values; a value given here wins over the file.

    ``clip`` (clip.py, CacheClip) needs an auxiliary model sharing the tokenizer:
    ``clip_model_dir``, else ``<model_dir>/aux`` when that folder exists (``clip_dir``); the
    engine loads it whenever there is one and refuses to start with policy clip without one.
    ``clip_r`` is the clip default of r; ``clip_queries`` final prompt positions score the
    tokens; the recomputed tokens come in windows of ``clip_window`` neighbours. On the CPU
    (``clip_device``) the auxiliary forward overlaps a GPU engine's prefill; on cuda it runs
    before it, on the GPU (bench/clip_aux.py measures both).

    ``audit_rate`` (audit.py): the share of served requests with reused KV that are re-run with
    ``full`` while the engine is idle (1.0: every one; ``audit_seed`` seeds the draw). Each
    audit's KL and greedy agreement (up to 32 tokens) go to the savings database
    ``audit_db`` (None: not recorded); once the mean of the last ``audit_window`` audits has
    KL above ``audit_max_kl`` or agreement below ``audit_min_agreement``, the engine serves
    ``prefix`` only until restarted. Their thresholds come from the gate too.
    """

    model_dir: str
    device: str = "auto"  # auto|cuda|cpu
    dtype: str = "auto"  # auto (bfloat16 on cuda, float32 on cpu)|bfloat16|float32
    cache_bytes: int = 1 << 30
    policy: str = "pic"  # full|prefix|pic|blend|clip
    pic_k: int = 16
    blend_r: float = 0.10
    clip_r: float = 0.10
    clip_model_dir: str | None = None  # None: <model_dir>/aux if that folder exists
    clip_queries: int = 16
    clip_window: int = 8
    clip_device: str = "cpu"  # where the auxiliary model runs: cpu (CacheClip's)|cuda
    max_seq_len: int = 32768
    chunker: ChunkerConfig = field(default_factory=ChunkerConfig)
    attn_implementation: str = "sdpa"  # the library's attention: sdpa|eager
    prefill_block: int = 4096
    # How reused KV is placed: auto (the fused Triton kernel on CUDA when Triton is
    # importable, else torch)|torch|triton; and how query blocks attend over the slot
    # buffer: auto (absorbed MLA for blocks of at most absorbed_max_queries queries, dense
    # above)|dense (the library's attention, additive 4-D mask)|absorbed (always)|flex
    # (FlexAttention with a block mask). See model_runner.py and absorbed.py.
    placement: str = "auto"
    prefill_attention: str = "auto"
    absorbed_max_queries: int = 512
    # Blocks in the absorbed form (pic's recomputed tokens, decode steps) replayed as CUDA
    # graphs over an arena of max_seq_len slots (graphs.py): auto (on CUDA)|on|off. "on" on
    # a CPU runs the same padded blocks eagerly: the tests' check of that logic.
    cuda_graphs: str = "auto"
    # The absorbed form's attention: auto (the fused Triton kernel on CUDA)|torch|triton.
    attention_kernel: str = "auto"
    self_check: bool = True
    check_rope_tol: float = 1e-5
    # None: the model's irminsul.json, else gate.BUILTIN (1.0, 0.0, 4; audits 1.0, 0.0).
    check_max_kl: float | None = None
    check_min_agreement: float | None = None
    check_tokens: int | None = None
    audit_rate: float = 0.0
    audit_seed: int | None = None
    audit_window: int = 8
    audit_max_kl: float | None = None
    audit_min_agreement: float | None = None
    audit_db: str | None = None
    # Keep a prompt's composed KV after its first reused token in the prefix trie as an
    # approximate tail (store.py): a next turn repeating the prompt places it as it is,
    # counted as reused, with no new carve-outs (content policies only).
    approx_trie: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model_dir, str) or not self.model_dir:
            raise ValueError("model_dir must be a non-empty path string")
        for name, allowed in (("device", DEVICES), ("dtype", DTYPES), ("policy", POLICIES),
                              ("attn_implementation", ATTENTION), ("placement", PLACEMENTS),
                              ("prefill_attention", PREFILL_ATTENTION),
                              ("cuda_graphs", CUDA_GRAPHS),
                              ("attention_kernel", PLACEMENTS),
                              ("clip_device", ("cpu", "cuda"))):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        for name, low in (("cache_bytes", 0), ("pic_k", 0), ("max_seq_len", 1),
                          ("absorbed_max_queries", 0),
                          ("prefill_block", 1), ("check_tokens", 1), ("audit_window", 1),
                          ("clip_queries", 1), ("clip_window", 1)):
            value = getattr(self, name)
            if name == "check_tokens" and value is None:  # the model's gate decides
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        r = self.blend_r
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise ValueError(f"blend_r must be a number in [0, 1], got {r!r}")
        r = self.clip_r
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise ValueError(f"clip_r must be a number in [0, 1], got {r!r}")
        if self.clip_model_dir is not None and (not isinstance(self.clip_model_dir, str)
                                                or not self.clip_model_dir):
            raise ValueError(f"clip_model_dir must be a path string or None, "
                             f"got {self.clip_model_dir!r}")
        if not isinstance(self.self_check, bool):
            raise TypeError(f"self_check must be a bool, got {self.self_check!r}")
        if not isinstance(self.approx_trie, bool):
            raise TypeError(f"approx_trie must be a bool, got {self.approx_trie!r}")
        for name in ("check_rope_tol", "check_max_kl", "check_min_agreement", "audit_max_kl",
                     "audit_min_agreement", "audit_rate"):
            v = getattr(self, name)
            if v is None and name not in ("check_rope_tol", "audit_rate"):
                continue  # the model's gate decides
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        for name in ("check_min_agreement", "audit_min_agreement", "audit_rate"):
            if getattr(self, name) is not None and getattr(self, name) > 1:
                raise ValueError(f"{name} must be <= 1, got {getattr(self, name)}")
        if self.audit_seed is not None and (isinstance(self.audit_seed, bool)
                                            or not isinstance(self.audit_seed, int)):
            raise ValueError(f"audit_seed must be an integer or None, got {self.audit_seed!r}")
        if self.audit_db is not None and (not isinstance(self.audit_db, str)
                                          or not self.audit_db):
            raise ValueError(f"audit_db must be a path string or None, got {self.audit_db!r}")
        if isinstance(self.chunker, dict):
            object.__setattr__(self, "chunker", ChunkerConfig.from_json(self.chunker))
        if not isinstance(self.chunker, ChunkerConfig):
            raise TypeError(f"chunker must be a ChunkerConfig, got {type(self.chunker).__name__}")

    @property
    def clip_dir(self) -> Path | None:
        """The auxiliary model of the clip policy: ``clip_model_dir`` as given (it need not
        exist: the engine then refuses to start), else ``<model_dir>/aux`` if it is a folder."""
        if self.clip_model_dir is not None:
            return Path(self.clip_model_dir)
        aux = Path(self.model_dir) / "aux"
        return aux if aux.is_dir() else None
