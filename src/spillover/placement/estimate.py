"""The memory model: bytes of weights, KV cache, activations and fixed reserves, per layer and per device.

Pure functions, numbers in and numbers out (no torch), so that `spillover plan` answers "would this fit on
2 x 24 GiB?" on any machine, and so that every figure can be checked against a measurement on a GPU.

The runtime modelled here (the model runner follows these constants; change both together):
- Prefill is chunked: one forward step processes at most `MAX_BATCHED_TOKENS` tokens over the whole batch;
  one sequence contributes at most that many tokens to a step. Decode steps process `max_batch_size` tokens.
- Per layer the runner holds the hidden states and the residual (T x hidden), the fused qkv projection
  (T x (q_heads + 2 kv_heads) x head_dim), rotated q/k, the attention output buffer, the o_proj output, and
  for the MLP the fused gate_up (T x 2 intermediate), act(gate) and act*up (T x intermediate each), down.
- Attention (layers/attention.py): a prefill chunk attends one sequence at a time over K/V gathered from the
  paged cache (L x kv_heads x head_dim each, L up to max_seq_len) with a boolean T x L mask that SDPA turns
  into an additive mask in the model dtype; decode attends all sequences at once over K/V gathered to
  [batch, L]. On CUDA SDPA picks a fused kernel: no heads x T x L scores (measured on an H100, torch 2.11:
  a 2048 x 8192 GQA chunk with a bool mask peaks at output + additive mask). On CPU and MPS we assume the
  math path (`CPU_ATTENTION_MATERIALISES_SCORES`): fp32 scores and their softmax, heads x T x L each, plus
  K/V repeated to q_heads in fp32.
- Logits only for the last token of each sequence: batch x vocab in the model dtype (lm_head output), then
  fp32 logits and fp32 softmax; the sampler sorts one row at a time (fp32 values + int64 indices).
- KV cache per layer: 2 x batch x seq x kv_heads x head_dim in the model dtype, on the layer's device; with
  PagedAttention each sequence's length is rounded up to whole blocks of `KV_BLOCK_SIZE` tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from spillover.config import AutoDeviceMapParams, ModelConfig
from spillover.quant.formats import (
    DEQUANT_CHUNK_ELEMENTS,
    ISQ_HEAD_BITS,
    QUANT_CHUNK_ELEMENTS,
    GGUFKeep,
    cpu_extra_nbytes,
    dtype_bytes,
    gguf_cpu_table_nbytes,
    gguf_gpu_table_nbytes,
    gguf_int8_head_nbytes,
    gguf_projection_nbytes,
    is_block_quantized,
    quant_transient_nbytes,
    quantized_nbytes,
)

MiB = 1 << 20
GiB = 1 << 30

MAX_BATCHED_TOKENS = 2048
"""Most tokens one forward step processes, over the whole batch (chunked prefill). 2048 keeps a step's
activations small (a few hundred MiB for an 8B model) while the GEMMs stay large enough to be compute-bound
on a GPU; longer prompts are processed in several chunks."""

KV_BLOCK_SIZE = 16
"""Tokens per PagedAttention block. 16 wastes at most 15 slots per sequence and keeps block tables short."""

STREAM_BUFFERS = 2
"""GPU staging buffers for streamed layers (engine/offload.py), each the size of the largest streamed layer.
Two is double buffering: layer i computes from one buffer while layer i+1's weights arrive in the other. A
third only helps when the GPU compute of a layer is comparable to its copy; at decode it is ~30x shorter
(0.25 ms vs 8 ms for a Llama-3-8B layer over PCIe Gen5), so a third buffer would cost a whole layer of GPU
room for nothing."""

CUDA_CONTEXT_BYTES = 576 * MiB
"""The CUDA primary context of one process, outside torch's allocator. Measured 527 MiB on an H100 (torch 2.11,
CUDA 13.0, lazy module loading) right after initialisation; +~10% for other GPUs and drivers. Only counted when
the capacity figure was not read by an initialised process (hypothetical GPUs); `torch.cuda.mem_get_info`
creates the context before it reports free memory, so a probed GPU has already paid it."""

CUDA_KERNELS_BYTES = 256 * MiB
"""Memory outside torch's allocator that grows after initialisation: cuBLAS/cuBLASLt handles and workspaces
and lazily loaded kernel modules. Measured +68 MiB after the first bf16 GEMM and +100 MiB more after the
SDPA kernels (H100, torch 2.11); on the H200 the whole process outside torch (context + kernels, after a
grid point's prefill and decode with graphs) was 0.74 GiB (benchmarks/RESULTS-fit_grid.md), which
CUDA_CONTEXT_BYTES + this (0.81 GiB) covers. It was 512 MiB, 0.32 GiB more than any point used."""

CPU_RUNTIME_BYTES = 64 * MiB
"""What the engine process adds to its resident memory on the CPU besides weights, KV, activations, its tokenizer
(TOKENIZER_BYTES_PER_TOKEN) and what a converting load leaves (CPU_LOAD_LEFTOVER_BYTES), after planning (the
plan's CPU budget is the memory available then, which already excludes the process as it is: torch, the Python
heap, the libraries loaded so far): lazily loaded kernel libraries, scheduler bookkeeping. Measured
(benchmarks/fit_grid_cpu.py, torch 2.13 CPU): loading SmolLM2's GGUF with its blocks kept left the resident
set 8 MiB above its weights (3 of them the tokenizer)."""

CPU_LOAD_LEFTOVER_BYTES = 192 * MiB
"""Resident memory a load that converts weights on the CPU (dequantized GGUF blocks, a checkpoint cast to the
model dtype) leaves behind: SmolLM2's GGUF loaded as f32 left 204 MiB above its weights, as bf16 190 MiB (155
and 150 after malloc_trim), against 8 MiB with its blocks kept. Not counted where every weight is in CPU memory
as a GGUF's kept blocks and no tensor larger than this is staged (Requirements.cpu_runtime_kept)."""

TOKENIZER_BYTES_PER_TOKEN = 512
"""The tokenizer's resident memory per vocabulary entry: Gemma 3's 262,144 entries (scores, merges rebuilt from
them) +116 MiB, SmolLM2's 49,152 (byte-level BPE) +3 MiB."""

CPU_ALLOCATOR_SLACK_BYTES = 64 * MiB
"""Fixed slack on the CPU activation reserve. CPU tensors come from malloc, which returns large blocks to
the system when they are freed (no caching allocator to fragment), so the GPU's 512 MiB is not needed."""

LOAD_STAGING_F32_COPIES = 3
"""Loading dequantizes a GGUF block-quantized tensor on the CPU to fp32 before converting it: the fp32 codes,
the scaled product and the result coexist (loading/dequant.py: q, q*d, q*d+m), three fp32 copies of the
largest tensor. Float tensors need the stored copy plus the converted copy."""

