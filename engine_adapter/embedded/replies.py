"""Response bodies of the engine server, in SGLang's and OpenAI's shapes.

Accounting follows the wire contract: ``cached_tokens`` is the exact-prefix count only (as
SGLang reports it); content reuse is reported apart under ``irminsul`` (ReuseCounts).
"""

from __future__ import annotations

import time
from typing import Any

from ..contract import ReuseCounts
from .output_text import ParsedOutput
from .protocol import GenerationRequest
from .worker import Finished


def usage_json(req: GenerationRequest, done: Finished) -> dict[str, Any]:
    """OpenAI usage plus the contract's ``irminsul`` ReuseCounts."""
    prompt = len(req.ids)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": done.completion_tokens,
        "total_tokens": prompt + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": _exact(done.counts)},
    }
    if done.counts is not None:
        usage["irminsul"] = done.counts.to_json()
    return usage


def _exact(counts: ReuseCounts | None) -> int:
    return counts.exact_prefix_tokens if counts is not None else 0


def sglang_finish(done: Finished | None) -> dict[str, Any] | None:
    """SGLang's finish_reason object, or None while the request is still running."""
    if done is None:
        return None
    if done.reason == "stop":
        return {"type": "stop", "matched": done.matched}
    if done.reason == "length":
        return {"type": "length", "length": done.completion_tokens}
    return {"type": "abort", "message": "the request was cancelled"}


def generate_json(req: GenerationRequest, text: str, output_ids: list[int],
                  done: Finished | None, started: float) -> dict[str, Any]:
    """A /generate body (also each streamed chunk: text and output_ids are cumulative)."""
    meta: dict[str, Any] = {
        "id": req.rid,
        "prompt_tokens": len(req.ids),
        "completion_tokens": len(output_ids) if done is None else done.completion_tokens,
        "finish_reason": sglang_finish(done),
    }
    if done is not None:
        meta["cached_tokens"] = _exact(done.counts)
        meta["irminsul"] = done.counts.to_json() if done.counts is not None else None
        meta["prefill_seconds"] = done.prefill_seconds
        meta["e2e_latency"] = time.perf_counter() - started
    return {"text": text, "output_ids": list(output_ids), "meta_info": meta}


def openai_finish(done: Finished, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return "abort" if done.reason == "abort" else done.reason


def chat_message(parsed: ParsedOutput) -> dict[str, Any]:
    """The assistant message; content is None when the model only called tools (OpenAI)."""
    if not parsed.tool_calls:
        return {"role": "assistant", "content": parsed.content}
    content = parsed.content.strip() or None
    return {"role": "assistant", "content": content,
            "tool_calls": [c.to_openai() for c in parsed.tool_calls]}


def chat_json(req: GenerationRequest, parsed: ParsedOutput, done: Finished,
              created: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{req.rid}",
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "choices": [{
            "index": 0,
            "message": chat_message(parsed),
            "logprobs": None,
            "finish_reason": openai_finish(done, bool(parsed.tool_calls)),
            "matched_stop": done.matched,  # SGLang's extra: the stop string or token ID
        }],
        "usage": usage_json(req, done),
    }


def chat_chunk(req: GenerationRequest, created: int, delta: dict[str, Any] | None,
               done: Finished | None = None, *, tool_calls: bool = False,
               usage: dict | None = None) -> dict[str, Any]:
    """One chat.completion.chunk; ``done`` makes the finish chunk, ``delta=None`` the
    usage-only chunk (no choices)."""
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                              "finish_reason": None}
    if done is not None:
        choice["finish_reason"] = openai_finish(done, tool_calls)
        choice["matched_stop"] = done.matched
    chunk: dict[str, Any] = {
        "id": f"chatcmpl-{req.rid}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": req.model,
        "choices": [] if delta is None else [choice],
    }
    if req.include_usage:
        chunk["usage"] = usage  # null on every chunk but the last, as OpenAI sends it
    return chunk


def completion_json(req: GenerationRequest, text: str, done: Finished | None, created: int,
                    *, chunk: bool = False) -> dict[str, Any]:
    """A text_completion body, or (chunk=True) one streamed piece of it."""
    choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None,
                              "finish_reason": None}
    if done is not None:
        choice["finish_reason"] = openai_finish(done, False)
        choice["matched_stop"] = done.matched
    body: dict[str, Any] = {
        "id": f"cmpl-{req.rid}",
        "object": "text_completion",
        "created": created,
        "model": req.model,
        "choices": [choice],
    }
    if not chunk:
        body["usage"] = usage_json(req, done)
    elif req.include_usage:
        body["usage"] = None
    return body


def completion_usage_chunk(req: GenerationRequest, done: Finished, created: int) -> dict:
    body = completion_json(req, "", done, created, chunk=True)
    body["choices"] = []
    body["usage"] = usage_json(req, done)
    return body
