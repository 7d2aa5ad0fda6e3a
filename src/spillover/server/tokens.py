"""Token ids as the API shows them in logprobs: a string and its raw UTF-8 bytes."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_map() -> dict[str, int]:
    from spillover.loading.tokenizer import _BYTE_CHARS

    return {c: b for b, c in enumerate(_BYTE_CHARS)}


class TokenTexts:
    """Cached `bytes_of(id)` and `text_of(id)` for one tokenizer (byte-level BPE or SentencePiece)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        from tokenizers import decoders

        self._byte_level = isinstance(tokenizer.backend.decoder, decoders.ByteLevel)
        self._map = _byte_level_map() if self._byte_level else {}
        # read once: the property rebuilds the set (Gemma 3 has ~6k added tokens)
        self._special = tokenizer.special_ids
        self.bytes_of = lru_cache(maxsize=1 << 16)(self._bytes)

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._special:
            return piece.encode()
        if self._byte_level and all(c in self._map for c in piece):
            return bytes(self._map[c] for c in piece)
        m = _BYTE_TOKEN.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def text_of(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")