ALLOCATOR_SLACK_FRACTION = 0.10
"""Fragmentation slack on the activation reserve. Transient tensors change size from step to step (the
attention span L grows chunk by chunk), so the caching allocator cannot always reuse a freed block for a
slightly larger request and must map a new segment. 10% of the transients is an allowance, not yet a
measurement: the GPU benchmark (max_memory_reserved vs max_memory_allocated) is what confirms or tunes it.
Weights and the KV cache are allocated once, in large blocks, and do not fragment. Under a budget the
allocator's segments grow in place (expandable segments: kv.pool.limit_allocator) instead of multiplying."""

ALLOCATOR_SLACK_BYTES = 128 * MiB
"""Fixed slack per device on top of the fraction. Measured on an H100 (benchmarks/memory.py, Llama-3-8B
shape, bf16, before spillover limited torch's allocator to the budget): torch's reserved peak exceeded its
allocated peak by 0.22 GiB at batch 1 x 4096 and 0.36 GiB at 8 x 8192 (segments rounded up, separate
small-tensor pools). With a budget, the allocator is limited to it (kv.pool.allocator_limits) and returns
cached blocks before crossing it, and it maps its segments as they grow (expandable segments: kv.pool.
limit_allocator), so the slack only holds what fragmentation keeps from being reused within them. On the H200
grid before expandable segments (run 9) reserved exceeded allocated by 0.10-0.22 GiB at 4 GiB ISQ points and
0.71-0.74 GiB at bf16 8 and 12 GiB with a 32k prompt (the cache growing into the budget's free room); it was
256 MiB here, 512 before that. The decode graphs' pool is planned apart (graph_pool_bytes). Loading ISQ
weights needs isq_load_transient_bytes on the device that quantizes, which the activation reserve then covers
at least (Requirements.isq_load)."""

GRAPH_POOL_SLACK_BYTES = 64 * MiB
"""On top of the largest decode graph's transients: the CUDA-graph pool keeps whole allocator segments (2 MiB
small-block and 20 MiB large-block segments), one output buffer per captured graph and its own small pools."""

GRAPH_MAX_BATCH = 256
"""Largest decode batch captured in a CUDA graph (engine/runner.py DecodeGraphs.MAX_BATCH)."""

GRAPH_MIN_CONTEXT = 256
"""Smallest context bucket of a decode graph; buckets are powers of two from it (DecodeGraphs.key)."""

CPU_ATTENTION_MATERIALISES_SCORES = False
"""Whether CPU (and MPS) attention materialises fp32 scores of heads x T x L. False: the runner calls SDPA
with a boolean mask, and torch's CPU flash kernel (torch >= 2.5) handles that without scores (measured
~24 MiB instead of 1 GiB for a 512 x 8192 GQA chunk). Set True for a runner that falls back to the math path."""


class TensorLike(Protocol):
    """What the estimate reads from a tensor header (spillover.loading.source.TensorInfo fits)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class TensorSpec:
    """A tensor header made up from config.json alone (no weight files): stored in the model dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "bf16"


EMBED_NAME = "model.embed_tokens.weight"
LM_HEAD_NAME = "lm_head.weight"
FINAL_NORM_NAME = "model.norm.weight"


def _arch(config: ModelConfig):  # noqa: ANN202
    """The architecture of `config` (its description, models/arch/; no torch). Imported here, not at module
    level: spillover.config imports this module."""
    from spillover.models import architecture

    return architecture(config.model_type)


def config_tensors(config: ModelConfig, dtype: str = "bf16") -> dict[str, TensorSpec]:
    """The checkpoint tensors of this model (its architecture's contract), under Hugging Face names."""
    return {n: TensorSpec(n, s, dtype) for n, s in _arch(config).checkpoint_tensors(config).items()}


def resolve_model_dtype(requested: str, cuda_bf16: bool) -> str:
    """The one dtype the whole model is loaded in. "auto": bf16 when a CUDA GPU that supports it will be used
    (half the bytes of f32, same exponent range), else f32 (CPU kernels are fastest and exact in f32)."""
    if requested != "auto":
        return requested
    return "bf16" if cuda_bf16 else "f32"


def is_isq_target(name: str, shape: tuple[int, ...], config: ModelConfig | None = None) -> bool:
    """Whether ISQ quantizes this checkpoint tensor: the architecture says (`Architecture.is_isq_target`; by
    default the 2-D `*_proj.weight` tensors inside decoder layers)."""
    if config is None:
        from spillover.models.arch.base import Architecture

        return Architecture.is_isq_target(name, shape)
    return _arch(config).is_isq_target(name, shape)


def tensor_nbytes(t: TensorLike, dtype: str, isq: int | None, config: ModelConfig | None = None) -> int:
    """Bytes a tensor occupies once loaded: the ISQ format for layer projections when isq is set, else the
    model dtype (GGUF quant types are dequantized on load)."""
    if isq is not None and is_isq_target(t.name, t.shape, config):  # 3-D: stacked experts, each quantized
        return quantized_nbytes(t.shape[-2:], isq) * (t.shape[0] if len(t.shape) == 3 else 1)
    if isq is not None and t.name == LM_HEAD_NAME and len(t.shape) == 2:  # an untied head: isq 8
        return quantized_nbytes(t.shape, ISQ_HEAD_BITS)
    return math.prod(t.shape) * dtype_bytes(dtype)


@dataclass(frozen=True)
class WeightEstimate:
    """Weight bytes once loaded, per part of the model."""

    layer_bytes: tuple[int, ...]  # index = layer number
    embed_bytes: int  # token embedding matrix
    head_bytes: int  # final norm + lm_head; with tied embeddings only the norm (see tied_bytes)
    tied_bytes: int  # tied embeddings: the shared matrix, stored again when the head is on another device
    staging_bytes: int  # CPU transient while loading the largest tensor
    isq_dequant_bytes: int  # with ISQ: the largest fused projection dequantized to the model dtype
    layer_cpu_extra: tuple[int, ...] = ()  # per layer, extra bytes when it runs on the CPU (cpu_extra_nbytes)
    layer_params: tuple[int, ...] = ()  # per layer, weights (elements): FLOPs, whatever the bytes per weight
    staging_after_bytes: int = 0  # weights loaded after the tensor whose staging is largest (load_order)
    vision_bytes: int = 0  # the vision tower and projector (stage "vision")
    layer_expert_bytes: tuple[int, ...] = ()  # per layer, the part of layer_bytes in its experts stage (MoE)
    # GGUF blocks kept quantized (GGUFKeep): what a CPU holds, where it differs from the bytes above (a GPU's)
    layer_cpu_bytes: tuple[int, ...] = ()
    embed_cpu_bytes: int | None = None
    head_cpu_bytes: int | None = None  # final norm + an untied lm_head, in CPU memory
    tied_cpu_bytes: int | None = None  # a tied head in CPU memory, the embedding elsewhere
    tied_cpu_shared_bytes: int = 0  # a tied head in CPU memory beside the embedding: beyond the shared matrix
    kept_dequant_bytes: int = (
        0  # a GPU's largest kept projection dequantized whole (nonzero: a GPU dequantizes)
    )
    kept_head_dequant_bytes: int = 0  # a GPU's int8 head table: one chunk dequantized for a GEMM of its rows
    staging_cpu_bytes: int | None = None  # load staging when every weight goes to CPU memory (kept: no f32)
    staging_cpu_after_bytes: int = 0


