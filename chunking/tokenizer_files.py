"""Reading a model directory's tokenizer files: tokenizer.json, tokenizer_config.json,
chat_template.jinja and generation_config.json (the last two optional)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from tokenizers import Tokenizer

from .chat import ChatTemplate

# The special-token names transformers passes to chat templates as variables.
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


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
            raise FileNotFoundError(
                f"{d / name} is missing (the model directory needs "
                "tokenizer.json and tokenizer_config.json)"
            )
    try:
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    except Exception as e:  # the Rust side raises a plain Exception
        raise ValueError(f"{d / 'tokenizer.json'}: tokenizers cannot load it: {e}") from e
    added = [
        {
            "id": i,
            "content": t.content,
            "lstrip": t.lstrip,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "normalized": t.normalized,
            "special": t.special,
        }
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    ]
    config = _read_json(d / "tokenizer_config.json")
    if not isinstance(config, dict):
        # a malformed file, not a wrong argument: ValueError like the other file errors
        raise ValueError(f"{d / 'tokenizer_config.json'}: expected a JSON object")  # noqa: TRY004
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


def prompt_specials(tok: Tokenizer, config: dict, special: dict[str, str]):
    """(IDs before, IDs after) the text that tokenizing a plain prompt adds, as transformers
    does it: an explicit add_bos_token / add_eos_token in tokenizer_config.json rebuilds the
    post-processor from those flags; otherwise tokenizer.json's post-processor applies."""
    if "add_bos_token" in config or "add_eos_token" in config:
        bos = tok.token_to_id(special["bos_token"]) if special.get("bos_token") else None
        eos = tok.token_to_id(special["eos_token"]) if special.get("eos_token") else None
        pre = [bos] if config.get("add_bos_token") and bos is not None else []
        post = [eos] if config.get("add_eos_token") and eos is not None else []
        return pre, post
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k], full[k + len(plain) :]
    return [], []
