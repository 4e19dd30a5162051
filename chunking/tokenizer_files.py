"""Reading a model directory's tokenizer files: tokenizer.json, tokenizer_config.json,
chat_template.jinja and generation_config.json (the last two optional)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from tokenizers import Tokenizer

from .chat import ChatTemplate

# The special-token names transformers passes to chat templates as variables.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                      "cls_token", "mask_token")


class TokenizerFiles(NamedTuple):
    tokenizer: Tokenizer
    added_tokens: list[dict]  # id, content, lstrip, rstrip, single_word, normalized, special
    config: dict[str, Any]  # tokenizer_config.json
    special_vars: dict[str, str]  # bos_token, eos_token, ... as strings
    chat_template: ChatTemplate | None
    generation_eos: tuple[int, ...]  # generation_config.json eos_token_id(s)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e


def token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def read_tokenizer_files(path: str | Path, chat_template: str | None = None) -> TokenizerFiles:
    """Load the files; FileNotFoundError names the one missing, ValueError a malformed one."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory not found: {d}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} is missing (the model directory needs "
                                    "tokenizer.json and tokenizer_config.json)")
    try:
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    except Exception as e:  # the Rust side raises a plain Exception
        raise ValueError(f"{d / 'tokenizer.json'}: tokenizers cannot load it: {e}") from e
    added = [
        {"id": i, "content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip,
         "single_word": t.single_word, "normalized": t.normalized, "special": t.special}
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    ]
    config = _read_json(d / "tokenizer_config.json")
    if not isinstance(config, dict):
        raise ValueError(f"{d / 'tokenizer_config.json'}: expected a JSON object")
    special = {k: t for k in SPECIAL_TOKEN_KEYS if (t := token_text(config.get(k))) is not None}

    source: Any = chat_template
    if source is None and (d / "chat_template.jinja").is_file():
        source = (d / "chat_template.jinja").read_text(encoding="utf-8")
    if source is None:
        source = config.get("chat_template")
    template = ChatTemplate.from_config(source)

    eos: tuple[int, ...] = ()
    if (d / "generation_config.json").is_file():
        value = _read_json(d / "generation_config.json").get("eos_token_id")
        ids = value if isinstance(value, list) else [value] if value is not None else []
        eos = tuple(int(i) for i in ids)
    return TokenizerFiles(tok, added, config, special, template, eos)
