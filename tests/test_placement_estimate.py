"""The memory model: ISQ formats, weight bytes from headers and from config.json, KV cache, activations."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spillover.config import AutoDeviceMapParams, ModelConfig
from spillover.errors import ConfigError
from spillover.placement import estimate as E
from spillover.quant.formats import (
    isq_note,
    isq_stored_tensors,
    parse_isq,
    quantized_nbytes,
)

GiB = 1 << 30


@pytest.fixture(scope="module")
def smollm2_source(smollm2):
    from spillover.loading.source import open_source

    return open_source(smollm2)


LLAMA3_8B = ModelConfig.from_hf(
    {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}
)  # fmt: skip


def test_int8_stores_one_byte_per_weight_plus_f16_scale_and_offset_per_group_of_32():
    assert quantized_nbytes((4096, 4096), 8) == 4096 * 4096 + 4096 * 128 * 2 * 2  # 36 bytes per 32 weights
    assert quantized_nbytes((8, 40), 8) == 8 * 64 + 8 * 2 * 4  # input padded to 2 whole groups


def test_int4_packs_two_per_byte_with_scale_and_zero_per_group_of_32():
    out, inp = 14336, 4096
    groups = inp // 32
    assert quantized_nbytes((out, inp), 4) == out * inp // 2 + out * groups * 2 * 2
    assert quantized_nbytes((8, 33), 4) == 8 * 32 + 8 * 2 * 4  # input padded to 2 whole groups
    shapes = isq_stored_tensors((out, inp), 4)
    assert shapes["qweight"] == ((out, inp // 2), "u8") and shapes["scale"] == ((out, groups), "bf16")


def test_int4_is_five_bits_per_weight():
    assert quantized_nbytes((1024, 1024), 4) * 8 / (1024 * 1024) == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("raw", "bits"),
    [(None, None), ("none", None), ("4", 4), (8, 8), ("q4", 4), ("int8", 8), ("q4k", 4), ("Q4_0", 4),
     ("q4_1", 4), ("Q5K", 8), ("q5_0", 8), ("q6k", 8), ("Q8_0", 8), ("q8k", 8)],
)  # fmt: skip
def test_parse_isq(raw, bits):
    assert parse_isq(raw) == bits


@pytest.mark.parametrize("raw", ["3", "q4_k_m", "abc", 16, True])
def test_parse_isq_rejects_with_the_list(raw):
    with pytest.raises(ConfigError, match="not a known quantization; use one of: .*q4k.*q8_0"):
        parse_isq(raw)


def test_isq_note_names_the_format():
    assert isq_note(None) is None
    assert "int4" in isq_note("q4k") and "nearest spillover format to q4k" in isq_note("q4k")
    assert isq_note("8").startswith("--isq 8: int8") and "nearest" not in isq_note("8")


def test_analytic_llama3_8b_has_8b_parameters():
    tensors = E.config_tensors(LLAMA3_8B)
    params = sum(math.prod(t.shape) for t in tensors.values())
    assert params == 8_030_261_248  # Meta-Llama-3-8B's parameter count
    w = E.weight_estimate(tensors, LLAMA3_8B, "bf16")
    assert sum(w.layer_bytes) + w.embed_bytes + w.head_bytes == 2 * params
    assert w.tied_bytes == 0 and len(set(w.layer_bytes)) == 1


def test_headers_and_config_agree_on_the_real_gguf(smollm2_source):
    src = smollm2_source
    from_headers = E.weight_estimate(src.tensors, src.config, "bf16")
    from_config = E.weight_estimate(E.config_tensors(src.config), src.config, "bf16")
    assert from_headers.layer_bytes == from_config.layer_bytes
    assert from_headers.embed_bytes == from_config.embed_bytes
    assert src.config.tie_word_embeddings and from_headers.tied_bytes == from_headers.embed_bytes
    # Q4_1 blocks are dequantized in fp32 on the CPU: three fp32 copies of the embedding matrix
    assert from_headers.staging_bytes == 3 * 4 * math.prod(src.tensors["model.embed_tokens.weight"].shape)


def test_isq_shrinks_layers_but_not_embeddings():
    bf16 = E.weight_estimate(E.config_tensors(LLAMA3_8B), LLAMA3_8B, "bf16")
    q8 = E.weight_estimate(E.config_tensors(LLAMA3_8B), LLAMA3_8B, "bf16", isq=8)
    q4 = E.weight_estimate(E.config_tensors(LLAMA3_8B), LLAMA3_8B, "bf16", isq=4)
    assert q4.layer_bytes[0] < q8.layer_bytes[0] < bf16.layer_bytes[0]
    assert q4.embed_bytes == q8.embed_bytes == bf16.embed_bytes
    norm = 4096 * 2
    assert bf16.head_bytes == norm + 128256 * 4096 * 2
    # lm_head: int8 codes, an f16 scale and offset per group of 32
    assert q4.head_bytes == q8.head_bytes == norm + 128256 * 4096 * 36 // 32
    assert q4.isq_dequant_bytes == 2 * 14336 * 4096 * 2  # a prompt dequantizes the fused gate_up to bf16


def test_a_device_running_isq_layers_reserves_at_least_the_load_transient():
    """Loading quantizes in chunks while the KV and activation room is still free: that room must hold the
    largest chunk's transient: a whole QUANT_CHUNK_ELEMENTS chunk for an 8B, a small model's largest weight."""
    params = AutoDeviceMapParams(max_seq_len=64, max_batch_size=1)
    big = LLAMA3_8B.replace(num_hidden_layers=2)
    load = E.isq_load_transient_bytes("f32")
    q4 = E.requirements(big, params, "f32", isq=4)
    assert E.isq_chunk_elements(big) == E.QUANT_CHUNK_ELEMENTS
    assert q4.isq_load == load and q4.activation("cuda", True, True, True) >= load
    assert q4.activation("cuda", False, True, False) >= load  # the head is quantized where it lives (int8)
    assert q4.activation("cuda", False, False, True) < load  # the embedding is not quantized
    tiny = LLAMA3_8B.replace(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1000, num_hidden_layers=2)  # fmt: skip
    small = E.requirements(tiny, params, "f32", isq=4)
    assert E.isq_chunk_elements(tiny) == 2 * 512 * 256  # gate_up, the largest (the head: 1000 x 256)
    assert small.isq_load == E.isq_load_transient_bytes("f32", 2 * 512 * 256) < load // 50
    assert small.activation("cuda", True, True, True) >= small.isq_load


def test_tied_head_counts_the_matrix_only_on_another_device():
    cfg = LLAMA3_8B.replace(tie_word_embeddings=True)
    req = E.requirements(cfg, AutoDeviceMapParams(), "bf16")
    assert req.head_weight_on("cuda:0", "cuda:0") == 4096 * 2
    assert req.head_weight_on("cuda:0", "cpu") == 4096 * 2 + 128256 * 4096 * 2


def test_kv_cache_formula_llama3_8b():
    # 2 (K,V) x 1 x 4096 x 8 heads x 128 x 2 bytes = 16 MiB per layer, 512 MiB for 32 layers
    assert E.kv_cache_bytes_per_layer(LLAMA3_8B, "bf16", 4096, 1) == 16 << 20


def test_paged_attention_rounds_up_to_whole_blocks():
    paged = E.kv_cache_bytes_per_layer(LLAMA3_8B, "bf16", 4097, 2, paged=True)
    contiguous = E.kv_cache_bytes_per_layer(LLAMA3_8B, "bf16", 4097, 2, paged=False)
    assert paged == E.kv_cache_bytes_per_layer(LLAMA3_8B, "bf16", 4096 + E.KV_BLOCK_SIZE, 2, paged=False)
    assert contiguous < paged
    assert E.kv_tokens_per_sequence(16, True) == 16 and E.kv_tokens_per_sequence(17, True) == 32


@given(
    seq=st.integers(1, 200_000), batch=st.integers(1, 64), dseq=st.integers(1, 5000), dbatch=st.integers(1, 8),
    paged=st.booleans(),
)  # fmt: skip
def test_kv_grows_with_seq_and_batch(seq, batch, dseq, dbatch, paged):
    kv = E.kv_cache_bytes_per_layer(LLAMA3_8B, "bf16", seq, batch, paged)
    assert E.kv_cache_bytes_per_layer(LLAMA3_8B, "bf16", seq + dseq, batch, paged) >= kv
    assert E.kv_cache_bytes_per_layer(LLAMA3_8B, "bf16", seq, batch + dbatch, paged) > kv
    if paged:
        assert kv % (E.KV_BLOCK_SIZE * 2 * batch * 8 * 128 * 2) == 0


@given(seq=st.integers(16, 65536), batch=st.integers(1, 16))
def test_activations_grow_with_seq_and_batch(seq, batch):
    p = AutoDeviceMapParams(max_seq_len=seq, max_batch_size=batch)
    bigger = AutoDeviceMapParams(max_seq_len=seq * 2, max_batch_size=batch * 2)
    for kind in ("cuda", "cpu"):
        assert E.layer_activation_bytes(LLAMA3_8B, "bf16", bigger, kind) >= E.layer_activation_bytes(
            LLAMA3_8B, "bf16", p, kind
        )


def test_cuda_attention_has_no_scores_cpu_math_path_does(monkeypatch):
    p = AutoDeviceMapParams(max_seq_len=32768)
    scores = 32 * 2048 * 32768 * 4  # heads x chunk x span, fp32
    cuda = E.layer_activation_bytes(LLAMA3_8B, "bf16", p, "cuda")
    assert cuda < scores
    assert E.layer_activation_bytes(LLAMA3_8B, "bf16", p, "cpu") < scores  # CPU flash kernel: no scores
    monkeypatch.setattr(E, "CPU_ATTENTION_MATERIALISES_SCORES", True)  # a math-path runner would need them
    cpu = E.layer_activation_bytes(LLAMA3_8B, "bf16", p, "cpu")
    assert cpu - cuda >= 2 * scores


def test_a_gpu_chunk_with_a_past_builds_no_mask_but_f32_and_the_cpu_do():
    """A 2048-token chunk at the end of a 32k context: on a GPU in bf16 flash attention takes torch's
    causal_lower_right bias (layers/attention.py), so no [chunk, context] mask exists; in f32 (the memory-
    efficient kernel) and on the CPU a bool mask and its additive copy do (3 bytes a pair in bf16)."""
    step = lambda kind, dtype: E.layer_step_bytes(LLAMA3_8B, dtype, 2048, 2048, 1, 32768, kind)  # noqa: E731
    mask = 2048 * 32768
    assert step("cpu", "bf16") - step("cuda", "bf16") >= 3 * mask
    assert (
        step("cuda", "f32") - step("cuda", "bf16") >= 5 * mask
    )  # (f32: bool + 4-byte copy, more of the rest)
    assert E.layer_activation_bytes(LLAMA3_8B, "bf16", AutoDeviceMapParams(max_seq_len=32768), "cuda") < (
        400 << 20
    )  # the MLP's 2048-token transients dominate, as at 4k


def test_prefill_is_chunked():
    a = E.layer_activation_bytes(LLAMA3_8B, "bf16", AutoDeviceMapParams(max_seq_len=4096), "cuda")
    b = E.layer_activation_bytes(
        LLAMA3_8B, "bf16", AutoDeviceMapParams(max_seq_len=4096, max_batch_size=4), "cuda"
    )
    # with 2048-token chunks the MLP transients do not grow with the batch, only decode-time gathers do
    assert b - a < 256 << 20


def test_llama3_8b_activation_order_of_magnitude():
    act = E.layer_activation_bytes(LLAMA3_8B, "bf16", AutoDeviceMapParams(), "cuda")
    # hidden+residual 32 MiB + MLP (2048 x 4 x 14336 bf16 = 224 MiB) + normed/down 32 MiB
    assert 250 << 20 < act < 400 << 20


def test_head_reserve_is_one_slice_of_rows_whatever_the_batch():
    """The runner computes logits head_rows at a time and samples them sampler_rows at a time (any number of
    sequences per step), so the reserve is that of one slice: the same up to the slices' minimum rows, then
    growing with max_batch_size (the slices are never smaller than the planned batch)."""

    def b(n: int) -> int:
        return E.head_activation_bytes(LLAMA3_8B, "bf16", n)

    assert b(1) == b(8) == b(E.SAMPLER_MIN_ROWS)
    assert (
        b(E.HEAD_MIN_ROWS) - b(1)
        == (E.HEAD_MIN_ROWS - E.SAMPLER_MIN_ROWS) * 128256 * E.SAMPLER_BYTES_PER_LOGIT
    )
    assert b(128) - b(64) == 64 * (128256 * (2 + 4 + E.SAMPLER_BYTES_PER_LOGIT) + 4096 * 4)
    # 64 rows of bf16 + fp32 logits, 8 rows of sampler transients: about 87 MiB for a 128k vocabulary
    assert 80 << 20 < b(1) < 95 << 20
    assert (E.head_rows(1), E.sampler_rows(1), E.head_rows(300), E.sampler_rows(300)) == (64, 8, 300, 300)


def test_resolve_model_dtype():
    assert E.resolve_model_dtype("auto", cuda_bf16=True) == "bf16"
    assert E.resolve_model_dtype("auto", cuda_bf16=False) == "f32"
    assert E.resolve_model_dtype("f16", cuda_bf16=True) == "f16"


def test_allocator_slack():
    assert E.with_allocator_slack(0) == 0
    assert E.with_allocator_slack(1000 << 20) == int((1000 << 20) * 1.1) + E.ALLOCATOR_SLACK_BYTES


def test_other_reserves():
    req = E.requirements(LLAMA3_8B, AutoDeviceMapParams(), "bf16")
    assert req.other("cuda", used=False, context_included=False) == 0
    assert req.other("cuda", used=True, context_included=True) == E.CUDA_KERNELS_BYTES
    assert req.other("cuda", used=True, context_included=False) == E.CUDA_KERNELS_BYTES + E.CUDA_CONTEXT_BYTES
    assert req.other("cpu", used=False, context_included=True) == req.cpu_runtime + req.load_staging
    # the runtime on the CPU: the process, what a converting load leaves, the tokenizer (by its vocabulary)
    tokenizer = 128256 * E.TOKENIZER_BYTES_PER_TOKEN
    assert req.cpu_runtime == E.CPU_RUNTIME_BYTES + E.CPU_LOAD_LEFTOVER_BYTES + tokenizer
    assert req.cpu_runtime_kept is None  # (no GGUF blocks kept: every load converts)


def test_estimates_import_no_torch():
    """Planning is pure (issue 14): the placement modules, the file readers, every architecture's description
    (models/arch/) and an estimate from them import no torch."""
    import subprocess
    import sys

    code = (
        "import sys, spillover.placement.planner, spillover.placement.estimate as E, spillover.placement.resolve\n"
        "import spillover.placement.report, spillover.loading.source\n"
        "from spillover.config import AutoDeviceMapParams, ModelConfig\n"
        "from spillover.models import REGISTRY, architecture\n"
        "archs = {architecture(t) for t in REGISTRY}\n"
        "cfg = ModelConfig.from_hf({'model_type': 'llama', 'hidden_size': 64, 'intermediate_size': 128,\n"
        "    'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'vocab_size': 100})\n"
        "req = E.requirements(cfg, AutoDeviceMapParams(), 'bf16', E.config_tensors(cfg), None, True)\n"
        "print(len(archs), req.num_layers, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["6", "2", "False"]


def test_each_model_class_is_its_architecture():
    """The planner reads an architecture's description (models/arch/<name>.py), the loader its model class
    (models/<name>.py): the class must be built on that very description, and serve the model types it lists."""
    from spillover.models import REGISTRY, architecture, model_class

    for model_type in REGISTRY:
        arch, cls = architecture(model_type), model_class(model_type)
        assert issubclass(cls, arch) and model_type in arch.model_types, model_type
