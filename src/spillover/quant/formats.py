"""Storage formats: bytes per element of plain dtypes, and what in-situ quantization (ISQ) really stores.

Pure functions, no torch: the planner counts bytes with them before any weight is read, and the quantizer
allocates exactly the tensors `isq_stored_tensors` names, so the plan and the loaded model agree.

ISQ formats (applied to the linear projections inside decoder layers, and as isq 8 to an untied lm_head:
`ISQ_HEAD_BITS`; embeddings, norms and biases keep the model dtype):
- isq 8: int8 weight-only, asymmetric, groups of `INT8_GROUP_SIZE` consecutive input features, one f16 scale
  and one f16 offset per (row, group): 36 bytes per 32 weights. Stored: `qweight` uint8 [out, G*32] (codes
  0..255, input zero-padded to whole groups), `scale` f16 [out, G], `offset` f16 [out, G].
  w ~= qweight * scale + offset (per group). A CPU layer with the C kernels holds the same bytes as GGUF
  Q8_0 blocks (scale and codes - 128: `qweight` uint8 [out, G*34]) and `offset` (quant/isq.Int8Linear).
- isq 4: int4, asymmetric, groups of `INT4_GROUP_SIZE` consecutive input features; one bf16 scale and one bf16
  zero per (row, group). Two 4-bit values per byte: element 2j in the low nibble, 2j+1 in the high nibble.
  The input dimension is zero-padded to a whole number of groups (so every group has 32 values and
  every row packs to whole bytes). Stored: `qweight` uint8 [out, G*16], `scale` bf16 [out, G],
  `zero` bf16 [out, G] with G = ceil(in / 32).  w ~= (q - zero) * scale
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from spillover.errors import ConfigError

DTYPE_BYTES: dict[str, int] = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "i64": 8, "i32": 4, "i8": 1, "u8": 1}
"""Bytes per element of the plain (unquantized) storage types, by spillover's short names."""

ISQ_BITS = (4, 8)
"""The ISQ widths spillover implements."""

INT4_GROUP_SIZE = 32
"""Input features per int4 group. 32 matches GGUF's Q4 blocks: small enough that one outlier spoils only 32
weights, large enough that scale + zero (4 bytes) add 1 bit per weight (4.0 -> 5.0 bits)."""

INT8_GROUP_SIZE = 32
"""Input features per int8 group (GGUF's block). On SmolLM2's Q4_1 weights (CPU, f32, top-1 agreement with
f32 over 644 tokens): one scale per row 94.1%, symmetric groups of 32 (Q8_0) 95.2% (97.7% with a search over
scales), groups of 32 with an offset 99.2%, 100% with the grid's own step (quant/isq.quantize_int8_groups):
the offset holds a Q4 grid's. 1 bit per weight more than rows."""

Q8_0_BLOCK_BYTES = 34
"""Bytes of one GGUF Q8_0 block: its f16 scale and 32 int8 codes (isq 8's CPU layout, beside the offsets)."""

SCALE_BYTES = 2
"""Scales and zeros are bf16: wide exponent range (no overflow for large rows), half the bytes of f32."""

GGUF_QUANT_PREFIXES = ("q", "iq", "tq")
"""GGUF storage types that are block-quantized (q4_0, q4_k, iq2_xs, tq1_0, ...): they are dequantized on load."""


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a plain dtype ("bf16" -> 2). Raises ConfigError for unknown names."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_BYTES)}") from None


def is_block_quantized(storage_dtype: str) -> bool:
    """True for GGUF block-quantized storage types (they are dequantized to the model dtype on load)."""
    return storage_dtype.lower().startswith(GGUF_QUANT_PREFIXES)


ISQ_HEAD_BITS = 8
"""With ISQ (4 or 8), an untied lm_head is stored as isq 8 (int8, groups of 32), as mistral.rs's ISQ
quantizes lm_head too. It is the largest single matrix (1.05 GB of Llama-3-8B's bf16 weights): int8 halves its
bytes on whatever device holds it (at `--isq 4 --max-memory cuda:0=4GiB`, room for four more int4 layers) and
its per-token read, and 8 bits, not 4, keep the logits close (the head decides the token). A tied head shares
the embedding matrix and keeps the model dtype."""

