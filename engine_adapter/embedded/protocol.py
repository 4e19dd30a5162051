"""Request parsing and validation for the engine server (SGLang /generate and OpenAI shapes).

Every endpoint's body becomes one :class:`GenerationRequest`; anything the engine cannot honour
raises :class:`ApiError` (a 400 with the API's error JSON), never a 500.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any, NamedTuple

import numpy as np
from jinja2 import TemplateError

from ..contract import ANNOTATION_KEY, SGLANG_HINT_KEY, Annotation, ContractError
from .engine import SamplingParams
from .output_text import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from .planner import PolicyArgs, policy_args

log = logging.getLogger(__name__)

# Sampling knobs the engine does not implement, accepted only at their neutral value so that
# clients which always send them (most SDKs send 0 penalties) keep working.
_NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "repetition_penalty": 1,
            "min_p": 0, "n": 1, "best_of": 1}
# SGLang's constrained decoding and output options the engine does not implement: refused when
# set, rather than silently ignored (a client relying on them would get wrong output).
_UNSUPPORTED = ("regex", "ebnf", "json_schema", "structural_tag", "no_stop_trim", "logit_bias",
                "return_logprob", "logprobs", "top_logprobs", "echo", "suffix")


class ApiError(Exception):
    """A request the server refuses; rendered as the API's own error JSON."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


class GenerationRequest(NamedTuple):
    """One request, ready for the engine worker."""

    rid: str
    ids: np.ndarray  # int32 prompt token IDs
    anchors: tuple[int, ...]  # structural boundaries from the tokenizer's Prompt
    params: SamplingParams
    stop: tuple[str, ...]  # stop strings (trimmed from the output)
    skip_special_tokens: bool
    annotation: Annotation | None  # the proxy's, verified by the engine against ids
    policy: str | None  # per-request policy override
    policy_args: dict | None
    namespace: str
    stream: bool
    include_usage: bool  # OpenAI stream_options.include_usage
    parse_tools: bool  # tools were offered: parse <|tool_call|> markers out of the text
    keep_special: frozenset[int]  # special IDs decoded even with skip_special_tokens
    model: str


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(d: dict, key: str, default: int | None, *, lo: int = 0) -> int | None:
    v = d.get(key)
    if v is None:
        return default
    if not _is_int(v) or v < lo:
        raise ApiError(f"'{key}' must be an integer >= {lo}, got {v!r}", param=key)
    return v


