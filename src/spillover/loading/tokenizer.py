"""Tokenizer: text <-> token ids, built from a Hugging Face model directory or from GGUF metadata.

Both sources end up as one `tokenizers.Tokenizer` (the Rust library) plus the facts the engine needs
around it: which ids are special, which ones end a generation, whether BOS is added, the chat template.

GGUF files carry no tokenizer.json, only llama.cpp's description of the vocabulary:

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE with merges. The text is first split by the regexes
  llama.cpp uses for the file's `tokenizer.ggml.pre` type (see `_PRE_TOKENIZERS`).
- `tokenizer.ggml.model == "llama"`: SentencePiece BPE. Merges are recovered from the token scores,
  spaces become "▁", and bytes missing from the vocabulary fall back to `<0xNN>` tokens.

Tokens the file marks control / unknown become special added tokens, user-defined ones plain added tokens,
so text like "<|im_start|>" is matched whole and never split.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from spillover.errors import ModelLoadError, UnsupportedModelError
from spillover.loading.chat_template import ChatTemplate, select_template

log = logging.getLogger(__name__)

# llama.cpp's token types (llama_token_type in the GGUF spec).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# --- pre-tokenizer regexes per `tokenizer.ggml.pre` (from llama.cpp's llama-vocab.cpp) --------------------
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS = r"\p{N}"


def _pre_types() -> dict[str, tuple[tuple[str, ...], bool]]:
    """pre type -> (regexes applied one after the other, ignore_merges: whole-vocabulary words skip BPE)."""
    table: dict[str, tuple[tuple[str, ...], bool]] = {}
    groups = [
        (("default", "gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "roberta-bpe"), (_GPT2,), False),
        (
            ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
            (_DIGITS, _GPT2),
            False,
        ),
        (
            ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
            (_LLAMA3,),
            True,
        ),
        (("dbrx", "smaug-bpe"), (_LLAMA3,), False),
        (("qwen2", "deepseek-r1-qwen", "megrez"), (_QWEN2,), False),
        (("qwen35",), (_QWEN35,), False),
        (("tekken",), (_TEKKEN,), False),
        (("gpt-4o", "llama4"), (_GPT4O,), False),
    ]
    for names, regexes, ignore_merges in groups:
        for name in names:
            table[name] = (regexes, ignore_merges)
    return table


_PRE_TYPES = _pre_types()
SUPPORTED_GGUF_PRE_TYPES: tuple[str, ...] = tuple(sorted(_PRE_TYPES))
SUPPORTED_GGUF_MODELS: tuple[str, ...] = ("gpt2", "llama")


def _byte_chars() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte value (index = byte): printable Latin-1 stays itself,
    the rest are shifted past U+0100 in byte order."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, shifted = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return tuple(chars)


_BYTE_CHARS = _byte_chars()
_BYTE_ALPHABET = frozenset(_BYTE_CHARS)


# --- building backends from GGUF metadata ---------------------------------------------------------------


def _byte_level_bpe(
    tokens: Sequence[str], types: Sequence[int], merges: Sequence[str], pre: str | None
) -> Backend:
    other = set("".join(tokens)) - _BYTE_ALPHABET  # (one pass in C: usually empty, each token kept as is)
    vocab: dict[str, int] = {} if other else dict(zip(tokens, range(len(tokens)), strict=True))
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)) if other else ():
        if kind not in (_CONTROL, _USER_DEFINED, _UNKNOWN) and not set(tok) <= _BYTE_ALPHABET:
            # A plain token written as real text: spell it in the byte alphabet the merges use.
            tok = "".join(_BYTE_CHARS[b] for b in tok.encode("utf-8"))
        vocab[tok] = i
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if pre is not None and pre not in _PRE_TYPES:
        log.warning(
            "GGUF pre-tokenizer %r is not known; splitting text like GPT-2 (known: %s)",
            pre,
            ", ".join(SUPPORTED_GGUF_PRE_TYPES),
        )
    regexes, ignore_merges = _PRE_TYPES.get(pre or "default", _PRE_TYPES["default"])
    backend = Backend(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    if regexes == (_GPT2,):
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE stores scores, not merges. Every way to cut a token into two vocabulary tokens is a
    merge, ranked by the merged token's score (best first), then by the longer left part."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for tok, score in dict(zip(tokens, scores, strict=True)).items():
        cuts = [(tok[:k], tok[k:]) for k in range(1, len(tok)) if tok[:k] in vocab and tok[k:] in vocab]
        cuts.sort(key=lambda c: (vocab[c[0]], vocab[c[1]]))
        ranked.extend((score, len(left), len(right), left, right) for left, right in cuts)
    ranked.sort(key=lambda r: r[:3], reverse=True)  # stable: ties keep vocabulary order
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_bpe(
    tokens: Sequence[str],
    scores: Sequence[float] | None,
    merges: Sequence[str] | None,
    add_space_prefix: bool,
) -> Backend:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    elif scores is not None:
        pairs = _merges_from_scores(tokens, scores)
    else:
        raise ModelLoadError("The GGUF SentencePiece vocabulary has neither merges nor scores.")
    backend = Backend(models.BPE(vocab, pairs, fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _token_at(tokens: Sequence[str], index: Any) -> str | None:
    if index is None:
        return None
    if not isinstance(index, int) or not 0 <= index < len(tokens):
        raise ModelLoadError(
            f"GGUF tokenizer metadata names token id {index!r}, outside the vocabulary of {len(tokens)}."
        )
    return tokens[index]


# --- reading files ---------------------------------------------------------------------------------------


_SURROGATES = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """`text` with lone UTF-16 surrogates (from JSON "\\ud800" escapes, or undecodable bytes in argv, which
    Python maps to U+DC80..U+DCFF) replaced by U+FFFD, as a UTF-8 decoder does: they are not encodable text."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text if text.isascii() else _SURROGATES.sub("\ufffd", text)


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values (str, int, float, bool, lists)."""
    from spillover.loading.gguf_file import read_gguf

    try:
        return read_gguf(path)[0]
    except FileNotFoundError as e:
        raise ModelLoadError(f"GGUF file not found: {path}") from e
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"Cannot read GGUF metadata from {path} (corrupt or truncated file?): {e}"
        ) from e


def has_tokenizer_files(path: str | Path) -> bool:
    """Whether a model directory has a tokenizer `Tokenizer.from_hf_dir` can read (a tokenizer.json).

    A directory with only a SentencePiece tokenizer.model answers False, so the model still loads for token-id
    prompts; `from_hf_dir` on it raises a `ModelLoadError` that says how to convert it."""
    return (Path(path) / "tokenizer.json").is_file()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} should hold a JSON object.")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


def _hf_chat_templates(path: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    templates: dict[str, str] = {}
    raw = config.get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):  # [{"name": ..., "template": ...}, ...]
        templates.update({t["name"]: t["template"] for t in raw if isinstance(t, dict) and "name" in t})
    extra = path / "additional_chat_templates"
    if extra.is_dir():
        templates.update({f.stem: f.read_text(encoding="utf-8") for f in sorted(extra.glob("*.jinja"))})
    legacy = _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(legacy, str):
        templates["default"] = legacy
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        templates["default"] = jinja.read_text(encoding="utf-8")
    if not templates:
        return None
    return templates["default"] if list(templates) == ["default"] else templates


# --- the tokenizer ---------------------------------------------------------------------------------------


class Tokenizer:
    """Encodes text to token ids and back, knows the model's special tokens and renders its chat template.

    Build it with `Tokenizer.from_hf_dir(path)` or `Tokenizer.from_gguf_metadata(fields)`.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        pad_token_id: int | None = None,
        chat_template: str | Mapping[str, str] | None = None,
    ) -> None:
        """`add_bos_token` / `add_eos_token`: None keeps the backend's post-processor (tokenizer.json's own
        rule); a bool replaces it with one that adds BOS / EOS or not."""
        self._backend = backend
        named = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "unk_token": unk_token,
            "pad_token": pad_token,
        }
        self.special_tokens: dict[str, str] = {k: v for k, v in named.items() if v is not None}
        # Named special tokens must be matched whole in text, like the ones the vocabulary marks special.
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in self.special_tokens.values() if t not in added]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

        self.bos_token_id: int | None = self._id_of(bos_token)
        eos_id = self._id_of(eos_token)
        self.eos_token_ids: frozenset[int] = frozenset(
            {*extra_eos_token_ids, *([eos_id] if eos_id is not None else [])}
        )
        self.pad_token_id: int | None = pad_token_id if pad_token_id is not None else self._id_of(pad_token)
        self.unk_token_id: int | None = self._id_of(unk_token)

        if add_bos_token is not None or add_eos_token is not None or backend.post_processor is None:
            self._set_post_processor(
                bool(add_bos_token) and bos_token is not None, bool(add_eos_token), eos_token
            )
        self.add_bos_token: bool = self.bos_token_id is not None and self.encode("")[:1] == [
            self.bos_token_id
        ]

        if isinstance(chat_template, Mapping):
            chat_template = dict(chat_template)
        self.chat_template: str | dict[str, str] | None = chat_template or None
        self._compiled: dict[str, ChatTemplate] = {}

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def _set_post_processor(self, add_bos: bool, add_eos: bool, eos_token: str | None) -> None:
        bos = self.special_tokens.get("bos_token")
        add_eos = add_eos and eos_token is not None
        single = f"{bos}:0 " * add_bos + "$A:0" + f" {eos_token}:0" * add_eos
        pair = single + f" {bos}:1" * add_bos + " $B:1" + f" {eos_token}:1" * add_eos
        specials = [(bos, self.bos_token_id)] * add_bos + [(eos_token, self._id_of(eos_token))] * add_eos
        self._backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials
        )

    # --- constructors ---

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """From a Hugging Face model directory: tokenizer.json, plus tokenizer_config.json, special_tokens_map.json,
        chat_template.jinja / chat_template.json and generation_config.json when present."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            hint = (
                " It has only a SentencePiece tokenizer.model, which spillover does not read: convert it with "
                "transformers (AutoTokenizer.from_pretrained(dir).save_pretrained(dir)) to write tokenizer.json."
                if (path / "tokenizer.model").is_file()
                else ""
            )
            raise ModelLoadError(f"No tokenizer.json in {path}.{hint}")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:
            raise ModelLoadError(
                f"Cannot read the tokenizer {file} (corrupt or from a newer tokenizers?): {e}"
            ) from e
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        generation = _read_json(path / "generation_config.json")
        try:
            templates = _hf_chat_templates(path, config)
        except (OSError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"Cannot read the chat template in {path}: {e}") from e

        def special(name: str) -> str | None:
            return _token_text(config.get(name)) or _token_text(special_map.get(name))

        # tokenizer.json's post-processor decides BOS/EOS, as in transformers 5 (which ignores the config's
        # add_bos_token/add_eos_token when tokenizer.json exists). Without one, the config's flags are all we have.
        use_flags = backend.post_processor is None
        return cls(
            backend,
            bos_token=special("bos_token"),
            eos_token=special("eos_token"),
            unk_token=special("unk_token"),
            pad_token=special("pad_token"),
            add_bos_token=bool(config.get("add_bos_token", False)) if use_flags else None,
            add_eos_token=bool(config.get("add_eos_token", False)) if use_flags else None,
            extra_eos_token_ids=_ids(generation.get("eos_token_id")),
            pad_token_id=generation.get("pad_token_id")
            if isinstance(generation.get("pad_token_id"), int)
            else None,
            chat_template=templates,
        )

    @classmethod
    def from_gguf_metadata(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """From GGUF metadata (see `read_gguf_metadata`): the `tokenizer.ggml.*` keys and `tokenizer.chat_template`."""

        def get(key: str, default: Any = None) -> Any:
            return fields.get(f"tokenizer.ggml.{key}", default)

        kind = get("model")
        tokens = get("tokens")
        if kind is None or tokens is None:
            raise ModelLoadError(
                "The GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)."
            )
        if kind not in SUPPORTED_GGUF_MODELS:
            raise UnsupportedModelError(
                f"GGUF tokenizer type {kind!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_MODELS)}."
            )
        types = get("token_type") or [_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise ModelLoadError(
                f"GGUF tokenizer metadata is inconsistent: {len(tokens)} tokens, {len(types)} types."
            )
        try:
            if kind == "gpt2":
                if get("merges") is None:
                    raise ModelLoadError("The GGUF byte-level BPE vocabulary has no tokenizer.ggml.merges.")
                backend = _byte_level_bpe(tokens, types, get("merges"), get("pre"))
            else:
                backend = _sentencepiece_bpe(
                    tokens, get("scores"), get("merges"), bool(get("add_space_prefix", True))
                )
            special = [
                AddedToken(t, special=True, normalized=False)
                for t, k in zip(tokens, types, strict=True)
                if k in (_CONTROL, _UNKNOWN)
            ]
            user = [
                AddedToken(t, special=False, normalized=False)
                for t, k in zip(tokens, types, strict=True)
                if k == _USER_DEFINED
            ]
            backend.add_special_tokens(special)
            backend.add_tokens(user)
        except (ModelLoadError, UnsupportedModelError):
            raise
        except Exception as e:
            raise ModelLoadError(f"Cannot build the tokenizer from GGUF metadata: {e}") from e

        eos_ids = {
            i for key in ("eos_token_id", "eot_token_id", "eom_token_id") if isinstance(i := get(key), int)
        }
        templates: dict[str, str] = {}
        for key, value in fields.items():
            if key == "tokenizer.chat_template":
                templates["default"] = value
            elif key.startswith("tokenizer.chat_template."):
                templates[key.removeprefix("tokenizer.chat_template.")] = value
        return cls(
            backend,
            bos_token=_token_at(tokens, get("bos_token_id")),
            eos_token=_token_at(tokens, get("eos_token_id")),
            unk_token=_token_at(tokens, get("unknown_token_id")),
            pad_token=_token_at(tokens, get("padding_token_id")),
            # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
            add_bos_token=bool(get("add_bos_token", kind == "llama")),
            add_eos_token=bool(get("add_eos_token", False)),
            extra_eos_token_ids=eos_ids,
            chat_template=templates["default"] if list(templates) == ["default"] else templates,
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Shortcut: `from_gguf_metadata(read_gguf_metadata(path))`."""
        return cls.from_gguf_metadata(read_gguf_metadata(path))

    # --- vocabulary ---

    @property
    def backend(self) -> Backend:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of all special tokens (those `decode(..., skip_special_tokens=True)` drops)."""
        return frozenset(i for i, t in self._backend.get_added_tokens_decoder().items() if t.special)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # --- encode / decode ---

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With `add_special_tokens`, BOS/EOS are added as the model's config says.
        Special tokens written in the text (e.g. "<|im_start|>") are recognised."""
        return self._backend.encode(clean_text(text), add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        texts = [clean_text(t) for t in texts]
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A fresh `StreamDecoder` for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # --- chat ---

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def apply_chat_template(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool = True,
        tools: Sequence[Any] | None = None,
        *,
        chat_template: str | None = None,
        template_name: str | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt string for `messages`, rendered like transformers' `apply_chat_template(tokenize=False)`.

        `chat_template` replaces the model's template; `template_name` picks one of the model's named templates
        (by default "tool_use" when tools are given and the model has it, else "default"). `kwargs` become
        template variables (e.g. `enable_thinking=False`; they override bos_token / eos_token / ...).
        Raises `ConfigError` when the model has no chat template or the template rejects the messages."""
        source = chat_template or select_template(self.chat_template, tools, template_name)
        if source not in self._compiled:
            self._compiled[source] = ChatTemplate(source)
        variables = {**self.special_tokens, **kwargs}
        return self._compiled[source].render(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, **variables
        )

    def encode_chat(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool = True,
        tools: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of the rendered chat (same arguments as `apply_chat_template`). The template writes the
        special tokens it wants (BOS included) as text, so nothing is added on top: like transformers, the
        prompt is encoded with `add_special_tokens=False`."""
        prompt = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs
        )
        return self.encode(prompt, add_special_tokens=False)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos_ids={sorted(self.eos_token_ids)}, "
            f"add_bos={self.add_bos_token}, chat_template={self.has_chat_template})"
        )


