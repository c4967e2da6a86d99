"""Tokenizer of a Hugging Face model directory, and incremental detokenization.

``tokenizer.json`` is read with the ``tokenizers`` library (the fast tokenizer transformers uses);
``tokenizer_config.json`` and ``generation_config.json`` add the special tokens, the EOS ids and the
chat template. A malformed file is a ValueError naming it.
"""

import functools
import json
import os

from tokenizers import Tokenizer as _HFTokenizer


@functools.lru_cache(maxsize=8)
def _compile_template(source: str):
    """A chat template compiled in Jinja's sandbox, with transformers' ``raise_exception``."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _read_json(path: str) -> dict:
    """The JSON object in ``path``; {} when there is no such file."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read())
    except OSError as e:
        raise ValueError(f"{path!r} cannot be read: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path!r} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path!r} holds a JSON {type(value).__name__}, expected an object")
    return value


def _token_content(value, key: str, path: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{path!r}: {key} must be a string or {{\"content\": string}}, got {value!r}")
    return value


def _chat_template(value, path: str) -> str | None:
    """tokenizer_config.json's ``chat_template``: a string, or a list of ``{"name", "template"}``
    (the one named "default" is used, as transformers does without a name)."""
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{path!r}: chat_template must be a string or a list of {{\"name\", \"template\"}}")
    return value


def _token_ids(value, path: str) -> list[int]:
    """``eos_token_id`` as generation_config.json / config.json write it: an id, a list of ids or null."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{path!r}: eos_token_id must be a token id or a list of them, got {value!r}")
    return ids


class Tokenizer:
    """Encodes text to token ids and back, as the model's fast tokenizer does.

    Attributes
    ----------
    eos_token_ids : list of int
        Every id that ends generation: generation_config.json's ``eos_token_id`` (an int or a
        list), config.json's, and tokenizer_config.json's ``eos_token``.
    chat_template : str or None
        The Jinja chat template from tokenizer_config.json, if any.
    """

    def __init__(self, path: str):
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise ValueError(f"no tokenizer.json in {path!r}; pass prompts as lists of token ids instead")
        try:
            self._tok = _HFTokenizer.from_file(tokenizer_file)
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception
            raise ValueError(f"{tokenizer_file!r} is not a valid tokenizer: {str(e)[:200]}") from None
        config_file = os.path.join(path, "tokenizer_config.json")
        config = _read_json(config_file)
        self.chat_template = _chat_template(config.get("chat_template"), config_file)
        self.bos_token = _token_content(config.get("bos_token"), "bos_token", config_file)
        self.eos_token = _token_content(config.get("eos_token"), "eos_token", config_file)
        eos: list[int] = []
        for name in ("generation_config.json", "config.json"):
            file = os.path.join(path, name)
            for token_id in _token_ids(_read_json(file).get("eos_token_id"), file):
                if token_id not in eos:
                    eos.append(token_id)
        if self.eos_token is not None:
            token_id = self._tok.token_to_id(self.eos_token)
            if token_id is not None and token_id not in eos:
                eos.append(token_id)
        self.eos_token_ids = eos
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """``messages`` ({role, content} dicts) rendered by the chat template, as transformers'
        ``apply_chat_template(..., tokenize=False)`` does; ValueError when there is no template or it
        fails on these messages."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json has no 'chat_template')")
        from jinja2.exceptions import TemplateError

        try:
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                eos_token=self.eos_token or "")
        except TemplateError as e:
            raise ValueError(f"the chat template failed: {e}") from None

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


class IncrementalDetokenizer:
    """Text of a growing token sequence, one delta at a time.

    A token can end in the middle of a multi-byte character (byte-level BPE) or change how the
    previous tokens decode (word-piece spacing). So each step decodes a short window of tokens that
    were already emitted plus the new ones, emits only what extends the window's previous text, and
    holds text back while it ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.token_ids = list(prompt_token_ids)
        # Decode from a few prompt tokens back so the first output token gets the right spacing.
        self._prefix_offset = max(len(self.token_ids) - 5, 0)
        self._read_offset = len(self.token_ids)
        self.text = ""

    def step(self, new_token_ids: list[int]) -> str:
        """Appends tokens; returns the text they complete (possibly empty)."""
        self.token_ids.extend(new_token_ids)
        decode = self._tokenizer.decode
        prefix_text = decode(self.token_ids[self._prefix_offset:self._read_offset], self._skip)
        full_text = decode(self.token_ids[self._prefix_offset:], self._skip)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            delta = full_text[len(prefix_text):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
            self.text += delta
            return delta
        return ""
