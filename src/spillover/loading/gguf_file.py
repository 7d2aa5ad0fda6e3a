"""A fast GGUF header reader: metadata and tensor infos parsed from one read of the header, tensor data
memory-mapped. (gguf.GGUFReader builds a numpy view per field part, which takes seconds on a 50k-token
vocabulary; this takes milliseconds.)
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from spillover.errors import ModelLoadError

# GGUF metadata value types
_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
       10: np.uint64, 11: np.int64, 12: np.float64}  # fmt: skip
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (reversed ggml ne)
    ggml_type: int
    offset: int  # absolute file offset of the data
    nbytes: int


_U64 = struct.Struct("<Q")


class _Buf:
    def __init__(self, data: bytes) -> None:
        self.b, self.i = data, 0

    def unpack(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self.b, self.i)[0]
        self.i += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        s = self.b[self.i : self.i + n]
        if len(s) != n:
            raise EOFError
        self.i += n
        return s.decode("utf-8", errors="replace")

    def _strings(self, n: int) -> list[str]:
        b, i, end, out, length = self.b, self.i, len(self.b), [], _U64.unpack_from
        for _ in range(n):
            (k,) = length(b, i)
            i += 8
            if i + k > end:
                raise EOFError
            out.append(b[i : i + k].decode("utf-8", errors="replace"))
            i += k
        self.i = i
        return out

    def value(self, t: int) -> Any:
        if t in _SCALAR:
            return self.unpack(_SCALAR[t])
        if t == _STRING:
            return self.string()
        if t == _ARRAY:
            et, n = self.unpack("<I"), self.unpack("<Q")
            if et in _NP:
                arr = np.frombuffer(self.b, dtype=_NP[et], count=n, offset=self.i)
                self.i += arr.nbytes
                return arr.tolist()
            if et == _STRING:  # a tokenizer's ~100k strings: one tight loop (3x the method calls' speed)
                return self._strings(n)
            return [self.value(et) for _ in range(n)]
        raise ValueError(f"unknown GGUF value type {t}")


GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q8_1": (9, 32, 40),
    "Q2_K": (10, 256, 84),
    "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
    "Q8_K": (15, 256, 292),
    "IQ2_XXS": (16, 256, 66),
    "IQ2_XS": (17, 256, 74),
    "IQ3_XXS": (18, 256, 98),
    "IQ1_S": (19, 256, 50),
    "IQ4_NL": (20, 32, 18),
    "IQ3_S": (21, 256, 110),
    "IQ2_S": (22, 256, 82),
    "IQ4_XS": (23, 256, 136),
    "I8": (24, 1, 1),
    "I16": (25, 1, 2),
    "I32": (26, 1, 4),
    "I64": (27, 1, 8),
    "F64": (28, 1, 8),
    "IQ1_M": (29, 256, 56),
    "BF16": (30, 1, 2),
    "TQ1_0": (34, 256, 54),
    "TQ2_0": (35, 256, 66),
    "MXFP4": (39, 32, 17),
    "NVFP4": (40, 64, 36),
    "Q1_0": (41, 128, 18),
}  # fmt: skip
"""GGML storage types: name -> (type id, elements per block, bytes per block), as in the `gguf` package's
GGML_QUANT_SIZES (gguf 0.18). Kept here so that opening a GGUF does not import `gguf` (0.2 s of start-up:
its writer, metadata and yaml modules)."""

GGMLType = IntEnum("GGMLType", {k: v[0] for k, v in GGML_TYPES.items()})
"""A GGML type id with its name (`GGMLType(8).name == "Q8_0"`); `int()` of it is gguf's GGMLQuantizationType."""
_SIZES = {v[0]: v[1:] for v in GGML_TYPES.values()}


def read_gguf(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensor], np.memmap]:
    """Parse a GGUF file's metadata and tensor infos; return (metadata, tensors, memmap of the file)."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:  # parsed through a map: only the header's pages are read (a bytes copy
            head = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # of 64 MiB was the load's peak)
        buf = _Buf(head)
        if buf.b[:4] != b"GGUF":
            raise ValueError("missing GGUF magic")
        buf.i = 4
        version = buf.unpack("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        n_tensors, n_kv = buf.unpack("<Q"), buf.unpack("<Q")
        md: dict[str, Any] = {}
        for _ in range(n_kv):
            key = buf.string()
            md[key] = buf.value(buf.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = buf.string()
            nd = buf.unpack("<I")
            ne = [buf.unpack("<Q") for _ in range(nd)]
            infos.append((name, ne, buf.unpack("<I"), buf.unpack("<Q")))
        align = int(md.get("general.alignment", 32))
        data_start = -(-buf.i // align) * align
    except (struct.error, EOFError, ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not a valid GGUF file (corrupt or truncated header): {e}") from None
    tensors = []
    for name, ne, t, off in infos:
        try:
            block, type_size = _SIZES[t]
        except KeyError:
            raise ModelLoadError(f"{path}: tensor {name} has unknown GGML type {t}") from None
        numel = int(np.prod(ne)) if ne else 1
        nbytes = numel // block * type_size
        start = data_start + off
        if start + nbytes > size:
            raise ModelLoadError(
                f"{path} is truncated: tensor {name} ends at byte {start + nbytes} but the file has {size}; "
                "download it again"
            )
        tensors.append(GGUFTensor(name, tuple(int(x) for x in reversed(ne)), t, start, nbytes))
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    return md, tensors, mm


def tensor_data(mm: np.memmap, t: GGUFTensor) -> np.ndarray:
    """The raw bytes of a tensor, as a numpy view (typed for f32/f16/bf16)."""
    raw = mm[t.offset : t.offset + t.nbytes]
    if t.ggml_type == 0:  # F32
        return raw.view(np.float32)
    if t.ggml_type == 1:  # F16
        return raw.view(np.float16)
    return raw