class StreamDecoder:
    """Turns generated token ids, fed one at a time, into text pieces that are safe to show.

    Text is only released once it is complete: a token that ends inside a UTF-8 character (byte-level BPE,
    or SentencePiece `<0xNN>` byte tokens) is held until the character is finished. The pieces joined,
    with `flush()` at the end, equal `tokenizer.decode(all_ids)`.

    Each step decodes a short window: from the start of the last released piece to the end. The window's
    first token is decoded in both the "before" and "after" text, so rules that apply to the first token
    only (SentencePiece drops the leading space of the text) cancel out.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: the start of the last released piece
        self._read = 0  # ids before this have been released as text

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self.ids[start:end], skip_special_tokens=self._skip)

    def _release(self, force: bool) -> str:
        before = self._decode(self._prefix, self._read)
        after = self._decode(self._prefix)
        if len(after) > len(before) and (force or not after.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "", e.g. in the middle of an emoji)."""
        self.ids.append(token_id)
        return self._release(force=False)

    def extend(self, token_ids: Iterable[int]) -> str:
        """Add several tokens at once; return the text they complete."""
        self.ids.extend(token_ids)
        return self._release(force=False)

    def flush(self) -> str:
        """At the end of the sequence: whatever is still held back (an unfinished character decodes to U+FFFD)."""
        return self._release(force=True)

    @property
    def pending(self) -> bool:
        """Whether some ids have not been turned into text yet."""
        return self._read < len(self.ids)


IncrementalDetokenizer = StreamDecoder
