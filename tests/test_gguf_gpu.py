"""GGUF Q4_0 / Q4_1 projections kept 4-bit for a GPU (quant/gguf_gpu.py): the file's weights in ISQ's plain
int4 layout, checked against the GGUF reference dequantization; the kernels themselves on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spillover.loading.dequant import dequantize
from spillover.quant import gguf_gpu
from spillover.quant.gguf_native import BLOCK_BYTES


def _blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random well-formed blocks (finite f16 scales and offsets, any codes) as raw rows."""
    rng = np.random.default_rng(seed)
    nb, bb = rows * cols // 32, BLOCK_BYTES[qtype]
    b = rng.integers(0, 256, (nb, bb), dtype=np.uint8)
    b[:, :2] = rng.normal(0, 0.02, (nb, 1)).astype(np.float16).view(np.uint8)
    if qtype == "q4_1":
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


def test_mixed_q4_types_in_one_fused_projection():
    parts = [(_blocks("q4_0", 32, 64, 3), "q4_0"), (_blocks("q4_1", 32, 64, 4), "q4_1")]
    lin = gguf_gpu.int4_linear(parts, 64, None, "cpu")
    torch.testing.assert_close(lin.dequantize(torch.float32), _reference(parts, 64), atol=3e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 64])  # the GEMV (decode) and the dequantization into cuBLAS (prompts)
def test_kept_q4_projection_on_a_gpu(rows):
    parts = [(_blocks("q4_1", 1536, 4096, 5), "q4_1")]
    lin = gguf_gpu.int4_linear(parts, 4096, None, "cuda")
    ref = _reference(parts, 4096)
    x = torch.randn(rows, 4096, dtype=torch.bfloat16)
    y = lin(x.cuda()).float().cpu()
    torch.testing.assert_close(y, x.float() @ ref.T, atol=0.05, rtol=0.02)


def _write_q4_llama(path, qtype: str = "Q4_0") -> None:
    """A tiny random Llama GGUF whose projections are stored as `qtype` blocks (the rest f32), written as
    llama.cpp lays it out (q/k rows permuted for its rope)."""
    import gguf
    from conftest import tiny_llama_gguf_writer
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    t = gguf.GGMLQuantizationType[qtype]
    w = tiny_llama_gguf_writer(path, 2)
    f32 = lambda *s: rng.normal(0, 0.05, s).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", f32(320, 64))
    w.add_tensor("output_norm.weight", 1 + f32(64))
    w.add_tensor("output.weight", f32(320, 64))
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
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_a_q4_gguf_stays_4_bit_on_a_gpu(tmp_path, qtype):
    """The default mode of a GGUF on a GPU keeps its Q4 projections 4-bit (Int4Linear, plain layout):
    prompt logprobs close to the exact f32 CPU run of the same file."""
    from spillover import LLM, SamplingParams
    from spillover.quant.isq import Int4Linear

    path = tmp_path / f"tiny-{qtype}.gguf"
    _write_q4_llama(path, qtype)
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=True)
    prompt = list(range(10, 50))
    ref = LLM(str(path), dtype="f32", progress=False).generate(prompt, params)
    gpu = LLM(str(path), device_map="cuda", progress=False)
    assert isinstance(gpu.model.layers[0].self_attn.qkv_proj, Int4Linear)
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