def kept_projections(tensors: Mapping[str, TensorLike], config: ModelConfig) -> dict[str, list[str]]:
    """A GGUF's 2-D layer weights grouped by the parameter they fill (`param name -> sources`, in the loader's
    order), as the loader asks quant/gguf_native.py and quant/gguf_gpu.py to keep them: q/k/v and gate/up
    fused where the architecture fuses them (`param_sources` says), every other one alone."""
    from spillover.models.arch.llama import FUSED

    into = {f".{p}.": f".{fused}." for fused, parts in FUSED.items() for p in parts}  # checkpoint -> fused
    arch = _arch(config)
    groups: dict[str, list[str]] = {}
    for t in tensors.values():
        if arch.layer_of(t.name) is None or len(t.shape) != 2 or not t.name.endswith(".weight"):
            continue
        key = t.name.removeprefix("model.")
        for part, fused in into.items():
            key = key.replace(part, fused)
        groups.setdefault(key, []).append(t.name)
    out: dict[str, list[str]] = {}
    for key, names in groups.items():
        sources = arch.param_sources(key, config) if len(names) > 1 else names
        if sorted(sources) == sorted(names):
            out[key] = list(sources)
        else:  # not a fused parameter of this architecture: each tensor is its own
            out.update({n.removeprefix("model."): [n] for n in names})
    return out


@dataclass(frozen=True)
class _Held:
    """Bytes per tensor on a GPU and in CPU memory, where GGUF blocks are kept (a fused group's bytes sit on
    its first tensor, 0 on the others)."""

    gpu: dict[str, int]
    cpu: dict[str, int]
    embed_cpu: int | None = None
    head_cpu: int | None = None  # the untied lm_head matrix
    tied_cpu: int | None = None
    tied_cpu_shared: int = 0
    dequant: int = 0  # a GPU's largest kept projection, dequantized whole (model dtype)
    head_dequant: int = 0  # a GPU's int8 head table: one chunk of it dequantized (model dtype)
    embed_gpu: int | None = None  # the embedding table on a GPU, int8 (formats.gguf_gpu_table_nbytes)
    head_gpu: int | None = None  # the untied lm_head matrix on a GPU, int8


def _kept_bytes(tensors: Mapping[str, TensorLike], config: ModelConfig, dtype: str, keep: GGUFKeep) -> _Held:
    """What the default mode of a GGUF holds per tensor, on each kind of device (quant/formats.py's rules)."""
    gpu: dict[str, int] = {}
    cpu: dict[str, int] = {}
    dequant = 0
    for sources in kept_projections(tensors, config).values():
        parts = [(tuple(tensors[s].shape), tensors[s].dtype) for s in sources]
        for kind, held in (("cuda", gpu), ("cpu", cpu)):
            n = gguf_projection_nbytes(parts, kind, keep)
            if n is not None:
                held.update(dict.fromkeys(sources, 0))
                held[sources[0]] = n
                if kind == "cuda":
                    dequant = max(dequant, math.prod(parts[0][0][1:]) * sum(s[0] for s, _ in parts))
    embed = tensors.get(EMBED_NAME)
    head = tensors.get(LM_HEAD_NAME)
    on_gpu = {  # the tables a GPU keeps int8 (quant/gguf_gpu.table_module); a tied head shares the embedding's
        n: gguf_gpu_table_nbytes(tuple(t.shape), t.dtype) for n, t in ((EMBED_NAME, embed), (LM_HEAD_NAME, head))
        if t is not None
    }  # fmt: skip
    matrix = head if head is not None else embed  # the head's prompts dequantize it by chunks
    head_dequant = 0
    if on_gpu.get(LM_HEAD_NAME if head is not None else EMBED_NAME) is not None:
        head_dequant = min(math.prod(matrix.shape), DEQUANT_CHUNK_ELEMENTS) * dtype_bytes(dtype)
    held = _Held(gpu, cpu, dequant=dequant * dtype_bytes(dtype), head_dequant=head_dequant,
                 embed_gpu=on_gpu.get(EMBED_NAME), head_gpu=on_gpu.get(LM_HEAD_NAME))  # fmt: skip
    table = None if embed is None else gguf_cpu_table_nbytes(tuple(embed.shape), embed.dtype, keep)
    if embed is not None and table is not None:
        held = dataclasses.replace(held, embed_cpu=table)
    if head is not None:  # untied: the head's own matrix
        kept = gguf_cpu_table_nbytes(tuple(head.shape), head.dtype, keep)
        if kept is not None and not keep.cpu_kernels:
            kept = gguf_int8_head_nbytes(tuple(head.shape))
        return dataclasses.replace(held, head_cpu=kept)
    if embed is not None and table is not None:  # tied: the head reads the embedding's blocks
        if keep.cpu_kernels:
            return dataclasses.replace(held, tied_cpu=table)
        n = gguf_int8_head_nbytes(tuple(embed.shape))  # Int8Head: its own int8 copy, beside the table
        return dataclasses.replace(held, tied_cpu=n, tied_cpu_shared=n)
    return held


