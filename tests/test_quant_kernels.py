"""The Triton weight-only kernels (quant/kernels.py) against dequantize-then-matmul, in Triton's CPU
interpreter without a GPU (conftest.py sets TRITON_INTERPRET=1), on CUDA otherwise."""

from __future__ import annotations

import os

import pytest
import torch

from spillover.quant import kernels as K
from spillover.quant.isq import Int4Linear, Int8Linear

DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"
pytestmark = pytest.mark.skipif(
    not K.HAVE_TRITON or (DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="no CUDA and the kernels were not defined under TRITON_INTERPRET=1",
)
DTYPE = torch.float32 if DEV == "cpu" else torch.bfloat16


def _lin(inp: int, out: int) -> torch.nn.Linear:
    torch.manual_seed(inp * 1000 + out)
    return torch.nn.Linear(inp, out, bias=False, device=DEV)


# (in, out, tiling): whole tiles, a ragged last tile of output rows, an input that is not a whole number of
# tiles (nor of int4 groups: 100)
CASES = [(256, 48, (16, 64, 4)), (576, 40, (8, 128, 2)), (100, 24, (16, 64, 4))]


@pytest.mark.parametrize(("inp", "out", "cfg"), CASES)
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_w4_matches_dequantized_matmul(inp, out, cfg, rows):
    q = Int4Linear(_lin(inp, out))
    x = torch.randn(rows, inp, device=DEV, dtype=DTYPE)
    ref = x.float() @ q.dequantize(torch.float32).T
    y = K.gemv_w4(x, q.qweight, q.scale, q.zero, inp, cfg)
    assert y.dtype == DTYPE and y.shape == (rows, out)
    torch.testing.assert_close(y.float(), ref, atol=2e-2 if DTYPE == torch.bfloat16 else 1e-4, rtol=1e-2)


@pytest.mark.parametrize(("inp", "out", "cfg"), CASES)
def test_gemv_w8_matches_dequantized_matmul(inp, out, cfg):
    q = Int8Linear(_lin(inp, out))
    x = torch.randn(2, inp, device=DEV, dtype=DTYPE)
    ref = x.float() @ q.dequantize(torch.float32).T
    y = K.gemv_w8(x, q.qweight, q.scale, q.offset, (cfg[0], cfg[1] * 2, cfg[2]))
    torch.testing.assert_close(y.float(), ref, atol=2e-2 if DTYPE == torch.bfloat16 else 1e-4, rtol=1e-2)


@pytest.mark.parametrize("cfg", [(1, 4096, 4), (4, 4096, 8), (8, 2048, 8)])
def test_gemv_w8_wide_tiles_of_the_sweep(cfg):
    """Tilings benchmarks/quant_kernels.W8_SWEEP offers for the small matrices (one output row per program,
    4096 weights a step) on an input of 130 groups: one whole tile and a ragged one, against the f64 product."""
    q = Int8Linear(_lin(4160, 24))
    x = torch.randn(2, 4160, device=DEV, dtype=DTYPE)
    ref = x.double() @ q.dequantize(torch.float64).T
    y = K.gemv_w8(x, q.qweight, q.scale, q.offset, cfg)
    torch.testing.assert_close(y.double(), ref, atol=2e-2 if DTYPE == torch.bfloat16 else 1e-4, rtol=1e-2)


# word-kernel tilings (output rows, groups a step, warps, "words"): whole steps, a ragged last step of groups
# (9 of 8 + 1; 130 of 32 x 4 + 2), a ragged last tile of rows, an input that is not whole groups (100)
WORD_CASES = [(256, 48, (16, 4, 4)), (288, 40, (4, 8, 2)), (100, 24, (4, 2, 1)), (4160, 12, (4, 32, 4))]
# (variant, bits, case): every case for the rows kernel (the default tilings' kernel), the others on two cases
# each; rows2 pairs nibbles only (int4)
WORD_RUNS = [("rows", b, c) for b in (4, 8) for c in WORD_CASES]
WORD_RUNS += [("words", b, c) for b in (4, 8) for c in WORD_CASES[1:3]] + [
    ("rows2", 4, c) for c in WORD_CASES[::2]
]


@pytest.mark.parametrize(("variant", "bits", "case"), WORD_RUNS)
def test_word_gemvs_match_the_f64_product(variant, bits, case):
    """The GEMVs on 32-bit words (nibbles and bytes put into f32 mantissas as 1 + q/16 and 1 + q/256, each group's
    sum of x taken back out) against the f64 product of the dequantized weights, 1 and 3 rows: within f32
    rounding, unlike the bf16 outputs' tolerance the other tests allow (the inputs here are f32 on the CPU)."""
    inp, out, tiles = case
    lin, cfg = _lin(inp, out), (*tiles, variant)
    q = Int4Linear(lin) if bits == 4 else Int8Linear(lin)
    for rows in (1, 3):
        x = torch.randn(rows, inp, device=DEV, dtype=DTYPE)
        ref = x.double() @ q.dequantize(torch.float64).T
        y = (
            K.gemv_w4(x, q.qweight, q.scale, q.zero, inp, cfg)
            if bits == 4
            else K.gemv_w8(x, q.qweight, q.scale, q.offset, cfg)
        )
        assert y.dtype == DTYPE and y.shape == (rows, out)
        err = (y.double() - ref).abs().max() / ref.abs().max()
        # rows2's low nibbles keep 4 bits less of the f32 sums (kernels._row_terms)
        assert err < (2e-2 if DTYPE == torch.bfloat16 else 1e-5 if variant == "rows2" else 2e-6), err


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("variant", ["words", "rows"])
def test_word_gemvs_read_experts_by_id(bits, variant):
    """Stacked experts [E, ...] read through each output row's expert id (MoE's gathered path), rows of x
    shared by rpt = 2 consecutive outputs, against each expert's own f64 product."""
    torch.manual_seed(3)
    lins = [torch.nn.Linear(96, 24, bias=False, device=DEV) for _ in range(3)]
    qs = [Int4Linear(lin) if bits == 4 else Int8Linear(lin) for lin in lins]
    q, s = torch.stack([m.qweight for m in qs]), torch.stack([m.scale for m in qs])
    z = torch.stack([m.zero if bits == 4 else m.offset for m in qs])
    idx = torch.tensor([2, 0, 1, 2], device=DEV)
    x = torch.randn(2, 96, device=DEV, dtype=DTYPE)
    cfg = (8, 2, 2, variant)
    y = K.gemv_w4(x, q, s, z, 96, cfg, idx, 2) if bits == 4 else K.gemv_w8(x, q, s, z, cfg, idx, 2)
    for p, e in enumerate(idx.tolist()):
        ref = qs[e].dequantize(torch.float64) @ x[p // 2].double()
        torch.testing.assert_close(
            y[p].double(), ref, atol=2e-2 if DTYPE == torch.bfloat16 else 1e-5, rtol=1e-2
        )


@pytest.mark.parametrize(("inp", "out", "tiles"), [(256, 48, (4, 16, 4)), (100, 24, (4, 8, 1))])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("variant", ["persist", "persist2"])
def test_persistent_gemvs_match_the_f64_product(inp, out, tiles, bits, variant):
    """The persistent word GEMV (x loaded once, a few programs looping over tiles of rows: 2 programs in the
    interpreter) where a row's chunks fit one step: whole (int8, 256 inputs: 16 chunks), ragged (int4: 8 groups
    in a step of 16; 100 inputs), against the f64 product; 2 rows of x."""
    lin, cfg = _lin(inp, out), (*tiles, variant, 2)
    q = Int4Linear(lin) if bits == 4 else Int8Linear(lin)
    x = torch.randn(2, inp, device=DEV, dtype=DTYPE)
    ref = x.double() @ q.dequantize(torch.float64).T
    y = (
        K.gemv_w4(x, q.qweight, q.scale, q.zero, inp, cfg)
        if bits == 4
        else K.gemv_w8(x, q.qweight, q.scale, q.offset, cfg)
    )
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < (2e-2 if DTYPE == torch.bfloat16 else 1e-5 if variant == "persist2" else 2e-6), err


@pytest.mark.parametrize("bits", [4, 8])
def test_word_gemvs_read_bf16_x_as_int64_exactly(bits):
    """bf16 x is read 4 values per 8-byte load (kernels._x_quad) where its rows allow: the same f32 values as
    the 2-byte loads ("-sx" tilings), so the same outputs bit for bit, and within bf16 rounding of the f64
    product; an input of 100 (a ragged last group) and a persistent tiling too."""
    for inp, cfg in ((256, (4, 8, 4, "rows")), (100, (4, 2, 1, "rows")), (256, (4, 16, 4, "persist", 2))):
        lin = _lin(inp, 24)
        q = Int4Linear(lin) if bits == 4 else Int8Linear(lin)
        x = torch.randn(3, inp, device=DEV).to(torch.bfloat16)
        assert K._x_words(x, inp, False)[2]  # packed
        sx = (*cfg[:3], cfg[3] + "-sx", *cfg[4:])
        if bits == 4:
            y, ys = (K.gemv_w4(x, q.qweight, q.scale, q.zero, inp, c) for c in (cfg, sx))
        else:
            y, ys = (K.gemv_w8(x, q.qweight, q.scale, q.offset, c) for c in (cfg, sx))
        assert torch.equal(y, ys)
        ref = x.double() @ q.dequantize(torch.float64).T
        assert ((y.double() - ref).abs().max() / ref.abs().max()) < 2e-2


def test_a_register_cap_changes_no_output():
    """A "-rN" suffix (kernels._launch_opts: Triton's maxnreg) is a launch option only: the same tiling computes
    the same outputs with and without it."""
    assert K._launch_opts((8, 64, 2, "rows2-r128")) == {"maxnreg": 128} and K._launch_opts((8, 64, 2)) == {}
    assert K._variant(["rows-sx-r96"]) == ("rows", True)
    q = Int4Linear(_lin(256, 24))
    x = torch.randn(2, 256, device=DEV).to(torch.bfloat16)
    y, yr = (K.gemv_w4(x, q.qweight, q.scale, q.zero, 256, (4, 8, 2, v)) for v in ("rows2", "rows2-r96"))
    assert torch.equal(y, yr)


@pytest.mark.parametrize("inp", [256, 100])
def test_dequant_w4_is_exact(inp):
    q = Int4Linear(_lin(inp, 24))
    w = K.dequant_w4(q.qweight, q.scale, q.zero, inp, torch.float32)
    assert torch.equal(w, q.dequantize(torch.float32))


@pytest.mark.parametrize("inp", [256, 100])
def test_dequant_w8_matches_the_modules_weights(inp):
    q = Int8Linear(_lin(inp, 24))
    w = K.dequant_w8(q.qweight, q.scale, q.offset, inp, torch.float32)
    torch.testing.assert_close(w, q.dequantize(torch.float32), atol=1e-7, rtol=1e-6)  # (a GPU fuses q s + o)


# every kind of tiling the int8 GEMV takes: the byte kernel's 3-tuples, the word kernels ("rows": the default
# tilings'; "words"; "persist": a row's chunks in one step), whole and ragged steps, inputs of whole groups or not
SYM_CFGS = [
    (4, 64, 2),
    (8, 256, 4),
    (4, 4, 4, "rows"),
    (4, 16, 1, "rows"),
    (8, 2, 2, "words"),
    (4, 16, 4, "persist", 2),
]


@pytest.mark.parametrize(("inp", "gs"), [(256, 32), (100, 16)])  # (groups of 16: a GGUF's Q6_K)
def test_symmetric_int8_reads_no_offsets(inp, gs):
    """A symmetric int8 weight (a GGUF's Q8_0 / Q5_0 / Q4_0 / Q6_K on a GPU: offsets None, w = s (q - 128)):
    each GEMV tiling and the dequantization give, bit for bit (CPU), what they give with the offsets -128 s
    stored (the asymmetric path), and the f64 product of the weights within f32 rounding (bf16's on CUDA)."""
    g = torch.Generator().manual_seed(inp + gs)
    G = -(-inp // gs)
    q = torch.randint(0, 256, (12, G * gs), dtype=torch.uint8, generator=g).to(DEV)
    s = (torch.randn(12, G, generator=g) * 0.01).half().to(DEV)
    o = -128 * s  # exact in f16
    w = ((q.double() - 128) * s.double().repeat_interleave(gs, dim=1))[:, :inp]
    x = torch.randn(2, inp, generator=g).to(DEV, DTYPE)
    ref = x.double() @ w.T
    same = 0 if DEV == "cpu" else 2**-7  # (CUDA: bf16 outputs one rounding step apart, if compiled apart)
    for cfg in SYM_CFGS:
        y = K.gemv_w8(x, q, s, None, cfg)
        torch.testing.assert_close(y, K.gemv_w8(x, q, s, o, cfg), atol=0, rtol=same, msg=str(cfg))
        err = (y.double() - ref).abs().max() / ref.abs().max()
        assert err < (2e-2 if DTYPE == torch.bfloat16 else 2e-6), (cfg, err)
    d = K.dequant_w8(q, s, None, inp, torch.float32)
    torch.testing.assert_close(d, K.dequant_w8(q, s, o, inp, torch.float32), atol=0, rtol=same)
    torch.testing.assert_close(d.double(), w, atol=0, rtol=2**-24)


def test_shape_classes():
    assert K.shape_class(28672, 4096) == "wide"
    assert K.shape_class(4096, 14336) == "deep"
    assert K.shape_class(6144, 4096) == K.shape_class(4096, 4096) == "square"
