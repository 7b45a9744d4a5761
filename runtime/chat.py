"""Chat templates: the artifact's Jinja template rendered in a sandbox.

A template is code that came with the model, so it runs in jinja2's immutable sandbox (no
attribute tricks, no mutation of what we pass in), with the helpers Hugging Face templates use
(``raise_exception``, ``strftime_now``) and the special tokens of ``tokenizer_config.json``.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from otaro.errors import OtaroError

Messages = Sequence[Mapping[str, Any]]
_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(OtaroError):
    """No template, or a template that fails on these messages."""


def _token_text(v: Any) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as {"content": ...} objects.
    return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    special_tokens: Mapping[str, str]

    @classmethod
    def find(cls, root: Path) -> "ChatTemplate | None":
        """The template of an artifact folder: ``chat_template.jinja`` (transformers >= 4.43
        writes it there) or ``tokenizer_config.json``'s ``chat_template`` (a string, or a list
        of named templates of which we take ``default``)."""
        from otaro.manifest_schema import check, load_json

        cfg_path = root / "tokenizer_config.json"
        cfg = check(load_json(cfg_path, ChatTemplateError), dict, str(cfg_path), ChatTemplateError) \
            if cfg_path.is_file() else {}
        special = {k: t for k in _SPECIAL if (t := _token_text(cfg.get(k))) is not None}
        source = cfg.get("chat_template")
        if isinstance(source, list):
            source = next((t.get("template") for t in source
                           if isinstance(t, dict) and t.get("name") == "default"), None)
        if (root / "chat_template.jinja").is_file():
            try:
                source = (root / "chat_template.jinja").read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as e:
                raise ChatTemplateError(f"{root / 'chat_template.jinja'} cannot be read: {e}") from None
        return cls(source, special) if isinstance(source, str) and source else None

    def render(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        check_messages(messages)

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: _dt.datetime.now().strftime(fmt))
        try:
            return env.from_string(self.source).render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                **self.special_tokens)
        except TemplateError as e:
            raise ChatTemplateError(f"the artifact's chat template failed on these messages: {e}") from None


def check_messages(messages: Any) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ChatTemplateError("a chat is a non-empty list of {'role': ..., 'content': ...} messages")
    for m in messages:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ChatTemplateError(f"chat message {m!r} needs a 'role' string and a 'content'")