def _float(d: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ApiError(f"'{key}' must be a number in [{lo}, {hi}], got {v!r}", param=key)
    return float(v)


def _bool(d: dict, key: str, default: bool) -> bool:
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(f"'{key}' must be true or false, got {v!r}", param=key)
    return v


def _stops(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    stops = (v,) if isinstance(v, str) else v
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError("'stop' must be a non-empty string or a list of them", param="stop")
    return tuple(stops)


class RequestParser:
    """Turns request bodies into GenerationRequests with one tokenizer and one context limit.

    ``malformed_annotations`` counts annotations that were present but unreadable; such a
    request is served as a plain one (the proxy's hint is an optimisation, never a must).
    ``policies``: the policies this engine can run (clip only with an auxiliary model); a
    request naming another, in its body or its annotation, is refused. None: not checked here.
    """

    def __init__(self, tokenizer, *, max_seq_len: int, model: str,
                 policies: tuple[str, ...] | None = None):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.model = model
        self.policies = policies
        # Tool-call markers that are special tokens would vanish with skip_special_tokens; when
        # tools are offered they are decoded anyway so the parser can find them.
        marker_ids = [tokenizer.encode(m) for m in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE)]
        self.tool_marker_ids = frozenset(
            int(ids[0]) for ids in marker_ids if len(ids) == 1 and ids[0] in tokenizer.special_ids
        )
        self.annotations_seen = 0
        self.malformed_annotations = 0
        self._count_lock = threading.Lock()  # requests are parsed on several threads

    # ---- endpoints -------------------------------------------------------------------------

    def generate(self, body: Any) -> GenerationRequest:
        """SGLang /generate: ``text`` or ``input_ids`` plus ``sampling_params``."""
        body = self._object(body)
        sp = body.get("sampling_params") or {}
        if not isinstance(sp, dict):
            raise ApiError("'sampling_params' must be an object", param="sampling_params")
        text, input_ids = body.get("text"), body.get("input_ids")
        if (text is None) == (input_ids is None):
            raise ApiError("give exactly one of 'text' and 'input_ids'")
        if text is not None:
            if not isinstance(text, str):
                raise ApiError("'text' must be a string (batches are not supported)", param="text")
            prompt = self._encode(lambda: self.tokenizer.encode_prompt(text))
            ids, anchors = prompt.ids, prompt.anchors
        else:
            ids, anchors = self._token_ids(input_ids, "input_ids"), ()
        return self._request(body, sp, ids, anchors, max_key="max_new_tokens", default_max=128,
                             stream=_bool(body, "stream", False), include_usage=False,
                             parse_tools=False, rid=body.get("rid"))

    def chat(self, body: Any) -> GenerationRequest:
        """OpenAI /v1/chat/completions, rendered with the model's chat template."""
        body = self._object(body)
        messages, tools = body.get("messages"), body.get("tools") or None
        if not isinstance(messages, list) or not messages:
            raise ApiError("'messages' must be a non-empty list", param="messages")
        if tools is not None and not isinstance(tools, list):
            raise ApiError("'tools' must be a list", param="tools")
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
            raise ApiError(f"response_format {fmt.get('type')!r} is not supported by this "
                           "engine (no constrained decoding)", param="response_format")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ApiError("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
        cont = _bool(body, "continue_final_message", False)
        prompt = self._encode(lambda: self.tokenizer.encode_chat(
            messages, tools=tools, continue_final_message=cont, **kwargs))
        parse_tools = tools is not None and body.get("tool_choice") != "none"
        return self._openai(body, prompt.ids, prompt.anchors, parse_tools)

    def completion(self, body: Any) -> GenerationRequest:
        """OpenAI /v1/completions: a string, a one-string list, or a list of token IDs."""
        body = self._object(body)
        p = body.get("prompt")
        if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
            if len(p) > 1:
                raise ApiError("batches are not supported: send one prompt", param="prompt")
            p = p[0]
        if isinstance(p, str):
            prompt = self._encode(lambda: self.tokenizer.encode_prompt(p))
            ids, anchors = prompt.ids, prompt.anchors
        elif isinstance(p, list):
            ids, anchors = self._token_ids(p, "prompt"), ()
        else:
            raise ApiError("'prompt' must be a string or a list of token IDs (one prompt)",
                           param="prompt")
        return self._openai(body, ids, anchors, False)

    # ---- shared ----------------------------------------------------------------------------

    def _openai(self, body: dict, ids, anchors, parse_tools: bool) -> GenerationRequest:
        stream = _bool(body, "stream", False)
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise ApiError("'stream_options' must be an object", param="stream_options")
        max_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        return self._request(body, body, ids, anchors, max_key=max_key, default_max=None,
                             stream=stream, parse_tools=parse_tools, rid=None,
                             include_usage=stream and _bool(opts, "include_usage", False))

    def _request(self, body: dict, sp: dict, ids: np.ndarray, anchors, *, max_key: str,
                 default_max: int | None, stream: bool, include_usage: bool, parse_tools: bool,
                 rid: Any) -> GenerationRequest:
        if len(ids) == 0:
            raise ApiError("the prompt is empty")
        if len(ids) >= self.max_seq_len:
            raise ApiError(f"the prompt has {len(ids)} tokens; this model's context limit is "
                           f"{self.max_seq_len} tokens (prompt plus at least one new token)")
        for key, neutral in _NEUTRAL.items():
            if sp.get(key) not in (None, neutral):
                raise ApiError(f"'{key}' other than {neutral} is not supported", param=key)
        for src in (sp, body):
            for key in _UNSUPPORTED:
                if src.get(key):
                    raise ApiError(f"'{key}' is not supported by this engine", param=key)
        room = self.max_seq_len - len(ids)
        # Like SGLang, a max_new_tokens past the context limit is clamped, not refused.
        requested = _int(sp, max_key, default_max)
        max_new = room if requested is None else min(requested, room)
        top_k = sp.get("top_k")
        if _is_int(top_k) and top_k < 0:  # SGLang and vLLM spell "off" as -1
            top_k = 0
        stop_ids = sp.get("stop_token_ids") or ()
        if not isinstance(stop_ids, (list, tuple)) or not all(map(_is_int, stop_ids)):
            raise ApiError("'stop_token_ids' must be a list of integers", param="stop_token_ids")
        try:
            params = SamplingParams(
                max_new_tokens=max_new,
                temperature=_float(sp, "temperature", 1.0, 0.0, 100.0),  # SGLang's default
                top_p=_float(sp, "top_p", 1.0, 0.0, 1.0),
                top_k=_int({"top_k": top_k}, "top_k", 0),
                stop_token_ids=tuple(stop_ids),
                ignore_eos=_bool(sp, "ignore_eos", False),
                seed=_int(sp, "seed", None),
            )
        except ValueError as e:
            raise ApiError(str(e)) from None
        annotation = self._annotation(body)
        policy, policy_args = self._policy(body, annotation)
        return GenerationRequest(
            rid=str(rid) if isinstance(rid, str) and rid else uuid.uuid4().hex,
            ids=ids, anchors=tuple(anchors), params=params, stop=_stops(sp.get("stop")),
            skip_special_tokens=_bool(sp, "skip_special_tokens", True),
            annotation=annotation, policy=policy, policy_args=policy_args,
            namespace=_namespace(annotation, body.get("extra_key")), stream=stream,
            include_usage=include_usage, parse_tools=parse_tools,
            keep_special=self.tool_marker_ids if parse_tools else frozenset(),
            model=body["model"] if isinstance(body.get("model"), str) else self.model,
        )

    def _annotation(self, body: dict) -> Annotation | None:
        raw = body.get(ANNOTATION_KEY)
        if raw is None:
            hint = body.get(SGLANG_HINT_KEY)
            # kv_hints is the annotation itself, or an object holding it under ANNOTATION_KEY
            raw = hint.get(ANNOTATION_KEY, hint) if isinstance(hint, dict) else hint
        if raw is None:
            return None
        with self._count_lock:
            self.annotations_seen += 1
        try:
            ann = Annotation.from_json(raw)
            if ann.policy is not None:
                policy_args(ann.policy, ann.policy_args, PolicyArgs())
            return ann
        except (ContractError, ValueError, TypeError) as e:
            with self._count_lock:
                self.malformed_annotations += 1
            log.warning("ignoring malformed irminsul annotation: %s", e)
            return None

    def _policy(self, body: dict, annotation: Annotation | None):
        name, args = body.get("irminsul_policy"), body.get("irminsul_policy_args")
        if name is None:
            if annotation is None or annotation.policy is None:
                return None, None
            self._available(annotation.policy, f"the {ANNOTATION_KEY!r} annotation's policy")
            return annotation.policy, dict(annotation.policy_args)
        if args is not None and not isinstance(args, dict):
            raise ApiError("'irminsul_policy_args' must be an object",
                           param="irminsul_policy_args")
        try:
            policy_args(name, args, PolicyArgs())  # only checks: the engine applies defaults
        except ValueError as e:
            raise ApiError(f"irminsul_policy: {e}", param="irminsul_policy") from None
        self._available(name, "irminsul_policy")
        return name, dict(args or {})

    def _available(self, name: str, what: str) -> None:
        """A known policy this engine cannot run (clip without an auxiliary model) is the
        client's error, refused before the engine sees it."""
        if self.policies is None or name in self.policies:
            return
        why = (" (it needs an auxiliary model sharing the tokenizer: the served model has no "
               "aux/ folder and no --clip-model was given)" if name == "clip" else "")
        raise ApiError(f"{what}: policy {name!r} is not available on this engine{why}; "
                       f"available: {', '.join(self.policies)}", param="irminsul_policy")

    def _token_ids(self, v: Any, key: str) -> np.ndarray:
        vocab = self.tokenizer.vocab_size
        if not isinstance(v, list) or not all(_is_int(t) and 0 <= t < vocab for t in v):
            raise ApiError(f"'{key}' must be a list of token IDs in [0, {vocab})", param=key)
        return np.asarray(v, dtype=np.int32)

    @staticmethod
    def _object(body: Any) -> dict:
        if not isinstance(body, dict):
            raise ApiError("the request body must be a JSON object")
        return body

    @staticmethod
    def _encode(fn):
        try:
            return fn()
        except (ValueError, TypeError, KeyError, TemplateError) as e:
            raise ApiError(f"cannot render the prompt: {e}") from None


def _namespace(annotation: Annotation | None, extra_key) -> str:
    """The cache partition of a request. The proxy's annotation carries it (the tenant under
    --isolate-tenants, whose extra_key it then also sends); without one, SGLang's own
    ``extra_key`` partitions the cache as it does SGLang's radix tree, so a client talking to
    `irminsul serve` directly gets the isolation it would get from SGLang."""
    if annotation is not None:
        return annotation.namespace
    if isinstance(extra_key, str) and extra_key:
        return f"extra_key:{extra_key}"
    return ""

