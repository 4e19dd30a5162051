"""The ``clip`` policy (CacheClip): a small auxiliary model picks the placed tokens to recompute.

The auxiliary model, a small causal LM sharing the main model's tokenizer, reads the whole new
prompt on the CPU. Its last layer's attention from the final ``queries`` prompt positions
(softmax weights, summed over heads and those queries) scores every token: what the end of the
prompt, where the answer starts, looks at. Among the tokens the plan places from the store,
the top r fraction by that score is recomputed, in windows of neighbouring tokens.

CacheClip's ideas as they apply here:

* Shared prefix instead of repeated sinks: the tokens before the first placed one (the exact
  prefix, a new header) are computed or bit-exact anyway and hold the prompt's attention sink;
  a stored chunk's KV was computed in its own earlier context, never as a stand-alone sequence
  with its own sink. So no budget goes to per-chunk starts (pic's carve-out), and the sink's
  large attention mass never competes with the candidates: only placed tokens are scored.
* Grouped (sliding-window) selection, :func:`select_windows`: the budget is spent on windows
  of ``window`` neighbouring placed tokens, the windows with the highest summed score first,
  so recomputed tokens come with their local context rather than as isolated tokens.
* CPU-GPU overlap: :meth:`AuxModel.start` runs the auxiliary forward on its own worker thread
  (torch on the CPU) when the main model is on a GPU, started before chunking and planning;
  the prefill places the stored KV and computes every token before the first placed one (they
  cannot depend on the choice) and waits for the scores only then (prefill.py). With the main
  model on the CPU the two would compete for the same cores, so the forward runs first.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

_ATTENTION = "irminsul_clip"  # the attention function the auxiliary model is loaded with


def select_windows(scores: np.ndarray, candidates: np.ndarray, count: int, window: int
                   ) -> np.ndarray:
    """``count`` of ``candidates`` (sorted positions) in windows of neighbouring candidates.

    A window is ``w`` consecutive candidates with consecutive positions (it never spans a token
    that is not a candidate); its score is the sum of its tokens' ``scores``. Greedily, windows
    of width ``w = min(window, count)`` are taken in order of score (ties: the earlier window)
    if they overlap no window taken before, while at least ``w`` of the budget is left; then
    ``w`` shrinks to ``min(w - 1, budget left)`` and the pass repeats over what is free. So
    exactly ``count`` tokens are picked (all when count >= len(candidates)); all windows but
    the last ones are ``window`` wide. Returns the picked positions, sorted (int64).
    """
    cand = np.asarray(candidates, dtype=np.int64)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if count >= len(cand):
        return cand.copy()
    if count <= 0:
        return cand[:0].copy()
    s = np.asarray(scores, dtype=np.float64)[cand]
    # breaks[j] = 1 where candidate j does not follow candidate j-1 directly (a gap).
    breaks = np.concatenate([[0], (np.diff(cand) != 1).astype(np.int64)])
    taken = np.zeros(len(cand), dtype=bool)
    budget, w = count, min(window, count)
    while budget > 0:
        sums = np.convolve(s, np.ones(w), mode="valid")  # sums[i]: window [i, i + w)
        inner = np.convolve(breaks, np.ones(w, dtype=np.int64), mode="valid") - breaks[: len(sums)]
        busy = np.convolve(taken.astype(np.int64), np.ones(w, dtype=np.int64), mode="valid")
        free = np.flatnonzero((inner == 0) & (busy == 0))
        for i in free[np.argsort(-sums[free], kind="stable")]:
            if budget < w:
                break
            if not taken[i : i + w].any():
                taken[i : i + w] = True
                budget -= w
        w = min(w - 1, budget)
    return cand[taken]


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """The auxiliary model's attention: the library's SDPA in every layer but the one being
    scored (``module._clip_queries`` set). There only the library's eager softmax weights of
    the last queries over all keys are computed and kept on the module ([heads, queries, keys],
    float32); its output is never read (AuxModel.scores stops there), so zeros stand in for it
    rather than a second attention over the whole prompt."""
    q = getattr(module, "_clip_queries", 0)
    if not q:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    n, dev = key.shape[2], query.device
    rows = torch.arange(n - q, n, device=dev)[:, None]
    mask = torch.zeros(q, n, dtype=query.dtype, device=dev)
    mask.masked_fill_(torch.arange(n, device=dev)[None, :] > rows, torch.finfo(query.dtype).min)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    _, weights = eager(module, query[:, :, n - q :], key, value, mask[None, None],
                       scaling=kwargs["scaling"], dropout=0.0)
    module._clip_weights = weights[0].float()
    # [batch, queries, heads, v_dim], as the attention functions return it
    return value.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None


def check_tokenizer(aux_dir: Path, main_dir: Path) -> None:
    """The auxiliary model must read the main model's token IDs: if ``aux_dir`` carries a
    tokenizer.json, its vocabulary (added tokens included) must equal the main model's
    (ValueError); without one the main model's is taken as shared."""
    from tokenizers import Tokenizer

    mine, main = Path(aux_dir) / "tokenizer.json", Path(main_dir) / "tokenizer.json"
    if not mine.is_file() or not main.is_file():
        return
    if Tokenizer.from_file(str(mine)).get_vocab() != Tokenizer.from_file(str(main)).get_vocab():
        raise ValueError(f"clip: auxiliary model {aux_dir} has a tokenizer other than the main "
                         f"model's ({main_dir}); CacheClip's auxiliary model must share it")