def weight_estimate(
    tensors: Mapping[str, TensorLike], config: ModelConfig, dtype: str, isq: int | None = None,
    keep: GGUFKeep | None = None,
) -> WeightEstimate:  # fmt: skip
    """Weight bytes per layer, embeddings and head, from tensor headers (or `config_tensors(config)`). A layer's
    bytes include its experts (MoE), which `layer_expert_bytes` also lists. `keep` (a GGUF's default mode, no
    ISQ): block-quantized weights counted as what each kind of device keeps of them."""
    from spillover.models.arch.base import STAGE_EMBED, STAGE_HEAD, STAGE_VISION, layer_stage

    arch = _arch(config)
    layers = [0] * config.num_hidden_layers
    cpu_extra = [0] * config.num_hidden_layers
    params = [0] * config.num_hidden_layers
    experts = [0] * config.num_hidden_layers
    layers_cpu = [0] * config.num_hidden_layers
    held = _kept_bytes(tensors, config, dtype, keep) if keep is not None and isq is None else None
    embed = head = staging = vision = 0
    for t in tensors.values():
        nbytes = tensor_nbytes(t, dtype, isq, config)
        staging = max(staging, _staging_bytes(t, dtype))
        layer = arch.layer_of(t.name)
        stage = arch.stage_of(t.name)
        if layer is not None:
            if layer < len(layers):
                layers_cpu[layer] += nbytes if held is None else held.cpu.get(t.name, nbytes)
                nbytes = nbytes if held is None else held.gpu.get(t.name, nbytes)
                layers[layer] += nbytes
                params[layer] += math.prod(t.shape)
                if stage != layer_stage(layer):  # the layer's experts (layers/moe.py: no dense CPU copy)
                    experts[layer] += nbytes
                elif isq is not None and arch.is_isq_target(t.name, t.shape):
                    cpu_extra[layer] += cpu_extra_nbytes(t.shape, isq)
        elif stage == STAGE_EMBED:
            embed += nbytes
        elif stage == STAGE_HEAD:
            head += nbytes
        elif stage == STAGE_VISION:
            vision += nbytes
    tied = embed if LM_HEAD_NAME not in tensors else 0
    isq_dequant = _isq_dequant_bytes(config, dtype, isq)
    after = _loaded_after_largest_staging(tensors, config, dtype, isq, held)
    kept = {}
    if held is not None:

        def cpu_staging(t: TensorLike) -> int:
            """A tensor's load staging when it goes to CPU memory: blocks kept there are copied out of the file's
            map as they are (a fused projection's copy is its weight; an embedding, and a head with the C kernels,
            stay in the map), not dequantized to f32."""
            if t.name in held.cpu:
                return held.cpu[t.name]
            if (t.name == EMBED_NAME and held.embed_cpu is not None) or (
                t.name == LM_HEAD_NAME and held.head_cpu is not None
            ):
                return 0 if keep.cpu_kernels else math.prod(t.shape)  # Int8Head: its int8 copy, by chunks
            return _staging_bytes(t, dtype)

        kept_after = _loaded_after_largest_staging(tensors, config, dtype, isq, held, cpu_staging)
        lm = tensors.get(LM_HEAD_NAME)
        untied = 0 if lm is None else tensor_nbytes(lm, dtype, None, config)
        kept = dict(
            layer_cpu_bytes=tuple(layers_cpu),
            embed_cpu_bytes=embed if held.embed_cpu is None else held.embed_cpu,
            head_cpu_bytes=head if held.head_cpu is None else head - untied + held.head_cpu,
            tied_cpu_bytes=tied if held.tied_cpu is None else held.tied_cpu,
            tied_cpu_shared_bytes=held.tied_cpu_shared,
            kept_dequant_bytes=held.dequant,
            kept_head_dequant_bytes=held.head_dequant,
            staging_cpu_bytes=max((cpu_staging(t) for t in tensors.values()), default=0),
            staging_cpu_after_bytes=kept_after,
        )
        # a GPU's tables kept int8 (what a CPU holds is in `kept`, from the sums above)
        if lm is not None and held.head_gpu is not None:
            head += held.head_gpu - untied
        if held.embed_gpu is not None:
            tied = held.embed_gpu if tied else 0
            embed = held.embed_gpu
    return WeightEstimate(
        tuple(layers),
        embed,
        head,
        tied,
        staging,
        isq_dequant,
        tuple(cpu_extra),
        tuple(params),
        after,
        vision,
        tuple(experts) if any(experts) else (),
        **kept,
    )


def _loaded_after_largest_staging(
    tensors: Mapping[str, TensorLike], config: ModelConfig, dtype: str, isq: int | None, held: Any = None,
    staging: Any = None,
) -> int:  # fmt: skip
    """Bytes of the weights loaded after the tensor with the largest load staging: they do not exist yet
    while it is staged. The loader (loading/loader.build_model) reads in the model's parameter order: the
    embeddings, the layers in order, the final norm, lm_head; so a tied embedding matrix is staged first and
    an untied lm_head last."""
    if not tensors:
        return 0
    from spillover.models.arch.base import STAGE_EMBED

    arch = _arch(config)

    def order(name: str) -> tuple[int, int]:
        layer = arch.layer_of(name)
        if layer is not None:
            return (1, layer)
        if arch.stage_of(name) == STAGE_EMBED:
            return (0, 0)
        return (3, 0) if name == LM_HEAD_NAME else (2, 0)

    staged = staging or (lambda t: _staging_bytes(t, dtype))  # `staging`: a tensor's, where it goes
    big = max(tensors.values(), key=lambda t: (staged(t), order(t.name)))
    after = order(big.name)
    cpu = {} if held is None else held.cpu  # (only a CPU that holds every layer subtracts these)
    return sum(
        cpu.get(t.name, tensor_nbytes(t, dtype, isq, config))
        for t in tensors.values()
        if order(t.name) > after
    )


def _staging_bytes(t: TensorLike, dtype: str) -> int:
    numel = math.prod(t.shape)
    if is_block_quantized(t.dtype):
        return LOAD_STAGING_F32_COPIES * numel * 4
    stored = dtype_bytes(t.dtype) if t.dtype in ("f32", "f16", "bf16") else 4
    return numel * (stored + dtype_bytes(dtype))


def _projection_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of a decoder layer's projections as the model holds them: fused qkv, fused gate_up, o, down."""
    h, hd, i = config.hidden_size, config.head_dim, config.intermediate_size
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * hd
    return [(qkv, h), (2 * i, h), (h, config.num_attention_heads * hd), (h, i)]


def _isq_dequant_bytes(config: ModelConfig, dtype: str, isq: int | None) -> int:
    """ISQ's transient on a device that runs layers: a prompt's quantized matmul dequantizes its whole fused
    weight to the model dtype for the GEMM (decode reads the quantized bytes directly). Loading needs less
    and comes first: projections are read into CPU memory and quantized chunk by chunk on the work device
    (`isq_load_transient_bytes`), while the KV cache and activation room is still unallocated."""
    if isq is None:
        return 0
    return max(out * inp for out, inp in _projection_shapes(config)) * dtype_bytes(dtype)


def isq_load_transient_bytes(dtype: str, elements: int = QUANT_CHUNK_ELEMENTS) -> int:
    """Peak transient of quantizing one chunk of `elements` weights on the work device (default: a whole
    QUANT_CHUNK_ELEMENTS chunk): the chunk in the model dtype and its f32 copies. Loading runs before the KV
    pool and activations exist: a device's activation reserve is at least this when it runs ISQ layers
    (Requirements.isq_load)."""
    return quant_transient_nbytes() * elements // QUANT_CHUNK_ELEMENTS + elements * dtype_bytes(dtype)


