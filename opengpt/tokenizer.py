"""Text <-> token ids. This module owns everything textual between the user and the model:

* loading a tokenizer from a HF checkpoint directory (tokenizer.json plus the JSON/Jinja files around it),
* encode / decode, the special tokens and the stop (EOS) ids generation must honour,
* chat templates, rendered exactly as transformers' `apply_chat_template` renders them (same Jinja sandbox,
  filters, globals and variables), so a prompt built here is byte-identical to the one the model was tuned on,
* UTF-8-safe streaming detokenization (`StreamDecoder`).

The model and the engine only ever see token ids.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

# transformers' SPECIAL_TOKENS_ATTRIBUTES: the names templates see as variables (bos_token, eos_token, ...)
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning comes under; templates read the first, gpt-oss templates read "thinking"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message
# Prompt tokens a StreamDecoder keeps as left context (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)
_STREAM_CONTEXT = 5


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used as asked; the message says what to fix."""


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json stores a special token as a plain string or as a serialized AddedToken dict
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); fix or delete the file, or re-download it "
                             "from the model's repository") from None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what a checkpoint's config says about special tokens and chat format."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict, eos_token_ids: list[int] | None = None):
        self._tok = tokenizer  # adopted, not copied: special tokens may be registered on it below
        self.config = dict(config)
        # A training-time truncation/padding setting saved in tokenizer.json would silently cut or pad prompts;
        # transformers' encode disables both too.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.special_tokens = {k: s for k in _SPECIAL_KEYS if (s := _token_str(self.config.get(k))) is not None}
        self._register_special_tokens()
        self._apply_add_bos_eos()

        template = self.config.get("chat_template")
        if isinstance(template, list):  # older files: [{"name": "default", "template": "..."}, ...]
            template = {t["name"]: t["template"] for t in template}
        self.chat_template: str | dict[str, str] | None = template or None

        bos, eos, pad = (self.special_tokens.get(k) for k in ("bos_token", "eos_token", "pad_token"))
        stops = [*(eos_token_ids or []), self.token_to_id(eos) if eos else None]
        self.eos_token_ids: frozenset[int] = frozenset(int(i) for i in stops if i is not None)
        self.bos_token_id: int | None = self.token_to_id(bos) if bos else None
        self.pad_token_id: int | None = self.token_to_id(pad) if pad else None
        # Every id the tokenizer can produce or decode, added tokens included (len() of a transformers tokenizer)
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

    def _register_special_tokens(self) -> None:
        # transformers makes every named or extra special token a special added token, adding it if the vocabulary
        # lacks it: only then is it split out of input text intact and dropped by skip_special_tokens.
        extra = self.config.get("extra_special_tokens") or self.config.get("additional_special_tokens") or []
        if isinstance(extra, Mapping):  # v5 model-specific form: {"image_token": "<image>", ...}
            extra = list(extra.values())
        wanted = [*self.special_tokens.values(), *(_token_str(t) for t in extra)]
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        missing = [t for t in dict.fromkeys(wanted) if t is not None and t not in added]
        if missing:
            self._tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])

    def _apply_add_bos_eos(self) -> None:
        # A tokenizer.json post-processor already says whether BOS/EOS are added; add_bos_token/add_eos_token only
        # matter for a bare tokenizer without one (the way transformers' update_post_processor builds it).
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        add_bos = bool(self.config.get("add_bos_token") and bos)
        add_eos = bool(self.config.get("add_eos_token") and eos)
        if self._tok.post_processor is not None or not (add_bos or add_eos):
            return
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        specials = [(t, self._tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        self._tok.post_processor = tokenizers.processors.TemplateProcessing(single=single, pair=pair,
                                                                            special_tokens=specials)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of a HF checkpoint directory, reading the files transformers reads."""
        d = Path(path)
        if not d.is_dir():
            raise TokenizerError(f"{d} is not a directory; from_dir expects a HF checkpoint directory")
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(
                f"{tj} not found: opengpt loads tokenizers from tokenizer.json (the `tokenizers` library's format). "
                "Fix: copy tokenizer.json from the model's original repository, or convert the tokenizer once with "
                f"transformers: AutoTokenizer.from_pretrained({str(d)!r}).save_pretrained({str(d)!r})")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception for a truncated or foreign file
            raise TokenizerError(
                f"{tj} cannot be read ({type(e).__name__}: {e}). Fix: re-download tokenizer.json from the model's "
                f"repository, or upgrade `tokenizers` (installed: {tokenizers.__version__})") from None

        config = _read_json(d / "tokenizer_config.json")
        config = config if isinstance(config, dict) else {}
        # tokenizer.json's post-processor decides BOS/EOS; transformers drops these keys when it loads one
        for key in ("add_bos_token", "add_eos_token"):
            config.pop(key, None)
        special_map = _read_json(d / "special_tokens_map.json")
        if isinstance(special_map, dict) and "added_tokens_decoder" not in config:
            config.update(special_map)  # legacy checkpoints: transformers lets this file override the config
        chat_json = _read_json(d / "chat_template.json")  # processors' legacy template file
        if isinstance(chat_json, dict) and chat_json.get("chat_template"):
            config["chat_template"] = chat_json["chat_template"]
        templates = {}  # standalone .jinja files override templates in the JSON files, as in transformers
        if (d / "chat_template.jinja").is_file():
            templates["default"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
        for f in sorted((d / "additional_chat_templates").glob("*.jinja")):
            templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
        if templates:
            config["chat_template"] = templates["default"] if list(templates) == ["default"] else templates

        eos = (_read_json(d / "generation_config.json") or {}).get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(backend, config, eos_ids)

    # ------------------------------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):  # a tensor or numpy array
            ids = ids.tolist()
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def stream_decoder(self, skip_special_tokens: bool = True, prompt_ids: list[int] | None = None) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens, prompt_ids)

    # ------------------------------------------------------------------------------------------ chat
    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def _select_template(self, chosen: str | None, tools: list | None) -> str:
        # transformers' get_chat_template: `chosen` is a template name or a whole template
        t = self.chat_template
        if isinstance(t, dict):
            if chosen is not None:
                return t.get(chosen, chosen)
            if tools is not None and "tool_use" in t:
                return t["tool_use"]
            if "default" in t:
                return t["default"]
            raise TokenizerError(f"this model has several chat templates ({', '.join(sorted(t))}) and none is "
                                 "named 'default'; pass chat_template=<name>")
        if chosen is not None:
            return chosen
        if t is None:
            raise TokenizerError("this model has no chat template, so it cannot format chat messages (it is probably "
                                 "a base model, not a chat model); use `generate` for raw text completion instead")
        return t

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs: Any) -> str:
        """The prompt text for `messages`, as transformers' `apply_chat_template(..., tokenize=False)` renders it.

        `kwargs` become template variables (e.g. `enable_thinking=False`, `documents=[...]`), except transformers'
        own options `chat_template` (a name or a template) and `continue_final_message` (leave the last message open
        for the model to continue; it implies add_generation_prompt=False).
        """
        template = self._select_template(kwargs.pop("chat_template", None), tools)
        documents = kwargs.pop("documents", None)
        cont = kwargs.pop("continue_final_message", False)
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TokenizerError("apply_chat_template needs a non-empty list of messages")
        if not all(isinstance(m, Mapping) for m in messages):
            raise TokenizerError("chat messages must be dicts like {'role': 'user', 'content': '...'}")
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise TokenizerError("tools must be JSON-schema dicts, e.g. {'type': 'function', 'function': {...}}")
        # Like transformers: keys set to None (OpenAI's content=None, tool_calls=None) are dropped, since templates
        # handle a missing key but would print "None"; everything else is rebuilt from plain JSON types (a copy).
        msgs = _plain([{k: v for k, v in m.items() if v is not None} for m in messages])
        for i, m in enumerate(msgs):  # reasoning under any of its names reaches templates under the names they read
            if (r := next((m[f] for f in _REASONING_FIELDS if m.get(f) is not None), None)) is not None:
                msgs[i] = {"thinking": r, **m, "reasoning_content": r}
        final = _mark_final_message(msgs, cont, template) if cont else None
        variables = {**self.special_tokens, **_plain(kwargs)}  # kwargs override the special tokens, as there
        try:
            text = _compile(template).render(messages=msgs, tools=_plain(tools), documents=_plain(documents),
                                             add_generation_prompt=add_generation_prompt and not cont, **variables)
        except (jinja2.TemplateError, TypeError) as e:  # e.g. a message without the keys the template reads
            raise TokenizerError(f"the chat template failed on these messages: {e}") from e
        return _cut_at_final_message(text, final) if cont else text

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    **kwargs: Any) -> list[int]:
        # No add_special_tokens: templates write BOS themselves (transformers encodes the same way)
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
        return self.encode(text, add_special_tokens=False)


def _plain(value: Any) -> Any:
    # transformers' _plain_template_data: templates come from the Hub and run sandboxed, so they only ever see plain
    # JSON types; rich objects (tensors, images) become an inert "<TypeName>" that templates only test for presence.
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base, strip in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, base):  # subclasses (enums, numpy scalars) carry methods: strip to the base type
            return strip(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return _plain(value.item())  # np.bool_(False) would otherwise become a truthy placeholder
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _mark_final_message(msgs: list[dict], cont: bool | str, template: str) -> str:
    """Tag the end of the last message so the rendered text can be cut there; returns the message's text."""
    field = cont if isinstance(cont, str) else "content"
    last = msgs[-1]
    final = last.get(field)
    if final is None:
        raise TokenizerError(f"continue_final_message: the last message has no {field!r} to continue")
    # reasoning is copied under several names, so every copy is tagged and the template may read any of them
    fields = [f for f in _REASONING_FIELDS if last.get(f) == final] if field in _REASONING_FIELDS else [field]
    if not any(f in template for f in fields):
        raise TokenizerError(f"continue_final_message: the chat template never reads {field!r}")
    if isinstance(final, (list, tuple)):  # content blocks: continue the last text block
        block = next((b for b in reversed(final) if isinstance(b, dict) and "text" in b), None)
        if block is None:
            raise TokenizerError("continue_final_message: the last message has no text block to continue")
        final, block["text"] = block["text"], block["text"] + _CONTINUE_TAG
    else:
        for f in fields:
            last[f] = last[f] + _CONTINUE_TAG
    return final


def _cut_at_final_message(text: str, final: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise TokenizerError("continue_final_message: the chat template drops (part of) the final message")
    loc = text.rindex(tag)
    # a template that trims the message also trimmed the tag's space, so trailing space is gone there too
    return text[:loc] if text[loc:loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:loc].rstrip()


# ---------------------------------------------------------------------------------------------- Jinja sandbox
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks (transformers'
    AssistantTracker); for rendering a prompt it is transparent."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    # templates call this to reject conversations they cannot format (e.g. roles that do not alternate)
    raise TokenizerError(f"the chat template rejected the messages: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' filter: Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    # `dict` for templates without handing them the real type (dict.__class__ etc. would allow type-hackery)
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    # transformers' TemplateNamespace: no underscore attributes, so a template cannot reach CPython internals
    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    # The environment transformers uses; templates are untrusted code from model repositories, hence the sandbox
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_Namespace)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


# ---------------------------------------------------------------------------------------------- streaming
class StreamDecoder:
    """Incremental detokenization (vLLM's / text-generation-inference's): decode a small window of ids, emit only
    the text past what the window's first part already produced, and hold back text ending in U+FFFD, which means
    the last token ended inside a UTF-8 character (byte-level BPE splits CJK characters and emoji across tokens).
    Joined deltas plus `flush()` equal `decode(generated ids)` (with `prompt_ids`: the text those ids add to the
    prompt's, which differs only where a decoder treats the start of a text specially, e.g. SentencePiece's space)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, prompt_ids: list[int] | None = None):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        # A few prompt tokens of left context make the first token decode as a continuation (e.g. a
        # SentencePiece "▁word" keeps its space) instead of as the start of a text.
        self._ids: list[int] = [int(i) for i in (prompt_ids or [])[-_STREAM_CONTEXT:]]
        self._read = len(self._ids)  # ids before this offset have been emitted
        self._prefix_text = self._decode(self._ids)  # the window's text up to the read offset

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _emit(self, text: str) -> str:
        delta = text[len(self._prefix_text):]
        # the window now starts at the old read offset: earlier ids no longer change the text
        del self._ids[:self._read]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return delta

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes ("" while it may still be part of an unfinished character)."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        if len(text) > len(self._prefix_text) and not text.endswith("\ufffd"):
            return self._emit(text)
        return ""

    def flush(self) -> str:
        """Everything not yet emitted, incomplete characters included (as U+FFFD, the way `decode` shows them)."""
        text = self._decode(self._ids)
        return self._emit(text) if len(text) > len(self._prefix_text) else ""