class ClipJob:
    """One prompt's auxiliary forward, running or done. ``pick`` waits for it."""

    def __init__(self, future: Future, window: int):
        self._future, self.window = future, window
        self.waited = 0.0  # seconds the caller blocked in scores()

    @property
    def seconds(self) -> float:
        """Seconds the auxiliary forward took (waits for it)."""
        return self._future.result()[1]

    def scores(self) -> np.ndarray:
        """float32 [N]: the attention each prompt token gets (waits for the forward)."""
        t0 = time.perf_counter()
        scores, _ = self._future.result()
        self.waited += time.perf_counter() - t0
        return scores

    def pick(self, candidates: np.ndarray, count: int) -> np.ndarray:
        """The ``count`` candidates to recompute: :func:`select_windows` on the scores."""
        return select_windows(self.scores(), candidates, count, self.window)


class AuxModel:
    """The auxiliary checkpoint in float32 on ``device`` (the CPU, as CacheClip runs it, or
    a GPU), with one worker thread.

    ``queries``: final prompt positions whose attention scores the tokens; ``window``: width
    of the recomputed windows. Calls are serialised (one forward at a time).
    """

    def __init__(self, model_dir: str | Path, vocab_size: int, queries: int = 16,
                 window: int = 8, device: str = "cpu"):
        from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

        root = Path(model_dir)
        if not (root / "config.json").is_file():
            raise FileNotFoundError(f"clip: auxiliary model {root}: no config.json")
        cfg = AutoConfig.from_pretrained(root)
        if getattr(cfg, "vocab_size", 0) < vocab_size:
            raise ValueError(f"clip: auxiliary model {root} has vocab_size "
                             f"{getattr(cfg, 'vocab_size', None)}, below the main tokenizer's "
                             f"{vocab_size}: it must share the main model's tokenizer")
        AttentionInterface.register(_ATTENTION, _capture_attention)
        model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32,
                                                     attn_implementation=_ATTENTION).eval()
        self.device = torch.device(device)
        model.to(self.device)
        body = getattr(model, "model", None)
        if not all(hasattr(body, a) for a in ("embed_tokens", "layers", "rotary_emb")):
            raise ValueError(f"clip: auxiliary model {root} ({cfg.model_type}) does not have "
                             "the decoder layout (model.embed_tokens, layers, rotary_emb) "
                             "this engine drives")
        self.path, self.body, self.queries, self.window = root, body, queries, window
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="irminsul-clip")

    @torch.inference_mode()
    def scores(self, ids: np.ndarray) -> np.ndarray:
        """float32 [N]: last-layer attention from the last ``queries`` positions of ``ids``
        (summed over heads and queries) on each token; runs on the calling thread."""
        body = self.body
        tok = torch.from_numpy(np.asarray(ids, dtype=np.int64))[None].to(self.device)
        n = tok.shape[1]
        pos = torch.arange(n, device=self.device)[None]
        with self._lock:
            h = body.embed_tokens(tok)
            pe = body.rotary_emb(h, pos)
            # No mask: SDPA runs causal over the whole prompt (the library's own choice).
            for layer in body.layers[:-1]:
                h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
            last = body.layers[-1]
            attn = last.self_attn
            attn._clip_queries = min(self.queries, n)
            try:  # only the attention weights are needed: the last layer's MLP is skipped
                attn(last.input_layernorm(h), attention_mask=None, position_ids=pos,
                     position_embeddings=pe)
                weights = attn._clip_weights
            finally:
                attn._clip_queries, attn._clip_weights = 0, None
        return weights.sum((0, 1)).cpu().numpy().astype(np.float32)

    def start(self, ids: np.ndarray, background: bool) -> ClipJob:
        """Score ``ids``: on the worker thread if ``background``, else now, on this thread."""
        ids = np.array(ids, dtype=np.int64)  # a copy: the caller may reuse its buffer

        def timed():
            t0 = time.perf_counter()
            out = self.scores(ids)
            return out, time.perf_counter() - t0

        if background:
            return ClipJob(self._pool.submit(timed), self.window)
        done: Future = Future()
        try:
            done.set_result(timed())
        except BaseException as e:
            done.set_exception(e)
            raise
        return ClipJob(done, self.window)