def isq_chunk_elements(config: ModelConfig) -> int:
    """The largest chunk ISQ quantizes at once for this model (quant/isq.py `_rows`: whole rows, at most
    QUANT_CHUNK_ELEMENTS weights, at least one row): from the fused projections and an untied head. A small
    model's whole weight is smaller than a chunk (SmolLM2's gate_up: 1.8 M weights against 16.8 M)."""
    shapes = _projection_shapes(config)
    if not config.tie_word_embeddings:
        shapes.append((config.vocab_size, config.hidden_size))
    return max(min(out, max(1, QUANT_CHUNK_ELEMENTS // inp)) * inp for out, inp in shapes)


def kv_tokens_per_sequence(max_seq_len: int, paged: bool) -> int:
    """KV slots one sequence needs: max_seq_len, rounded up to whole blocks with PagedAttention."""
    if not paged:
        return max_seq_len
    return -(-max_seq_len // KV_BLOCK_SIZE) * KV_BLOCK_SIZE


def kv_cache_bytes_per_layer(
    config: ModelConfig,
    dtype: str,
    max_seq_len: int,
    max_batch_size: int,
    paged: bool = True,
    spec: Any = None,
) -> int:
    """K and V of one layer: 2 x batch x seq x kv_heads x head_dim x bytes(dtype). `spec` (a KVSpec of
    models/arch/base.py; default: the config's heads, full attention): a sliding-window layer keeps a ring of
    its window (rounded up to whole blocks) per sequence, whatever the sequence length."""
    heads, hd = (
        (config.num_key_value_heads, config.head_dim) if spec is None else (spec.kv_heads, spec.head_dim)
    )
    seq = kv_tokens_per_sequence(max_seq_len, paged)
    if spec is not None and spec.sliding_window is not None:
        seq = kv_tokens_per_sequence(spec.sliding_window, True)
    return 2 * max_batch_size * seq * heads * hd * dtype_bytes(dtype)


@dataclass(frozen=True)
class ActivationEstimate:
    """Peak transient bytes on one device, by part (before allocator slack)."""

    layers: int = 0  # peak inside one decoder layer (the largest of prefill chunk and decode step)
    head: int = 0  # logits and sampling
    embed: int = 0  # the embedding gather's output
    isq: int = 0  # dequantized weight of a quantized matmul
    kind: str = "cuda"  # the device kind: its allocator's slack

    @property
    def total(self) -> int:
        raw = self.layers + self.head + self.embed + self.isq
        return with_allocator_slack(raw, self.kind)


def with_allocator_slack(nbytes: int, kind: str = "cuda") -> int:
    """Transient bytes plus fragmentation slack (ALLOCATOR_SLACK_FRACTION, plus ALLOCATOR_SLACK_BYTES on a GPU
    or CPU_ALLOCATOR_SLACK_BYTES on the CPU)."""
    if nbytes <= 0:
        return 0
    fixed = CPU_ALLOCATOR_SLACK_BYTES if kind == "cpu" else ALLOCATOR_SLACK_BYTES
    return int(nbytes * (1 + ALLOCATOR_SLACK_FRACTION)) + fixed


def materialises_scores(device_kind: str) -> bool:
    """Whether attention on this kind of device materialises heads x T x L scores (see module docstring)."""
    return device_kind != "cuda" and CPU_ATTENTION_MATERIALISES_SCORES


def layer_step_bytes(
    config: ModelConfig, dtype: str, tokens: int, seq_tokens: int, seqs: int, span: int, kind: str,
    gathers: bool = True,
) -> int:  # fmt: skip
    """Peak transient bytes inside one decoder layer for one step.

    tokens: T, tokens in the step; seq_tokens: query tokens of the sequences attended in one SDPA call
    (per sequence for prefill, 1 each for decode); seqs: sequences in that SDPA call; span: L, KV length.
    gathers: attention gathers K/V out of the cache (SDPA); False for the Triton paged decode kernel, which
    reads the cache in place and keeps only fp32 partial results of its context splits.
    """
    b = dtype_bytes(dtype)
    h, hd, i = config.hidden_size, config.head_dim, config.intermediate_size
    qh, kvh = config.num_attention_heads, config.num_key_value_heads
    resident = 2 * tokens * h * b  # hidden + residual
    proj = tokens * h * b + tokens * (qh + 2 * kvh) * hd * b  # normed input + fused qkv
    rope = 2 * tokens * (qh + kvh) * hd * b + 2 * tokens * hd * 4  # rotated q/k + a temporary; fp32 cos/sin
    out = tokens * qh * hd * b + tokens * h * b  # attention output buffer + o_proj output
    gather = 2 * seqs * span * kvh * hd * b + seqs * span * 8  # K/V gathered from the cache + int64 slots
    mask = seqs * seq_tokens * span * (1 + b)  # bool mask + SDPA's additive copy in the model dtype
    if seq_tokens > 1 and kind == "cuda" and dtype != "f32":  # a chunk with a past: flash attention with
        mask = 0  # torch's causal_lower_right bias, no mask materialised (layers/attention.py)
    if not gathers:  # slots stay (int64); partials [B, heads, splits <= L/512, hd] + lse in fp32
        gather, mask = seqs * span * 8, seqs * qh * (span // 512 + 1) * (hd + 1) * 4
    sdpa = seqs * seq_tokens * qh * hd * b
    if materialises_scores(kind):
        sdpa += 2 * seqs * qh * seq_tokens * span * 4 + 2 * seqs * span * qh * hd * 4
    attention = proj + rope + out + gather + mask + sdpa
    mlp = 2 * tokens * h * b + 4 * tokens * i * b  # normed in + down out; gate_up (2I) + act + act*up
    return resident + max(attention, mlp)


def step_tokens(params: AutoDeviceMapParams) -> int:
    """Tokens of the largest step the parameters allow: a prefill chunk (at most MAX_BATCHED_TOKENS over the
    batch), or a decode step of max_batch_size sequences if that is more."""
    return max(min(MAX_BATCHED_TOKENS, params.max_batch_size * params.max_seq_len), params.max_batch_size)


def expert_activation_bytes(config: ModelConfig, dtype: str, params: AutoDeviceMapParams) -> int:
    """Transients of one layer's experts (layers/moe.py) for the largest step, on the device that holds them:
    the step's rows once per chosen expert (T x k pairs: input, gate_up, act*up, output, the sorted copies),
    the fp32 weighted sum and the routing (ids, weights). 0 for dense models."""
    k, inter = config.extra.get("num_experts_per_tok"), config.extra.get("moe_intermediate_size")
    if not k or not inter:
        return 0
    b, h = dtype_bytes(dtype), config.hidden_size
    tokens = step_tokens(params)
    pairs = tokens * k
    return pairs * (3 * h + 3 * inter) * b + pairs * (h * 4 + 16) + tokens * h * (4 + b)


def layer_activation_bytes(config: ModelConfig, dtype: str, params: AutoDeviceMapParams, kind: str) -> int:
    """Peak transient bytes of one decoder layer over the largest steps the parameters allow."""
    bsz, seq = params.max_batch_size, params.max_seq_len
    prefill_tokens = min(MAX_BATCHED_TOKENS, bsz * seq)
    chunk = min(MAX_BATCHED_TOKENS, seq)
    prefill = layer_step_bytes(config, dtype, prefill_tokens, chunk, 1, seq, kind)
    gathers = not (kind == "cuda" and triton_decode(config, dtype))
    decode = layer_step_bytes(config, dtype, bsz, 1, bsz, seq, kind, gathers)
    return max(prefill, decode)


def dequant_step_bytes(
    config: ModelConfig, dtype: str, tokens: int, dequant: Callable[[int, int], int]
) -> int:
    """Peak transient bytes of one decoder layer's step of `tokens` on a GPU that dequantizes each projection
    to the model dtype for its GEMM (ISQ and a GGUF's kept blocks, in steps above GEMV_MAX_ROWS rows). One
    projection at a time holds its dequantized weight (`dequant(out, in)`: the weight, or the chunk and the
    chunk's GEMM output) with its input and output, beside the hidden state and the residual and what the
    layer keeps alive then: the fused qkv during o_proj, the fused gate_up during down_proj (models/llama.py
    returns down(silu_mul(gu)) with gu still referenced). The layer's other transients (rope, attention,
    act) are not alive with a dequantized weight; layer_step_bytes covers them."""
    b, h, i = dtype_bytes(dtype), config.hidden_size, config.intermediate_size
    (qkv, _), (gate_up, _), (_, attn), _ = _projection_shapes(config)
    t = tokens * b
    phases = (  # alive besides the projection + its input + the dequantized weight + its output
        t * h + dequant(qkv, h) + t * qkv,
        t * qkv + t * attn + dequant(h, attn) + t * h,
        t * h + dequant(gate_up, h) + t * gate_up,
        t * gate_up + t * i + dequant(h, i) + t * h,
    )
    return 2 * t * h + max(phases)


def gpu_dequant_bytes(
    config: ModelConfig, dtype: str, tokens: int, isq: int | None
) -> Callable[[int, int], int]:
    """What a GPU holds to dequantize an (out, in) projection for a GEMM of `tokens` rows (quant/isq.chunked_mm):
    row chunks of DEQUANT_CHUNK_ELEMENTS weights in the model dtype, and each chunk's GEMM output before it is
    copied into the whole output. An int8 CPU layer streamed to a GPU in Q8_0 blocks (isq 8) dequantizes a
    quarter of that at a time through f32 (Int8Linear._dense: two f32 copies and the result, 10 bytes each)."""
    b = dtype_bytes(dtype)

    def held(out: int, inp: int) -> int:
        rows = min(out, max(1, DEQUANT_CHUNK_ELEMENTS // inp))
        chunk = rows * inp * b
        if isq == 8:
            chunk = max(chunk, min(out * inp, DEQUANT_CHUNK_ELEMENTS // 4) * 10)
        return chunk + (tokens * rows * b if rows < out else 0)

    return held


def gpu_dequant_excess(
    config: ModelConfig, dtype: str, params: AutoDeviceMapParams, isq: int | None, weights: WeightEstimate
) -> int:
    """What a GPU's dequantizing steps (ISQ, or a GGUF's kept projections) need beyond layer_activation's
    peak, or the head's dequantized chunk (an int8 head, logits of more than GEMV_MAX_ROWS rows) if larger.
    The head's chunk and the layers' weights are never dequantized at the same time."""
    head = weights.kept_head_dequant_bytes
    if isq is not None and not weights.tied_bytes:  # an untied head is int8 with ISQ (ISQ_HEAD_BITS)
        head = gpu_dequant_bytes(config, dtype, head_rows(params.max_batch_size), ISQ_HEAD_BITS)(
            config.vocab_size, config.hidden_size
        )
    if isq is None and not weights.kept_dequant_bytes:
        return head
    tokens = step_tokens(params)
    peak = dequant_step_bytes(config, dtype, tokens, gpu_dequant_bytes(config, dtype, tokens, isq))
    return max(head, peak - layer_activation_bytes(config, dtype, params, "cuda"))


def triton_decode(config: ModelConfig, dtype: str) -> bool:
    """Whether CUDA decode runs the Triton paged kernel (layers/triton_attention.usable): no K/V gather."""
    return dtype in ("bf16", "f16") and config.head_dim in (64, 128, 256)


def _pow2_at_least(n: int, floor: int) -> int:
    b = floor
    while b < n:
        b *= 2
    return b


def graph_pool_bytes(config: ModelConfig, dtype: str, params: AutoDeviceMapParams) -> int:
    """The CUDA-graph pool of one GPU's decode graphs, all captured at load (engine/runner.DecodeGraphs).

    Graphs share one private pool, captured largest first, so the pool peaks at the largest graph's
    transients: one decoder layer's decode step at the largest batch bucket and context bucket. That memory
    stays with the graphs (the allocator does not lend it to prefill), so it is planned on top of the
    activation reserve. Plus GRAPH_POOL_SLACK_BYTES."""
    bsz = _pow2_at_least(min(params.max_batch_size, GRAPH_MAX_BATCH), 1)
    span = _pow2_at_least(params.max_seq_len, GRAPH_MIN_CONTEXT)
    step = layer_step_bytes(config, dtype, bsz, 1, bsz, span, "cuda", not triton_decode(config, dtype))
    return step + GRAPH_POOL_SLACK_BYTES


HEAD_MIN_ROWS = 64
"""Rows of logits the head computes at once, at least: a step's logits are computed that many rows at a time
(engine/runner.py `_logits`). Fewer would read the whole lm_head more often in a decode step of many
sequences (benchmarks/head_slices.py)."""
SAMPLER_MIN_ROWS = 8
"""Rows of logits sampled or scored (logprobs) at once, at least: the sampler's transients per row are
several times the logits' own (SAMPLER_BYTES_PER_LOGIT) and need no weight read, so a small slice bounds
them. Each slice pays every sampler op's launch: on a busy 2-core CPU, 256 rows top-p in slices of 8 took 2.8x
the time of one batch, of 32 1.2x (benchmarks/head_slices.py --sampler); greedy-only steps are not sliced.
32 rows cost 0.1 GiB more of reserve with Llama-3's vocabulary (0.25 GiB with Gemma 3's) on every device
with the head, for steps of 9+ sampled sequences at once: it raised the planned/measured ratio of small
budgets past the issue-11 targets (benchmarks/RESULTS-fit_grid.md, run 9), so memory wins here."""
SAMPLER_BYTES_PER_LOGIT = 40
"""Peak bytes the sampler and logprobs add per logit of a slice, on its fp32 logits: top-p's sort (fp32 values
+ int64 order), its cumulative sum, the scaled and softmaxed copies, the noise, penalties' and grammar masks'
copies. Measured at 33 with penalties + top-p + logprobs on SmolLM2 (tests/test_head_slices.py), plus the
packed grammar masks of every constrained row of a step (256 x vocab / 8 bytes at most, where the head runs
on the CPU): 1 more per logit of a 32-row slice."""


def head_rows(max_batch_size: int) -> int:
    """Rows of logits the head computes at once: what the plan reserves (head_activation_bytes) and the
    runner computes, whatever a step holds (every running sequence's decode, a chunk's prompt logprobs)."""
    return max(max_batch_size, HEAD_MIN_ROWS)


def sampler_rows(max_batch_size: int) -> int:
    """Rows of logits sampled or scored at once (within a slice of head_rows)."""
    return max(max_batch_size, SAMPLER_MIN_ROWS)


def head_activation_bytes(config: ModelConfig, dtype: str, max_batch_size: int) -> int:
    """The head's transients at their peak, whatever the number of rows a step has: one slice of
    head_rows(max_batch_size) rows (lm_head output in the model dtype and fp32 logits, rows x vocab each,
    and the normed hidden states), and the sampler's transients on sampler_rows of them
    (tests/test_head_slices.py measures the runner against it)."""
    v, rows = config.vocab_size, head_rows(max_batch_size)
    sampled = sampler_rows(max_batch_size) * v * SAMPLER_BYTES_PER_LOGIT
    logits = 4 if dtype == "f32" else dtype_bytes(dtype) + 4  # f32: the lm_head's output is the logits
    return rows * v * logits + sampled + rows * config.hidden_size * 4


def embed_activation_bytes(config: ModelConfig, dtype: str, params: AutoDeviceMapParams) -> int:
    """The embedding gather's output for the largest step, plus its int64 token ids."""
    tokens = step_tokens(params)
    return tokens * (config.hidden_size * dtype_bytes(dtype) + 8)


@dataclass(frozen=True)
class Requirements:
    """Everything the planner needs, as numbers: what each part of the model costs on a device."""

    layer_weight: tuple[int, ...]
    layer_kv: tuple[int, ...]
    embed_weight: int
    head_weight: int  # norm + lm_head (tied: norm only)
    tied_weight: int  # the shared matrix when embeddings are tied (0 otherwise)
    layer_activation: Mapping[str, int]  # by device kind ("cuda", "mps", "cpu"): one layer's peak transients
    head_activation: int
    embed_activation: int
    isq_activation: int
    isq_load: int = 0  # ISQ: quantizing one chunk while loading, before the KV pool and activations exist
    cuda_context: int = CUDA_CONTEXT_BYTES
    gpu_runtime: int = CUDA_KERNELS_BYTES
    cpu_runtime: int = CPU_RUNTIME_BYTES + CPU_LOAD_LEFTOVER_BYTES  # (+ the tokenizer: `requirements`)
    # every weight in CPU memory as a GGUF's kept blocks: no load leftover (None: not such a load)
    cpu_runtime_kept: int | None = None
    load_staging: int = 0  # CPU, while loading
    load_staging_after: int = 0  # weights loaded after the largest staged tensor (WeightEstimate)
    load_staging_cpu: int | None = None  # a GGUF's kept blocks, every weight in CPU memory: no f32 staging
    load_staging_cpu_after: int = 0
    graph_pool: int = 0  # a GPU that runs resident layers: its decode CUDA graphs (graph_pool_bytes)
    notes: tuple[str, ...] = field(default=())
    layer_cpu_extra: tuple[int, ...] = ()  # per layer: extra bytes when computed on the CPU (int4 dense copy)
    layer_params: tuple[int, ...] = ()  # per layer: weights (elements), for the cost model's FLOPs
    vision_weight: int = 0  # vision models: the tower and projector (stage "vision")
    vision_activation: int = 0  # encoding max_num_images images of max_image_length edge (slack included)
    image_tokens: int = 0  # per sequence: max_num_images images of max_image_length edge
    vision_kv: int = 0  # their share of the layers' KV cache (in layer_kv), for max_batch_size sequences
    layer_experts: tuple[int, ...] = ()  # per layer: its experts stage's bytes (in layer_weight); MoE only
    expert_activation: int = 0  # transients of one layer's experts, on the device that holds them
    # a GGUF's blocks kept quantized: bytes in CPU memory where they differ from the GPU's (layer_weight etc.;
    # empty / None: the same), and a GPU's largest kept projection dequantized for a prompt's GEMM
    layer_cpu_weight: tuple[int, ...] = ()
    embed_cpu_weight: int | None = None
    head_cpu_weight: int | None = None
    tied_cpu_weight: int | None = None
    tied_cpu_shared: int = 0
    # a GPU that runs layers: what steps that dequantize weights for a GEMM (ISQ, a GGUF's kept blocks) add to
    # layer_activation (gpu_dequant_excess), or the head's dequantized chunk if larger
    gpu_dequant: int = 0
    prefill_tokens: int = 0  # tokens of the largest planned prefill step (the cost model's long-prompt test)

    def layer_bytes(self, i: int, kind: str) -> int:
        """Layer i's weights on a device of `kind` (CPU memory also holds the streamed layers' weights)."""
        return self.layer_cpu_weight[i] if kind == "cpu" and self.layer_cpu_weight else self.layer_weight[i]

    @property
    def cpu_layer_weight(self) -> tuple[int, ...]:
        """Per layer, the bytes in CPU memory: what a CPU reads to compute it, and what streaming copies."""
        return self.layer_cpu_weight or self.layer_weight

    def embed_bytes(self, kind: str) -> int:
        return (
            self.embed_cpu_weight
            if kind == "cpu" and self.embed_cpu_weight is not None
            else self.embed_weight
        )

    def expert_weight(self, i: int) -> int:
        return self.layer_experts[i] if self.layer_experts else 0

    def cpu_extra(self, i: int) -> int:
        return self.layer_cpu_extra[i] if self.layer_cpu_extra else 0

    @property
    def num_layers(self) -> int:
        return len(self.layer_weight)

    def head_weight_on(self, head_device: str, embed_device: str) -> int:
        """The head's bytes on its device: a tied head shares the embedding matrix only on the same device."""
        if head_device == "cpu" and self.head_cpu_weight is not None:
            tied = 0
            if self.tied_weight:
                tied = self.tied_cpu_weight if embed_device != "cpu" else self.tied_cpu_shared
            return self.head_cpu_weight + (tied or 0)
        return self.head_weight + (self.tied_weight if head_device != embed_device else 0)

    def activation(
        self, kind: str, runs_layers: bool, has_head: bool, has_embed: bool, experts: bool = False
    ) -> int:
        """Activation reserve of a device (slack included); 0 when it runs nothing. `experts`: it computes
        the experts of layers that run elsewhere (MoE)."""
        part = ActivationEstimate(
            layers=(self.layer_activation[kind] if runs_layers else 0)
            + (self.expert_activation if runs_layers or experts else 0),
            head=self.head_activation if has_head else 0,
            embed=self.embed_activation if has_embed else 0,
            isq=(self.isq_activation if kind == "cpu" else self.gpu_dequant) if runs_layers else 0,
            kind=kind,
        )
        return max(part.total, self.isq_load if runs_layers or has_head else 0)  # ISQ: quantizing at load

    def stream_staging(
        self, streamed: tuple[int, ...] | list[int], cpu_computed: tuple[int, ...] | list[int] = ()
    ) -> int:
        """GPU bytes for streaming `streamed` layers: STREAM_BUFFERS staging buffers of the largest one, plus,
        when CPU-computed layers exist (they are streamed too for long prefills, with what they hold in CPU
        memory: in a map that streams, an int4 layer keeps no dense copy, quant/formats.py), one layer's KV
        window gathered from CPU memory."""
        if not streamed and not cpu_computed:
            return 0
        largest = max(self.cpu_layer_weight[i] for i in (*streamed, *cpu_computed))  # packed as held
        window = max(self.layer_kv) if cpu_computed and self.layer_kv else 0
        return STREAM_BUFFERS * largest + window

    def other(
        self, kind: str, used: bool, context_included: bool, graphs: bool = False, after_load: int = 0,
        all_cpu: bool = False,
    ) -> int:  # fmt: skip
        """Fixed reserves outside the model: CUDA context and kernels on a used GPU, and its decode graphs'
        pool when it runs resident layers (`graphs`); the runtime and load staging on the CPU (always: the
        process lives there). Load staging is freed before the KV pool and the activations exist: only its
        excess over them (`after_load`: the row's KV + activations) is added."""
        if kind == "cpu":  # `all_cpu`: every weight goes to CPU memory (load_staging_cpu applies)
            kept = all_cpu and self.load_staging_cpu is not None
            staging = self.load_staging_cpu if kept else self.load_staging
            runtime = (
                self.cpu_runtime_kept if kept and self.cpu_runtime_kept is not None else self.cpu_runtime
            )
            return runtime + max(0, staging - after_load)
        if not used:
            return 0
        context = 0 if context_included or kind != "cuda" else self.cuda_context
        pool = self.graph_pool if graphs and kind == "cuda" else 0
        return context + pool + (self.gpu_runtime if kind == "cuda" else 0)


def requirements(
    config: ModelConfig,
    params: AutoDeviceMapParams,
    dtype: str,
    tensors: Mapping[str, TensorLike] | None = None,
    isq: int | None = None,
    paged: bool = True,
    keep: GGUFKeep | None = None,
) -> Requirements:
    """The memory model for one model and set of mapping parameters. `tensors` empty or None: analytic from
    the config (config.json only). `keep`: a GGUF's default mode (blocks kept quantized, without ISQ)."""
    analytic = not tensors
    weights = weight_estimate(tensors or config_tensors(config, dtype), config, dtype, isq, keep)
    arch = _arch(config)
    specs = arch.layer_specs(config)
    vision_act, notes, image_tokens, text_seq, cross = 0, (), 0, params.max_seq_len, {}
    if getattr(arch, "takes_images", False):  # the images' tokens join each sequence's text in the KV cache
        n, edge = params.max_num_images, params.max_image_length
        image_tokens = n * arch.image_tokens(config, edge)
        params = dataclasses.replace(params, max_seq_len=params.max_seq_len + image_tokens)
        raw = arch.vision_activation_bytes(config, dtype_bytes(dtype), n, edge)
        vision_act = int(raw * (1 + ALLOCATOR_SLACK_FRACTION))
        notes = (f"vision: {n} image(s) of {edge} px = {image_tokens} tokens per sequence in the KV cache",)
        if getattr(arch, "cross_attention", False):  # cross layers keep K/V of the images per sequence
            per = arch.cross_kv_bytes(config, dtype_bytes(dtype), n) * params.max_batch_size
            cross = dict.fromkeys(config.extra["cross_attention_layers"], per)
            notes += (
                f"vision: the images' K/V in {len(cross)} cross-attention layers, {per / GiB:.2f} GiB each",
            )
    seq, batch = params.max_seq_len, params.max_batch_size
    kv = tuple(
        kv_cache_bytes_per_layer(config, dtype, seq, batch, paged, s.kv) + cross.get(i, 0)
        for i, s in enumerate(specs)
    )
    text_kv = sum(kv_cache_bytes_per_layer(config, dtype, text_seq, batch, paged, s.kv) for s in specs)
    notes = (("sizes computed from config.json (no weight files read)",) if analytic else ()) + notes
    tokenizer = config.vocab_size * TOKENIZER_BYTES_PER_TOKEN
    kept_load = weights.staging_cpu_bytes is not None and weights.staging_cpu_bytes <= CPU_LOAD_LEFTOVER_BYTES
    return Requirements(
        cpu_runtime=CPU_RUNTIME_BYTES + CPU_LOAD_LEFTOVER_BYTES + tokenizer,
        cpu_runtime_kept=CPU_RUNTIME_BYTES + tokenizer if kept_load else None,
        layer_weight=weights.layer_bytes,
        layer_cpu_extra=weights.layer_cpu_extra,
        layer_params=weights.layer_params,
        layer_experts=weights.layer_expert_bytes,
        expert_activation=expert_activation_bytes(config, dtype, params),
        layer_kv=kv,
        embed_weight=weights.embed_bytes,
        head_weight=weights.head_bytes,
        tied_weight=weights.tied_bytes,
        layer_activation={
            k: layer_activation_bytes(config, dtype, params, k) for k in ("cuda", "mps", "cpu")
        },
        head_activation=head_activation_bytes(config, dtype, params.max_batch_size),
        embed_activation=embed_activation_bytes(config, dtype, params),
        isq_activation=weights.isq_dequant_bytes,
        isq_load=isq_load_transient_bytes(dtype, isq_chunk_elements(config)) if isq else 0,
        load_staging=weights.staging_bytes,
        load_staging_after=weights.staging_after_bytes,
        load_staging_cpu=weights.staging_cpu_bytes,
        load_staging_cpu_after=weights.staging_cpu_after_bytes,
        graph_pool=graph_pool_bytes(config, dtype, params),
        notes=notes,
        vision_weight=weights.vision_bytes,
        vision_activation=vision_act,
        image_tokens=image_tokens,
        vision_kv=sum(kv) - text_kv,
        layer_cpu_weight=weights.layer_cpu_bytes,
        embed_cpu_weight=weights.embed_cpu_bytes,
        head_cpu_weight=weights.head_cpu_bytes,
        tied_cpu_weight=weights.tied_cpu_bytes,
        tied_cpu_shared=weights.tied_cpu_shared_bytes,
        gpu_dequant=gpu_dequant_excess(config, dtype, params, isq, weights),
        prefill_tokens=min(MAX_BATCHED_TOKENS, seq * batch),
    )


class ByteBudget:
    """What a device row holds against what it may hold: mixed into the planner's `DeviceRow` and the
    tensor-parallel `TPGpu` (dataclasses with weight/kv_cache/activation/other_bytes and capacity_bytes)."""

    weight_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    other_bytes: int
    capacity_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes + self.other_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.capacity_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0