ISQ_FORMATS = {
    4: "int4, groups of 32 along the input, bf16 scale and zero (asymmetric; the layout of GGUF Q4_1)",
    8: "int8, groups of 32 along the input, f16 scale and offset (asymmetric)",
}
"""What each ISQ width stores (quant/isq.py)."""

ISQ_NAMES: dict[str, int] = {
    "4": 4, "int4": 4, "q4": 4, "8": 8, "int8": 8, "q8": 8,
    # mistral.rs ISQ type names, each mapped to the spillover format nearest in bits (never fewer than 4)
    "q4_0": 4, "q4_1": 4, "q4k": 4, "q2k": 4, "q3k": 4, "hqq4": 4, "afq2": 4, "afq3": 4, "afq4": 4,
    "q5_0": 8, "q5_1": 8, "q5k": 8, "q6k": 8, "afq6": 8,
    "q8_0": 8, "q8_1": 8, "q8k": 8, "hqq8": 8, "afq8": 8, "fp8": 8,
}  # fmt: skip
"""--isq values (case-insensitive) -> the ISQ width that runs them. 5- and 6-bit types run as int8: the nearest
format spillover has that is at least as accurate."""


def parse_isq(value: str | int | None) -> int | None:
    """--isq / SDK `isq=` -> 4, 8 or None. Accepts the bits (4, 8), mistral.rs type names (q4k, Q8_0, ...,
    see ISQ_NAMES) and "none". Unknown names raise ConfigError with the accepted list."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    text = str(value).strip().lower()
    if isinstance(value, bool) or text not in ISQ_NAMES:
        raise ConfigError(f"--isq {value!r} is not a known quantization; use one of: {', '.join(ISQ_NAMES)}")
    return ISQ_NAMES[text]


def isq_note(value: str | int | None) -> str | None:
    """The plan's line saying which format an --isq value runs as (None without ISQ)."""
    bits = parse_isq(value)
    if bits is None:
        return None
    text = str(value).strip().lower()
    named = "" if text in ("4", "8", "int4", "int8", "q4", "q8") else f" (nearest spillover format to {text})"
    return f"--isq {value}: {ISQ_FORMATS[bits]}{named}"


