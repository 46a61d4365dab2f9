"""Tokenizer from tokenizer.json (or GPT-2's vocab.json + merges.txt), plus the chat template."""
from __future__ import annotations

import json
from pathlib import Path

from pyengine.errors import CheckpointError


class Tokenizer:
    def __init__(self, tok, *, chat_template: str | None = None, special_tokens: dict | None = None):
        self._tok = tok
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}
        self._template = None

    @classmethod
    def from_folder(cls, folder: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        tokenizer_json = folder / "tokenizer.json"
        if tokenizer_json.is_file():
            try:
                tok = HFTokenizer.from_file(str(tokenizer_json))
            except Exception as e:  # the Rust library raises its own exception type
                raise CheckpointError(tokenizer_json, f"cannot be read as a tokenizer ({e})") from None
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tok = _gpt2_byte_level_bpe(folder)
        else:
            raise CheckpointError(folder, "no tokenizer found (expected tokenizer.json, or vocab.json + merges.txt)")
        config = {}
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(config_file, f"not valid JSON ({e})") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return cls(tok, chat_template=template, special_tokens={k: v for k, v in specials.items() if v})

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's own Jinja template (as transformers does)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template (tokenizer_config.json has no chat_template)")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"each message must be a dict with 'role' and 'content', got {m!r}")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 sequences.

    Each push decodes only a short window, the ids since the previous piece plus the ones just
    before them (so a decoder that treats a sequence's first token specially, such as stripping the
    SentencePiece leading space, sees it in context): the piece is what the window adds to the
    decoded context. Decoding the whole list every token would cost O(length) per token.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.context_start = 0  # the window: ids[context_start:], whose ids[context_start:emitted_end]
        self.emitted_end = 0    # are already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        context = decode(self.ids[self.context_start:self.emitted_end])
        text = decode(self.ids[self.context_start:])
        if text.endswith("\ufffd") or not text.startswith(context):  # wait for the rest of a character
            return ""
        self.context_start, self.emitted_end = self.emitted_end, len(self.ids)
        return text[len(context):]


def _token_text(value):
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _raise_template_error(message):
    raise ValueError(f"chat template error: {message}")


def _gpt2_byte_level_bpe(folder: Path):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    try:
        bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except Exception as e:
        raise CheckpointError(folder / "vocab.json", f"cannot build a BPE tokenizer from vocab.json + merges.txt ({e})") from None
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok
