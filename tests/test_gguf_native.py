"""GGUF weights kept as the file has them (quant/gguf_native.py): the default mode of a GGUF on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spillover import LLM, SamplingParams
from spillover.loading.dequant import dequantize
from spillover.loading.source import open_source
from spillover.models import model_class
from spillover.quant import gguf_kernels as K
from spillover.quant import gguf_native as G
from spillover.quant.isq import unpack_cpu_int4


def _blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random but well-formed blocks: finite f16 scales/mins, any nibbles."""
    rng = np.random.default_rng(seed)
    nb, bb = rows * cols // K.BLOCK_SIZE[qtype], K.BLOCK_BYTES[qtype]
    b = rng.integers(0, 256, (nb, bb), dtype=np.uint8)
    at = {"q6_k": [208]}.get(qtype, [0, 2] if qtype in ("q4_1", "q4_k", "q5_k") else [0])
    for i in at:  # the f16 scale (and min)
        b[:, i : i + 2] = rng.normal(0, 0.02 if i == 0 else 0.1, (nb, 1)).astype(np.float16).view(np.uint8)
    return b.reshape(-1)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_block_decoding_matches_the_loader(qtype):
    from gguf.constants import GGMLQuantizationType

    raw = _blocks(qtype, 64, 96)
    ref = dequantize(raw, GGMLQuantizationType[qtype.upper()], (64, 96))
    got = G.dequantize_rows(torch.from_numpy(raw).view(64, -1), qtype, 64)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1"])
def test_int4_kernel_computes_the_file_weights(qtype):
    from gguf.constants import GGMLQuantizationType

    parts = [(torch.from_numpy(_blocks(qtype, n, 128, n)).view(n, -1), qtype) for n in (48, 16)]
    lin = G.GGUFInt4Linear(parts, 128)
    ref = torch.cat([dequantize(p.numpy().reshape(-1), GGMLQuantizationType[qtype.upper()], (len(p), 128))
                     for p, _ in parts])  # fmt: skip
    # the kernel's (scale, zero) and output are bf16: the weights agree to bf16 precision
    torch.testing.assert_close(lin.dequantize(torch.float32), ref, atol=2e-3, rtol=1e-2)
    x = torch.randn(5, 128)
    y = lin(x)
    assert y.dtype == torch.float32 and y.shape == (5, 64)
    torch.testing.assert_close(y, x @ ref.T, atol=0.05, rtol=0.02)
    # what a GPU does with these bytes when the layer is streamed there (unpack_cpu_int4), here on the CPU
    w = unpack_cpu_int4(lin.qweight, lin.scales_zeros, 128, torch.float32)
    torch.testing.assert_close(w, ref, atol=2e-3, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kept_int4_layer_runs_on_a_gpu_from_its_cpu_bytes():
    """A GGUF layer kept 4-bit on the CPU and streamed to a GPU for a long prompt (engine/offload.py)."""
    parts = [(torch.from_numpy(_blocks("q4_1", 64 * 3 + 16, 256, 3)).view(64 * 3 + 16, -1), "q4_1")]
    lin = G.GGUFInt4Linear(parts, 256)
    x = torch.randn(40, 256)
    params = {n: p.cuda() for n, p in lin.named_parameters()}
    y = torch.func.functional_call(lin, params, (x.cuda(),))
    torch.testing.assert_close(y.cpu(), lin(x), atol=0.05, rtol=0.02)


needs_kernels = pytest.mark.skipif(K.library() is None, reason="no C compiler for quant/gguf_cpu.c")


@needs_kernels
@pytest.mark.parametrize("qtype", list(K.TYPES))
def test_block_kernels_compute_the_f32_path(qtype):
    from gguf.constants import GGMLQuantizationType

    cols = 512 if qtype.endswith("_k") else 160
    raw = _blocks(qtype, 96, cols, 3)
    ref = dequantize(raw, GGMLQuantizationType[qtype.upper()], (96, cols))
    lin = G.GGUFLinear([(torch.from_numpy(raw).view(96, -1), qtype)], cols)
    assert torch.equal(lin.dequantize(torch.float32), ref)  # each block dequantized as the loader does
    for rows in (1, 2, 3, 8, 9, 40):  # the GEMV (several passes of rows) and the prompt path
        x = torch.randn(rows, cols)
        y = lin(x)
        assert y.dtype == torch.float32 and y.shape == (rows, 96)
        exact = x.double() @ ref.double().T
        f32 = (x @ ref.T - exact).abs().max()  # what torch's own f32 product deviates by
        # Q4_0/Q4_1 take x as two bf16 parts (16 significant bits) for up to 8 rows; every other case as int16
        # per block of 32 (an error of at most 2^-16 of the block's largest |x|), but Q5_K: f32; all
        # accumulate in f32
        big = x.abs().view(rows, -1, 32).amax(-1, keepdim=True).expand(rows, -1, 32).reshape(rows, cols)
        gemv = rows <= K.GEMV_ROWS
        if qtype in ("q4_0", "q4_1") and gemv:
            xe = 2.0**-15 * x.abs()
        else:
            xe = 0 * x if qtype == "q5_k" else 2.0**-16 * big
        assert ((y - exact).abs() <= xe @ ref.abs().T + 4 * f32 + 1e-6).all()


@needs_kernels
@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q6_k"])
def test_prompt_gemm_writes_its_columns_only(qtype):
    """The prompt GEMM (int16 activations) on a partial panel of rows and a partial tile of inputs, writing
    into a column slice of a wider output, against the loader's f32 weights in f64."""
    from gguf.constants import GGMLQuantizationType

    cols = 512 if qtype.endswith("_k") else 96
    raw = _blocks(qtype, 50, cols, 4)
    ref = dequantize(raw, GGMLQuantizationType[qtype.upper()], (50, cols))
    x = torch.randn(13, cols)
    x[:, 5] = 40.0  # an outlier: the rest of its block keeps 15 bits relative to it
    x[3, 64:96] = 1e4  # a block at the int16 limits: its integer dots must not overflow
    out = torch.full((13, 60), 7.0)
    if not K.gemm(torch.from_numpy(raw).view(50, -1), qtype, x, out[:, 3:53]):
        pytest.skip("no AVX512-VNNI")
    assert (out[:, :3] == 7).all() and (out[:, 53:] == 7).all()
    exact = x.double() @ ref.double().T
    big = x.abs().view(13, -1, 32).amax(-1, keepdim=True).expand(13, -1, 32).reshape(13, cols)
    err = (out[:, 3:53] - exact).abs()
    f32 = (x @ ref.T - exact).abs().max()
    assert (err <= 2.0**-16 * big @ ref.abs().T + 4 * f32 + 1e-5).all()
    assert err.max() > 0  # (not the f32 path by accident)


@needs_kernels
@pytest.mark.parametrize("hd", [64, 32, 256])
def test_prompt_attention_matches_sdpa(hd):
    """The C causal attention of a fresh prompt (grouped kv heads, a length that is no multiple of 16, rows of a
    wider qkv) against torch's SDPA."""
    import torch.nn.functional as F

    a = K.LayerArgs()
    a.nh, a.nkv, a.hd, a.scale = 6, 2, hd, hd**-0.5
    T, nq, nkv = 37, 6 * hd, 2 * hd
    qkv = torch.randn(T + 3, nq + 2 * nkv)
    out = torch.full((T + 3, nq), 7.0)
    if not K.attn_causal(qkv, 3, T, a, out):
        pytest.skip("no AVX-512 attention kernel")
    q, k, v = (t.view(T, -1, hd).transpose(0, 1)[None] for t in qkv[3:].split([nq, nkv, nkv], dim=1))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=a.scale, enable_gqa=True)
    torch.testing.assert_close(out[3:], ref[0].transpose(0, 1).reshape(T, nq), atol=2e-6, rtol=1e-5)
    assert (out[:3] == 7).all()


@needs_kernels
def test_parts_of_different_types_stay_apart():
    from gguf.constants import GGMLQuantizationType as Q

    a, b = _blocks("q5_0", 32, 256, 1), _blocks("q8_0", 16, 256, 2)
    parts = G.fused_raw(
        [(torch.from_numpy(a).view(32, -1), "q5_0"), (torch.from_numpy(b).view(16, -1), "q8_0")]
    )
    lin = G.GGUFLinear(parts, 256)
    ref = torch.cat([dequantize(a, Q.Q5_0, (32, 256)), dequantize(b, Q.Q8_0, (16, 256))])
    x = torch.randn(2, 256)
    assert len(lin.qtypes) == 2 and torch.equal(lin.dequantize(torch.float32), ref)
    big = x.abs().view(2, -1, 32).amax(-1, keepdim=True).expand(2, -1, 32).reshape(2, 256)
    err = (lin(x) - (x.double() @ ref.double().T)).abs()  # x as int16 per block of 32 (Q5_0, Q8_0 GEMVs)
    assert (err <= 2.0**-16 * big @ ref.abs().T + 1e-5).all()


@needs_kernels
def test_q4_0_parts_fuse_with_q4_1_exactly():
    from gguf.constants import GGMLQuantizationType as Q

    a, b = _blocks("q4_0", 32, 64, 1), _blocks("q4_1", 16, 64, 2)
    [(raw, qtype)] = G.fused_raw(
        [(torch.from_numpy(a).view(32, -1), "q4_0"), (torch.from_numpy(b).view(16, -1), "q4_1")]
    )
    ref = torch.cat([dequantize(a, Q.Q4_0, (32, 64)), dequantize(b, Q.Q4_1, (16, 64))])
    assert qtype == "q4_1" and torch.equal(G.GGUFLinear([(raw, qtype)], 64).dequantize(torch.float32), ref)


def test_fused_projection_undoes_the_qk_permutation(smollm2):
    src = open_source(smollm2)
    arch = model_class("llama")
    names = [f"model.layers.3.self_attn.{p}_proj.weight" for p in "qkv"]
    parts = G.native_parts(src, names, arch)
    ref = torch.cat([src.load(n) for n in names])  # dequantized and unpermuted by the loader
    lin = G.GGUFInt4Linear([(r, q) for r, q in parts if q in G.INT4_TYPES], 576)
    torch.testing.assert_close(lin.dequantize(torch.float32), ref, atol=0.05, rtol=1e-2)
    if K.library() is not None:
        assert torch.equal(G.GGUFLinear(G.fused_raw(parts), 576).dequantize(torch.float32), ref)


@pytest.fixture(scope="module")
def native(smollm2):
    return LLM(smollm2, progress=False, max_seq_len=512)


@pytest.fixture(scope="module")
def ref(smollm2):
    return LLM(smollm2, dtype="f32", progress=False, max_seq_len=512)


def test_default_mode_keeps_the_blocks(native, ref):
    m = native.model
    lin, head = (G.GGUFLinear, G.GGUFLinear) if K.library() else (G.GGUFInt4Linear, G.Int8Head)
    assert isinstance(m.layers[0].self_attn.qkv_proj, lin) and isinstance(m.layers[0].mlp.gate_up_proj, lin)
    assert isinstance(m.embed_tokens, G.GGUFEmbedding) and isinstance(m.lm_head, head)
    held = sum(p.nbytes for p in m.parameters())
    f32 = sum(p.numel() * 4 for p in ref.model.parameters())
    assert held < 0.3 * f32  # 4-bit projections and an 8-bit head, no f32 copy


def test_default_mode_agrees_with_f32(native, ref):
    text = (
        "The quick brown fox jumps over the lazy dog. In 1889, the Eiffel Tower was completed in Paris, and it "
        "remained the tallest structure in the world for forty-one years, until the Chrysler Building in New York."
    )
    ids = native.encode(text)
    p = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)
    a = [x for x in native.generate(ids, p).prompt_logprobs if x is not None]
    b = [x for x in ref.generate(ids, p).prompt_logprobs if x is not None]
    dev = (torch.tensor(a) - torch.tensor(b)).abs()
    if K.library() is None:  # torch's int4 kernel: bf16 activations and outputs
        assert dev.mean() < 0.1 and dev.max() < 1.0  # measured on 644 tokens: 0.051 mean, 0.38 max
    else:  # the file's blocks, prompts with int16 activations (15 bits per block of 32): near the reference
        assert (
            dev.mean() < 3e-3 and dev.max() < 0.03
        )  # 644 tokens: 0.0010 mean, 0.011 max (bf16 x: 0.045, 0.54)
    ans = [{"role": "user", "content": "What is the capital of France?"}]
    assert "Paris" in native.chat(ans, SamplingParams(max_tokens=12, temperature=0)).text


@needs_kernels
def test_fused_decode_layer_matches_the_f32_path(native, ref):
    """Decode steps run each layer as one C call (CPUDecodeLayer): a batch of three sequences of different
    lengths (padded slots, the lens path) decodes the tokens and logprobs of the f32 reference."""
    prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village far away",
    ]
    p = SamplingParams(max_tokens=16, temperature=0, logprobs=1, ignore_eos=True)
    for a, b in zip(native.generate(prompts, p), ref.generate(prompts, p), strict=True):
        assert a.token_ids == b.token_ids
        dev = max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True))
        assert dev < 0.02  # the prompts' int16 activations (decode alone: < 2e-3)
    assert isinstance(native.model.layers[0].__dict__.get("cpu_decode"), G.CPUDecodeLayer)  # it ran


@needs_kernels
def test_last_layer_runs_only_the_rows_a_logit_reads(native, ref, monkeypatch):
    """A prompt's last layer runs its o projection and MLP on the rows the head reads (here the last one), as
    llama.cpp does; its answer and logprob are the reference's. Prompt logprobs read every row: no selection."""
    seen = []
    run = K.prefill_layer

    def spy(args, x, attend, rows=None):
        seen.append(None if rows is None else rows.tolist())
        return run(args, x, attend, rows)

    monkeypatch.setattr(K, "prefill_layer", spy)
    ids = native.encode("In 1889 the Eiffel Tower was completed in Paris, the capital of")
    p = SamplingParams(max_tokens=1, temperature=0, logprobs=1)
    a, b = native.generate(ids, p), ref.generate(ids, p)
    n = len(native.model.layers)
    assert seen == [None] * (n - 1) + [[len(ids) - 1]]
    assert a.token_ids == b.token_ids and abs(a.logprobs[0].logprob - b.logprobs[0].logprob) < 0.02
    seen.clear()
    native.generate([ids[0] + 1, *ids[1:]], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True))
    assert seen == [None] * n


def test_without_a_compiler_torch_kernels_run(smollm2, monkeypatch):
    monkeypatch.setattr(K, "library", lambda: None)
    llm = LLM(smollm2, progress=False, max_seq_len=256)
    assert isinstance(llm.model.layers[0].self_attn.qkv_proj, G.GGUFInt4Linear)
    assert llm.model.layers[0].__dict__.get("cpu_decode", False) is False  # built on the first call
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=4, temperature=0))
    assert llm.model.layers[0].__dict__["cpu_decode"] is None and "Paris" in out.text


@needs_kernels
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kept_blocks_run_on_a_gpu_when_their_layer_is_streamed_there():
    """A CPU layer streamed to a GPU for a long prompt (engine/offload.py) brings its blocks along; the
    projection dequantizes them by chunks and multiplies on the GPU."""
    from gguf.constants import GGMLQuantizationType

    raw = _blocks("q4_k", 64, 512, 5)
    lin = G.GGUFLinear([(torch.from_numpy(raw).view(64, -1), "q4_k")], 512)
    x = torch.randn(40, 512)
    params = {n: p.cuda() for n, p in lin.named_parameters()}
    y = torch.func.functional_call(lin, params, (x.cuda(),))
    # against the exact product (the CPU path's prompt GEMM rounds x to int16 per block: a different error)
    w = dequantize(raw.reshape(-1), GGMLQuantizationType.Q4_K, (64, 512))
    ref = (x.double() @ w.double().T).float()
    # f32 dequantization and GEMM: errors ~1e-6 of the outputs' scale (the CPU path's int16 x: ~2e-5)
    torch.testing.assert_close(y.cpu(), ref, atol=4e-6 * ref.abs().max().item(), rtol=1e-5)