def isq_stored_tensors(shape: tuple[int, ...], bits: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors ISQ stores for a linear weight of `shape` (out, in): name -> (shape, dtype)."""
    if len(shape) != 2:
        raise ValueError(f"ISQ applies to 2-D linear weights, got shape {shape}")
    out, inp = shape
    if bits == 8:
        groups = math.ceil(inp / INT8_GROUP_SIZE)
        return {
            "qweight": ((out, groups * INT8_GROUP_SIZE), "u8"),
            "scale": ((out, groups), "f16"),
            "offset": ((out, groups), "f16"),
        }
    if bits == 4:
        groups = math.ceil(inp / INT4_GROUP_SIZE)
        return {
            "qweight": ((out, groups * INT4_GROUP_SIZE // 2), "u8"),
            "scale": ((out, groups), "bf16"),
            "zero": ((out, groups), "bf16"),
        }
    raise ConfigError(f"ISQ supports {' or '.join(map(str, ISQ_BITS))} bits, got {bits}")


CPU_INT4_DENSE_COPY = True
"""A 4-bit layer that runs on the CPU also keeps its projections as dense bf16, when the map streams no layer
to a GPU. torch's int4 CPU kernel reads half a byte per weight (decode: 1.8x the f32 tokens/s on SmolLM2) but
its cost grows linearly with the rows of the input (no AMX tiles): a 128-token prefill through it ran 6x
slower than a dense bf16 matmul. So prompts (more than `INT4_KERNEL_MAX_ROWS` rows) use the bf16 copy and its
AMX/AVX-512 GEMM. Memory: 0.625 + 2 bytes per weight on the CPU, still less than the 4 of f32.
When the map streams layers to a GPU, long prompts stream the CPU-computed layers too (engine/offload.py):
their int4 bytes go over PCIe and are dequantized on the GPU (quant/isq.unpack_cpu_int4), so no copy is kept
(0.625 bytes per weight on the CPU; the copy would quadruple the staging buffers and the bytes moved)."""

INT4_KERNEL_MAX_ROWS = 16
"""Inputs up to this many rows (decode batches) go through the int4 kernel; larger ones (prefill chunks)
through the dense bf16 copy. Measured crossover on a 2-core Sapphire Rapids: int4 wins at 8 rows
(11.5 vs 16.8 ms for 60 projections), loses at 32 (40.9 vs 19.4 ms)."""


UNPACK_CHUNK_ELEMENTS = 1 << 22
"""Weights dequantized at a time from the CPU int4 layout on a GPU (quant/isq.unpack_cpu_int4): about 30 MiB
of transients beside the dense output, inside the allocator slack every device that runs layers reserves."""

DEQUANT_CHUNK_ELEMENTS = 1 << 25
"""A quantized weight larger than this (int8 and int4 ISQ, an int8 lm_head, a CPU int4 layer streamed to a GPU)
is dequantized for a prompt's GEMM this many weights at a time (64 MiB in bf16; quant/isq.chunked_mm), not
whole (Llama-3-8B's gate_up: 224 MiB, beside its 112 MiB output at 2048 tokens). The chunks' GEMMs stay large
([2048 x 4096] x [4096 x 8192] for that gate_up)."""

QUANT_CHUNK_ELEMENTS = 1 << 24
"""Weights quantized at a time (quant/isq.py, whole rows): the f32 transients of one chunk are 64 MiB a copy,
not the whole weight's."""

QUANT_TRANSIENT_COPIES = 4
"""f32 copies of one chunk alive at once while quantizing (the chunk, its codes, pads and reductions)."""


def quant_transient_nbytes() -> int:
    """Peak transient bytes of quantizing one weight (beside the weight itself), on the work device."""
    return QUANT_TRANSIENT_COPIES * QUANT_CHUNK_ELEMENTS * 4


def cpu_extra_nbytes(shape: tuple[int, ...], bits: int) -> int:
    """Extra bytes an ISQ projection keeps when its layer runs on the CPU in a map that streams nothing
    (see CPU_INT4_DENSE_COPY)."""
    return math.prod(shape) * 2 if bits == 4 and CPU_INT4_DENSE_COPY else 0


def quantized_nbytes(shape: tuple[int, ...], bits: int) -> int:
    """Bytes ISQ really stores for a linear weight of `shape` (out, in), scales and zeros included."""
    return sum(math.prod(s) * dtype_bytes(dt) for s, dt in isq_stored_tensors(shape, bits).values())


def plain_nbytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of a dense tensor of `shape` in `dtype`."""
    return math.prod(shape) * dtype_bytes(dtype)


# ------------------------------------------------------------------ GGUF blocks kept quantized (no --dtype, no --isq)

GGUF_BLOCKS: dict[str, tuple[int, int]] = {
    "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q8_0": (32, 34),
    "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210),
}  # fmt: skip
"""GGUF block types spillover keeps quantized somewhere -> (weights, bytes) per block: the types the C CPU kernels
read (quant/gguf_cpu.c)."""

GGUF_CPU_SOURCE = Path(__file__).with_name("gguf_cpu.c")
"""The C kernels that read those blocks on the CPU: built and loaded by quant/gguf_kernels.py, built without torch
for `spillover plan` (placement/resolve.gguf_keep)."""

GGUF_CPU_INT4_TYPES = ("q4_0", "q4_1")
"""Without the C kernels (no compiler), the CPU keeps only these, through torch's int4 kernel
(quant/gguf_native.GGUFInt4Linear: codes two a byte, a bf16 (scale, zero) pair per 32: 0.625 bytes a weight)."""

GGUF_GPU_INT4_TYPES = ("q4_0", "q4_1", "q4_k")
"""Block types a GPU keeps as int4 (quant/gguf_gpu.py), when every part of a projection is one of them."""

GGUF_GPU_TYPES = (*GGUF_GPU_INT4_TYPES, "q5_0", "q5_k", "q8_0", "q6_k")
"""Block types a GPU keeps: int4 as above, else int8 (in groups of 16 where a part is Q6_K: `gguf_int8_group`)."""

GGUF_ZERO_CODES: dict[str, int] = {"q4_0": 8, "q5_0": 16, "q6_k": 32, "q8_0": 128}
"""The symmetric block types (w = d (q - z) with one fixed z, no min) -> the code z of weight 0. On a GPU an
int8 projection whose parts are all of these drops its offsets: codes q + 128 - z, w = s (c - 128)
(`gguf_int8_symmetric`)."""

GGUF_ROW_TILE = 16
"""A kept projection's rows (its parts' summed) are a multiple of this (torch's int4 CPU kernel's tile)."""


@dataclass(frozen=True)
class GGUFKeep:
    """Which of a GGUF's weights stay quantized: the default mode of a GGUF (`--dtype auto`, no `--isq`, one
    process). `cpu_kernels`: whether the C kernels of quant/gguf_cpu.c are built (else torch's int4 kernel)."""

    cpu_kernels: bool = True

    def cpu_types(self) -> tuple[str, ...]:
        return tuple(GGUF_BLOCKS) if self.cpu_kernels else GGUF_CPU_INT4_TYPES


def gguf_gpu_bits(qtypes: list[str] | tuple[str, ...]) -> int | None:
    """The width a projection whose parts are stored as `qtypes` is kept in on a GPU: 4, 8, or None."""
    if all(q in GGUF_GPU_INT4_TYPES for q in qtypes):
        return 4
    return 8 if all(q in GGUF_GPU_TYPES for q in qtypes) else None


def gguf_int8_group(qtypes: list[str] | tuple[str, ...]) -> int:
    """Weights per f16 scale and offset of a projection a GPU keeps as int8: 16 where a part is Q6_K (a scale
    per 16 weights: w = d sc (q - 32), exact but for f16's rounding of d sc), else 32."""
    return 16 if "q6_k" in qtypes else 32


def gguf_int8_symmetric(qtypes: list[str] | tuple[str, ...]) -> bool:
    """Whether a projection a GPU keeps as int8 holds no offsets (each is -128 times its scale): every part is
    of a symmetric type (`GGUF_ZERO_CODES`)."""
    return all(q in GGUF_ZERO_CODES for q in qtypes)


def gguf_int8_nbytes(out: int, inp: int, qtypes: list[str] | tuple[str, ...]) -> int:
    """Bytes of a GGUF weight [out, inp] of parts `qtypes` a GPU keeps as int8: the codes, an f16 scale per
    group (`gguf_int8_group`) and an f16 offset unless symmetric: 1.0625 / 1.125 bytes a weight in groups of
    32, 1.125 / 1.25 in groups of 16."""
    per_group = 2 if gguf_int8_symmetric(qtypes) else 4
    return out * inp + out * (inp // gguf_int8_group(qtypes)) * per_group


def gguf_block_nbytes(shape: tuple[int, ...], qtype: str) -> int:
    """Bytes of a tensor of `shape` stored as GGUF blocks of `qtype` (rows of whole blocks)."""
    weights, nbytes = GGUF_BLOCKS[qtype]
    return math.prod(shape) // weights * nbytes


def gguf_kept(parts: list[tuple[tuple[int, ...], str]], types: tuple[str, ...]) -> bool:
    """Whether a projection of these (shape, type) parts, stacked along the output, can be kept as blocks of
    `types` (quant/gguf_native.native_parts: whole blocks per row, rows in tiles of 16)."""
    return (
        all(q in types and len(s) == 2 and s[-1] % GGUF_BLOCKS[q][0] == 0 for s, q in parts)
        and sum(s[0] for s, _ in parts) % GGUF_ROW_TILE == 0
    )


def gguf_projection_nbytes(parts: list[tuple[tuple[int, ...], str]], kind: str, keep: GGUFKeep) -> int | None:
    """Bytes the default mode of a GGUF holds for one layer projection (its (shape, type) parts stacked along
    the output: a fused q/k/v or gate/up) on a device of `kind` ("cpu" or a GPU), or None where it is
    dequantized to the model dtype. CPU with the C kernels: the file's blocks (a Q4_0 part fused with Q4_1
    ones rewritten as Q4_1, quant/gguf_native.fused_raw); CPU without: 0.625 bytes a weight (Q4_0 / Q4_1 only);
    GPU: int4 or int8 in ISQ's plain layouts with f16 scales (quant/gguf_gpu.py; int8 of symmetric types only
    without offsets: `gguf_int8_nbytes`)."""
    out, inp = sum(s[0] for s, _ in parts), parts[0][0][-1]
    if kind == "cpu":
        if not gguf_kept(parts, keep.cpu_types()):
            return None
        if not keep.cpu_kernels:  # GGUFInt4Linear: ISQ's int4 layout
            return quantized_nbytes((out, inp), 4)
        if {q for _, q in parts} == {"q4_0", "q4_1"}:
            return gguf_block_nbytes((out, inp), "q4_1")
        return sum(gguf_block_nbytes(s, q) for s, q in parts)
    bits = gguf_gpu_bits([q for _, q in parts])
    if bits is None or not gguf_kept(parts, GGUF_GPU_TYPES):
        return None
    if bits == 8:
        return gguf_int8_nbytes(out, inp, [q for _, q in parts])
    return out * inp // 2 + out * (inp // 32) * 2 * 2  # codes; f16 scale and zero per group


def gguf_gpu_table_nbytes(shape: tuple[int, ...], qtype: str) -> int | None:
    """Bytes a GPU holds for a GGUF's token embedding table or output head of `qtype` (quant/gguf_gpu.py
    `GPUEmbedding`, and the head as an Int8Linear, shared when tied): int8 codes with an f16 scale (and
    offset, unless symmetric) per group (of 16 for Q6_K, else 32), whatever the type, so a head's prompts
    dequantize it by chunks; None where it is dequantized to the model dtype."""
    gs = gguf_int8_group([qtype])
    if len(shape) != 2 or qtype not in GGUF_GPU_TYPES or shape[1] % GGUF_BLOCKS[qtype][0] or shape[1] % gs:
        return None
    return gguf_int8_nbytes(shape[0], shape[1], [qtype])


def gguf_cpu_table_nbytes(shape: tuple[int, ...], qtype: str, keep: GGUFKeep) -> int | None:
    """Bytes a CPU holds for a GGUF's token embedding table or (untied or tied) output head of `qtype`, or
    None where it is dequantized: with the C kernels the file's blocks (an embedding and a head of one matrix
    share them: quant/gguf_native.native_module); without, the embedding stays in blocks of Q4_0 / Q4_1 /
    Q8_0 and a head of those becomes int8 rows with a bf16 scale each (`Int8Head`)."""
    if len(shape) != 2 or qtype not in GGUF_BLOCKS or shape[1] % GGUF_BLOCKS[qtype][0]:
        return None
    if keep.cpu_kernels or qtype in (*GGUF_CPU_INT4_TYPES, "q8_0"):
        return gguf_block_nbytes(shape, qtype)
    return None


def gguf_int8_head_nbytes(shape: tuple[int, ...]) -> int:
    """Without the C kernels: a GGUF head of Q4_0 / Q4_1 / Q8_0 blocks held as int8 rows, a bf16 scale each."""
    return shape[0] * shape[1] + shape[0] * SCALE_BYTES
