"""Tokenizer parity with transformers: the real SmolLM2 GGUF (byte-level BPE), a tiny SentencePiece GGUF built
here, and a Hugging Face directory written by transformers' save_pretrained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _tok_helpers import train_sentencepiece, write_spm_gguf

from spillover.errors import ConfigError, ModelLoadError, UnsupportedModelError
from spillover.loading.tokenizer import (
    SUPPORTED_GGUF_PRE_TYPES,
    StreamDecoder,
    Tokenizer,
    has_tokenizer_files,
    read_gguf_metadata,
)

TEXTS = [
    "The capital of France is Paris. It has been since 987 AD, or so they say.",
    "Héllo wörld, naïve café, Ærøskøbing, Straße, señor",
    "日本語のテキストと中文文本，还有한국어。",
    "emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "combining marks: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",
    "def f(x):\n\tif x:\n\t\treturn  x * 2\n    else:\n        pass\n",
    "runs of spaces:     and   newlines\n\n\n\nand\r\nwindows\tand tabs\t\t",
    "   leading and trailing spaces   ",
    "numbers: 3.14159 1,000,000 -42 2024-06-01 0x1F 1e-9",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|>",
    "",
    " ",
    "\n",
    "Don't you'll they've I'm we'd it's",
    "https://example.com/path?q=1&r=2#frag <html><body>&amp;</body></html>",
]


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    dec = StreamDecoder(tok, skip_special_tokens=skip_special_tokens)
    pieces = [dec.push(i) for i in ids]
    return [*pieces, dec.flush()]


# --- SmolLM2 GGUF (byte-level BPE, pre type "smollm") ----------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_encode_decode_like_transformers(smol, smol_ref, text):
    ids = smol.encode(text)
    assert ids == smol_ref.encode(text)
    assert smol.encode(text, add_special_tokens=False) == smol_ref.encode(text, add_special_tokens=False)
    assert smol.decode(ids, skip_special_tokens=False) == smol_ref.decode(ids) == text
    assert smol.decode(ids) == smol_ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_stream_decode_equals_full_decode(smol, text):
    ids = smol.encode(text)
    for skip in (True, False):
        pieces = stream(smol, ids, skip)
        assert "".join(pieces) == smol.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)


def test_smollm2_stream_holds_back_split_emoji(smol):
    ids = smol.encode("ok 👨‍👩‍👧 🤖")
    assert len(ids) > len(smol.decode(ids))  # several byte tokens per emoji
    dec = smol.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "" in pieces  # some tokens end inside a character and were held back
    assert "".join(pieces) + dec.flush() == "ok 👨‍👩‍👧 🤖"


def test_stream_flush_releases_an_unfinished_character(smol):
    ids = smol.encode("🤖")
    dec = smol.stream_decoder()
    assert [dec.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.pending
    tail = dec.flush()
    assert tail == smol.decode(ids[:-1]) and tail.endswith("\ufffd")


def test_smollm2_special_ids(smol, smol_ref):
    assert smol.vocab_size == len(smol_ref) == 49152
    assert smol.bos_token_id == smol_ref.bos_token_id == 1
    assert smol.eos_token_ids == {2}
    assert smol.pad_token_id == smol_ref.pad_token_id == 2
    assert smol.special_ids == set(smol_ref.all_special_ids) | set(range(17))
    assert smol.add_bos_token is False
    assert smol.encode("<|im_start|>") == [1]
    assert smol.decode([1, 28120, 2]) == "hello"


def test_smollm2_eos_includes_eot_and_eom(smol_meta):
    tok = Tokenizer.from_gguf_metadata(
        {**smol_meta, "tokenizer.ggml.eot_token_id": 0, "tokenizer.ggml.eom_token_id": 5}
    )
    assert tok.eos_token_ids == {0, 2, 5}


def test_gguf_add_bos_token_flag(smol_meta):
    tok = Tokenizer.from_gguf_metadata({**smol_meta, "tokenizer.ggml.add_bos_token": True})
    assert tok.add_bos_token
    assert tok.encode("hi") == [1, *tok.encode("hi", add_special_tokens=False)]
    assert tok.encode("") == [1]
    # The chat template writes its own specials: nothing is added on top.
    assert tok.encode_chat([{"role": "user", "content": "hi"}]) == tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "hi"}]), add_special_tokens=False
    )


@pytest.mark.parametrize("pre", SUPPORTED_GGUF_PRE_TYPES)
def test_every_pre_tokenizer_type_round_trips(smol_meta, pre):
    tok = Tokenizer.from_gguf_metadata({**smol_meta, "tokenizer.ggml.pre": pre})
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_unknown_pre_tokenizer_falls_back_to_gpt2(smol_meta, caplog):
    tok = Tokenizer.from_gguf_metadata({**smol_meta, "tokenizer.ggml.pre": "no-such-pre"})
    assert "no-such-pre" in caplog.text
    assert tok.decode(tok.encode(TEXTS[0])) == TEXTS[0]


def test_smollm2_from_hf_dir_matches_gguf(smol, smol_ref, tmp_path):
    smol_ref.save_pretrained(tmp_path)
    assert has_tokenizer_files(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == smol.encode(text)
        assert tok.decode(smol.encode(text)) == smol.decode(smol.encode(text))
    assert tok.bos_token_id == 1 and tok.eos_token_ids == {2} and tok.pad_token_id == 2
    assert tok.special_ids == smol.special_ids
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(chat) == smol.apply_chat_template(chat)
    assert (
        tok.encode_chat(chat) == smol_ref.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    )


def test_from_hf_dir_generation_config_and_add_bos(smol_ref, tmp_path):
    transformers = pytest.importorskip("transformers")
    smol_ref.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2], "pad_token_id": 0}))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.eos_token_ids == {0, 2}
    assert tok.pad_token_id == 0
    # tokenizer.json has a post-processor (adding nothing): like transformers 5, it wins over the config flag.
    assert not tok.add_bos_token
    assert (
        tok.encode("hello") == transformers.AutoTokenizer.from_pretrained(tmp_path).encode("hello") == [28120]
    )
    # One that adds BOS.
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.add_bos_token
    assert (
        tok.encode("hello")
        == transformers.AutoTokenizer.from_pretrained(tmp_path).encode("hello")
        == [1, 28120]
    )
    assert tok.encode("hello", add_special_tokens=False) == [28120]
    # No post-processor at all: the config's flag decides.
    data["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert Tokenizer.from_hf_dir(tmp_path).encode("hello") == [1, 28120]


def test_from_hf_dir_chat_template_in_tokenizer_config(smol_ref, tmp_path):
    smol_ref.save_pretrained(tmp_path)
    template = (tmp_path / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    assert Tokenizer.from_hf_dir(tmp_path).chat_template == template


# --- a SentencePiece-style ("llama") GGUF ----------------------------------------------------------------

SPM_TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "café naïve über Straße 東京 日本語",
    "unseen letters: ζ ж ॐ and emoji 😀🤖",
    "12345 print(x) return",
    "a\nb\n\n c\tdef",
    "  two leading spaces",
    " ",
    "",
    "x<tool>y <|end|> z</s>",
]


@pytest.fixture(scope="module")
def spm_files(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    sp = train_sentencepiece()
    path = write_spm_gguf(tmp_path_factory.mktemp("spm") / "tiny.gguf", sp)
    return sp, path


@pytest.fixture(scope="module")
def spm_tok(spm_files) -> Tokenizer:
    return Tokenizer.from_gguf(spm_files[1])


@pytest.fixture(scope="module")
def spm_ref(spm_files):
    """transformers' tokenizer from the same tokenizer-only GGUF (it loads without the model's tensors)."""
    transformers = pytest.importorskip("transformers")
    path = spm_files[1]
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_spm_reads_special_tokens(spm_tok, spm_files):
    sp, _ = spm_files
    assert spm_tok.vocab_size == sp.get_piece_size()
    assert spm_tok.bos_token_id == sp.bos_id() and spm_tok.eos_token_ids == {sp.eos_id()}
    assert spm_tok.add_bos_token
    assert spm_tok.special_ids == {sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.piece_to_id("<|end|>")}


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_spm_gguf_like_transformers(spm_tok, spm_ref, text):
    ref = spm_ref
    ids = spm_tok.encode(text)
    assert ids == ref.encode(text)
    assert spm_tok.decode(ids, skip_special_tokens=False) == ref.decode(ids)
    assert spm_tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", [t for t in SPM_TEXTS if t and not t.startswith(" ") and "<" not in t])
def test_spm_gguf_like_sentencepiece(spm_tok, spm_files, text):
    # SentencePiece itself agrees except on text starting with spaces (transformers, which we follow, puts one
    # "▁" fewer there) and on special tokens written in the text (SentencePiece never matches those).
    sp = spm_files[0]
    ids = spm_tok.encode(text, add_special_tokens=False)
    assert ids == sp.encode(text)
    assert spm_tok.decode(ids) == sp.decode(ids) == text


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_spm_stream_decode_equals_full_decode(spm_tok, text):
    ids = spm_tok.encode(text) + spm_tok.encode(text, add_special_tokens=False)
    pieces = stream(spm_tok, ids)
    assert "".join(pieces) == spm_tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_spm_stream_byte_fallback_and_leading_space(spm_tok):
    ids = spm_tok.encode(" 🤖 hello world", add_special_tokens=False)
    pieces = stream(spm_tok, ids)
    assert "" in pieces  # the <0xNN> byte tokens of the emoji were held until the character was complete
    assert "".join(pieces) == spm_tok.decode(ids)


def test_spm_without_space_prefix(spm_files):
    meta = read_gguf_metadata(spm_files[1])
    tok = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.add_space_prefix": False})
    ids = tok.encode("hello world", add_special_tokens=False)
    assert tok.id_to_token(ids[0]).startswith("h")
    assert tok.decode(ids) == "hello world"


# --- errors ----------------------------------------------------------------------------------------------


def test_unknown_tokenizer_model_is_unsupported(smol_meta):
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        Tokenizer.from_gguf_metadata({**smol_meta, "tokenizer.ggml.model": "bert"})


def test_gguf_without_tokenizer(smol_meta):
    fields = {k: v for k, v in smol_meta.items() if not k.startswith("tokenizer.")}
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata(fields)


def test_inconsistent_gguf_tokenizer_metadata(smol_meta):
    with pytest.raises(ModelLoadError, match="inconsistent"):
        Tokenizer.from_gguf_metadata({**smol_meta, "tokenizer.ggml.token_type": [1, 1]})
    with pytest.raises(ModelLoadError, match="outside the vocabulary"):
        Tokenizer.from_gguf_metadata({**smol_meta, "tokenizer.ggml.eos_token_id": 10**6})
    with pytest.raises(ModelLoadError, match="merges"):
        Tokenizer.from_gguf_metadata({k: v for k, v in smol_meta.items() if k != "tokenizer.ggml.merges"})


def test_corrupt_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        read_gguf_metadata(bad)
    with pytest.raises(ModelLoadError, match="not found"):
        read_gguf_metadata(tmp_path / "missing.gguf")


def test_missing_and_corrupt_tokenizer_dir(smol_ref, tmp_path):
    assert not has_tokenizer_files(tmp_path)
    with pytest.raises(ModelLoadError, match="No tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    assert not has_tokenizer_files(tmp_path)  # unreadable for us: the model loads for token-id prompts only
    with pytest.raises(ModelLoadError, match="tokenizer.model"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    assert has_tokenizer_files(tmp_path)
    with pytest.raises(ModelLoadError, match="Cannot read the tokenizer"):
        Tokenizer.from_hf_dir(tmp_path)
    good = tmp_path / "good"
    smol_ref.save_pretrained(good)
    (good / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        Tokenizer.from_hf_dir(good)


def test_no_chat_template_is_a_config_error(smol_ref, tmp_path):
    smol_ref.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert not tok.has_chat_template
    with pytest.raises(ConfigError, match="raw"):
        tok.encode_chat([{"role": "user", "content": "hi"}])
    shutil.rmtree(tmp_path)
    assert not has_tokenizer_files(Path(tmp_path))
