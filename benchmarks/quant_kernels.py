"""Weight-only quantized matmul kernels on one GPU: which kernel and tiling ISQ uses, and why.

    python benchmarks/quant_kernels.py [--layers 8] [--short] [--torch-ops] [--gemlite] [--out tilings.json]

Llama-3-8B layer shapes (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336). For each method the
four projections of `--layers` distinct layers (more bytes than L2, so weights come from HBM) are captured in one
CUDA graph and replayed; the table gives microseconds per layer and the speed-up over bf16 (cuBLAS). Candidates:
bf16 F.linear; spillover's Triton GEMVs (quant/kernels.py: the byte kernels and the word kernels), tiled per shape
class by a sweep (`tune`, also used by benchmarks/quant.py --tune; every tiling checked against the f32 product
before it is timed; `--out` writes the tables first, for benchmarks/quant.py --tilings); with --torch-ops torch's tinygemm int4 (`_weight_int4pack_mm`, groups 32 and
128) and `_weight_int8pack_mm`; with --gemlite the GEMVs of GemLite (PyPI `gemlite`, Triton kernels: A16W4
and A16W8 in groups of 32, the same codes, scales and zeros); for prompts (2048 rows) the Triton int4
dequantization into cuBLAS and int8 `.to(bf16)` into cuBLAS. Also checks each Triton output against dequantize @ x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from spillover.quant import kernels as K  # noqa: E402
from spillover.quant.isq import Int4Linear, Int8Linear  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
W4_SWEEP = [(4, 256, 2), (8, 128, 2), (8, 256, 4), (16, 128, 4), (16, 256, 4), (32, 128, 4), (32, 256, 8),
            (8, 512, 4), (64, 128, 8), (4, 512, 4)]  # fmt: skip
W8_SWEEP = [(4, 512, 2), (4, 1024, 4), (8, 512, 4), (2, 1024, 2), (4, 2048, 4), (8, 1024, 8), (8, 256, 2),
            (16, 256, 4), (2, 512, 1), (16, 512, 8), (4, 4096, 8), (8, 2048, 8), (2, 2048, 4), (1, 4096, 4),
            (2, 4096, 4), (4, 1024, 2)]  # fmt: skip
# the kernels on 32-bit words (quant/kernels.py): "rows" (_gemv_rows_kernel: output rows a program, chunks of
# 16 bytes a step, warps), "words" (_gemv_w4w_kernel / _gemv_w8w_kernel: 3-D tiles, groups a step) and
# "persist" (_gemv_persist_kernel: rows, chunks (all of a row's), warps, programs a multiprocessor); int4's
# "rows2" / "persist2": the same with both nibbles of a byte from one shift (kernels._row_terms' PAIR); a "-sx"
# suffix: bf16 x in 2-byte loads (else 8-byte ones, kernels._x_quad). The first sweep on the H200 (2-byte x
# loads; RESULTS-quant.md) ranked rows (16, 64, 2) and (8, 64, 2) first; "words" last. A "-rN" suffix caps the
# registers (kernels._launch_opts): the int4 winners use 127-167 a thread, so few warps hide the loads' latency.
W4W_SWEEP = [(16, 64, 2, "rows-sx"), (16, 64, 2, "rows"), (16, 32, 1, "rows"), (8, 64, 2, "rows"), (8, 32, 1, "rows"),
             (16, 128, 4, "rows"), (8, 128, 4, "rows"), (4, 64, 2, "rows"), (4, 32, 1, "rows"), (16, 64, 2, "rows2"),
             (8, 64, 2, "rows2"), (8, 128, 4, "persist", 4), (16, 128, 4, "persist", 2), (4, 128, 4, "persist", 8),
             (8, 128, 4, "persist2", 4), (8, 64, 2, "rows2-r128"), (8, 64, 2, "rows2-r96"), (8, 32, 1, "rows-r96"),
             (16, 64, 2, "rows2-r128"), (4, 64, 2, "rows2-r96")]  # fmt: skip
W8W_SWEEP = [(8, 64, 2, "rows-sx"), (8, 64, 2, "rows"), (8, 128, 4, "rows"), (16, 64, 2, "rows"), (16, 32, 1, "rows"),
             (8, 32, 1, "rows"), (4, 64, 2, "rows"), (4, 32, 1, "rows"), (16, 128, 4, "rows"), (4, 128, 4, "rows"),
             (8, 256, 4, "persist", 2), (4, 256, 4, "persist", 4), (8, 256, 8, "persist", 2)]  # fmt: skip
W4_SHORT = [(32, 256, 8), (8, 512, 4)]
W8_SHORT = [(4, 1024, 2), (4, 2048, 4)]
"""The byte kernels' tilings that won the earlier sweeps (RESULTS-quant.md), for `tune(short=True)`."""


def build(L: int, dev: torch.device) -> tuple[dict, dict, dict]:
    """`L` layers of random bf16 weights per shape, and their int4 and int8 forms."""
    dense = {
        k: [torch.randn(s, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(L)]
        for k, s in SHAPES.items()
    }

    def mk(cls, w):
        m = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        m.weight = torch.nn.Parameter(w, requires_grad=False)
        return cls(m)

    q4 = {k: [mk(Int4Linear, w) for w in ws] for k, ws in dense.items()}
    q8 = {k: [mk(Int8Linear, w) for w in ws] for k, ws in dense.items()}
    return dense, q4, q8


def tune(L: int = 8, log=print, kinds: str = "w4,w8", short: bool = False) -> tuple[dict, dict, dict]:  # noqa: ANN001
    """Time every GEMV tiling of the sweeps (of `kinds`) on every shape (batch 1, CUDA graphs); returns the best
    tiling per shape class for int4 and int8 (quant/kernels.py's tables; {} for a kind not swept) and the
    timings (us per matmul). Both kernels' tilings compete; `short`: of the byte kernels only the earlier
    winners."""
    dev = torch.device("cuda")
    _, q4, q8 = build(L, dev)
    x = {k: torch.randn(1, s[1], device=dev, dtype=torch.bfloat16) for k, s in SHAPES.items()}
    w4s, w8s = (W4_SHORT, W8_SHORT) if short else (W4_SWEEP, W8_SWEEP)
    fns = {
        "w4": (w4s + W4W_SWEEP, lambda c, k, i: K.gemv_w4(x[k], q4[k][i].qweight, q4[k][i].scale, q4[k][i].zero, x[k].shape[1], c)),
        "w8": (w8s + W8W_SWEEP, lambda c, k, i: K.gemv_w8(x[k], q8[k][i].qweight, q8[k][i].scale, q8[k][i].offset, c)),
    }  # fmt: skip
    fns = {k: v if k in kinds.split(",") else ([], v[1]) for k, v in fns.items()}
    times: dict = {}
    dense = {k: q4[k][0].dequantize(torch.bfloat16) for k in SHAPES}  # one layer: bf16 is L2-hot, a bound
    for k in SHAPES:
        ws = [dense[k]] * L
        times[("bf16", k, None)] = (
            timed(lambda k=k, ws=ws: [F.linear(x[k], w) for w in ws], reps=10) / L * 1e6
        )
    tables = []
    for name, (sweep, fn) in fns.items():
        if not sweep:
            tables.append({})
            continue
        q = q4 if name == "w4" else q8
        for k in SHAPES:
            ref = x[k].float() @ q[k][0].dequantize(torch.float32).T
            for c in sweep:
                try:  # a tiling that fails to compile, or computes wrong, is left out (time inf)
                    err = ((fn(c, k, 0).float() - ref).norm() / ref.norm()).item()
                    if not err < 1e-2:
                        raise ValueError(f"relative error {err:.2e}")
                    t = timed(lambda c=c, k=k, fn=fn: [fn(c, k, i) for i in range(L)], reps=10) / L * 1e6
                except Exception as e:  # noqa: BLE001
                    log(f"{name} {k} {c}: {type(e).__name__}: {str(e)[:200]}")
                    t = float("inf")
                times[(name, k, c)] = t
            best = min(sweep, key=lambda c, k=k, name=name: times[(name, k, c)])
            byt = min((c for c in sweep if len(c) == 3), key=lambda c, k=k, name=name: times[(name, k, c)])
            log(
                f"{name} {k:8s} best {best} {times[(name, k, best)]:.1f} us; best of the byte kernel {byt} "
                f"{times[(name, k, byt)]:.1f}; bf16 {times[('bf16', k, None)]:.1f}"
            )
        table = {}
        for cls in ("wide", "deep", "square"):
            ks = [k for k, (n, kk) in SHAPES.items() if K.shape_class(n, kk) == cls]
            table[cls] = min(sweep, key=lambda c, ks=ks, name=name: sum(times[(name, k, c)] for k in ks))
        tables.append(table)
    return tables[0], tables[1], {f"{a} {b} {c}": t for (a, b, c), t in times.items()}


def gemlite_linear(bits: int, m: Int4Linear | Int8Linear) -> torch.nn.Module:
    """The same quantized weight as a GemLite layer (bf16 in and out): int4 w = (q - z) s and int8 w = q s + o
    (z = -o / s) in groups of 32; GemLite keeps scales and the offsets -z s in bf16 (ours: f16 s and z / o)."""
    from gemlite import DType, GemLiteLinearTriton

    n, k = m.out_features, m.in_features
    if bits == 4:  # byte j: code 2j low, 2j+1 high
        codes, z = torch.stack([m.qweight & 15, m.qweight >> 4], -1).view(n, -1)[:, :k], m.zero.float()
    else:
        codes, z = m.qweight[:, :k], -m.offset.float() / m.scale.float()
    g = GemLiteLinearTriton(bits, group_size=32, in_features=k, out_features=n, input_dtype=DType.BF16,
                            output_dtype=DType.BF16)  # fmt: skip
    g.pack(codes.contiguous(), m.scale.to(torch.bfloat16), z.to(torch.bfloat16), bias=None)
    return g


def timed(fn, reps: int = 20) -> float:
    """Median seconds of one replay of a CUDA graph of fn()."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    del g
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--torch-ops", action="store_true", help="also torch's tinygemm int4 and int8 kernels")
    ap.add_argument(
        "--short", action="store_true", help="of the byte kernels' tilings only the earlier winners"
    )
    ap.add_argument("--gemlite", action="store_true", help="also GemLite's int4 and int8 GEMVs (pip gemlite)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    w4, w8, times = tune(args.layers, short=args.short)
    K.W4_CFGS.update(w4)
    K.W8_CFGS.update(w8)
    print("tuned:", w4, w8, flush=True)
    dev = torch.device("cuda")
    L = args.layers
    dense, q4, q8 = build(L, dev)
    res: dict = {"w4": w4, "w8": w8, "us": times}
    if args.out:  # the tilings first (benchmarks/quant.py --tilings reads them), the tables after
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    x = torch.randn(4, 4096, device=dev, dtype=torch.bfloat16)
    m4, m8 = q4["qkv"][0], q8["qkv"][0]
    ref4 = x.float() @ m4.dequantize(torch.float32).T
    ref8 = x.float() @ m8.dequantize(torch.float32).T
    res["err_w4"] = (
        (K.gemv_w4(x, m4.qweight, m4.scale, m4.zero, 4096).float() - ref4).abs().max() / ref4.abs().max()
    ).item()
    res["err_w8"] = (
        (K.gemv_w8(x, m8.qweight, m8.scale, m8.offset).float() - ref8).abs().max() / ref8.abs().max()
    ).item()
    print({k: v for k, v in res.items() if k.startswith("err")}, flush=True)
    xs = {
        M: {k: torch.randn(M, s[1], device=dev, dtype=torch.bfloat16) for k, s in SHAPES.items()}
        for M in (1, 4, 8, 2048)
    }
    rows: dict[str, dict] = {}

    def run(name: str, M: int, body) -> None:  # body(kind, i, x)
        def fn():
            for i in range(L):
                for k in SHAPES:
                    body(k, i, xs[M][k])

        rows.setdefault(name, {})[M] = timed(fn) / L * 1e6
        print(f"{name:32s} M={M:5d} {rows[name][M]:9.1f} us/layer", flush=True)

    for M in (1, 4, 2048):
        run("bf16 (cuBLAS)", M, lambda k, i, x: F.linear(x, dense[k][i]))
    for M in (1, 4, 8):
        run(
            "triton int4 GEMV",
            M,
            lambda k, i, x: K.gemv_w4(x, q4[k][i].qweight, q4[k][i].scale, q4[k][i].zero, x.shape[1]),
        )
        run(
            "triton int8 GEMV",
            M,
            lambda k, i, x: K.gemv_w8(x, q8[k][i].qweight, q8[k][i].scale, q8[k][i].offset),
        )
    run(
        "int4 dequant + cuBLAS",
        2048,
        lambda k, i, x: F.linear(
            x, K.dequant_w4(q4[k][i].qweight, q4[k][i].scale, q4[k][i].zero, x.shape[1], x.dtype)
        ),
    )
    run("int8 dequant + cuBLAS", 2048, lambda k, i, x: q8[k][i](x))
    if args.torch_ops:
        for gs in (32, 128):
            tg = {}
            for k, ws in dense.items():
                tg[k] = []
                for w in ws:
                    N, Kd = w.shape
                    qp = torch.randint(0, 256, (N, Kd // 2), device=dev, dtype=torch.uint8)
                    sz = torch.randn(Kd // gs, N, 2, device=dev, dtype=torch.bfloat16) * 0.01
                    tg[k].append((torch.ops.aten._convert_weight_to_int4pack(qp, 8), sz))
            for M in (1, 4):
                run(
                    f"torch tinygemm int4 g{gs}",
                    M,
                    lambda k, i, x, gs=gs, tg=tg: torch.ops.aten._weight_int4pack_mm(
                        x, tg[k][i][0], gs, tg[k][i][1]
                    ),
                )
    if args.gemlite:  # a peer: GemLite's Triton GEMVs on the same weights (its own autotuning, at first call)
        gl = {
            bits: {k: [gemlite_linear(bits, m) for m in ms] for k, ms in q.items()}
            for bits, q in ((4, q4), (8, q8))
        }
        for bits, q in ((4, q4), (8, q8)):
            ref = x.float() @ q["qkv"][0].dequantize(torch.float32).T
            err = (gl[bits]["qkv"][0](x).float() - ref).abs().max() / ref.abs().max()
            res[f"err_gemlite_w{bits}"] = err.item()
            print(f"gemlite int{bits}: max error {err.item():.2e} of the largest output", flush=True)
            for M in (1, 4, 8):
                run(f"gemlite int{bits} GEMV", M, lambda k, i, x, g=gl[bits]: g[k][i](x))
    res["rows"] = rows
    b1, b2048 = rows["bf16 (cuBLAS)"][1], rows["bf16 (cuBLAS)"][2048]
    print(
        "\n| method | M=1 us/layer | speed vs bf16 | M=4 | M=8 | M=2048 us/layer | time vs bf16 |\n| --- | --- | --- | --- | --- | --- | --- |"
    )
    for n, r in rows.items():
        m1 = f"{r[1]:.1f} | {b1 / r[1]:.2f}x" if 1 in r else "- | -"
        m4, m8 = (f"{r[m]:.1f}" if m in r else "-" for m in (4, 8))
        m2k = f"{r[2048]:.1f} | {r[2048] / b2048:.2f}x" if 2048 in r else "- | -"
        print(f"| {n} | {m1} | {m4} | {m8} | {m2k} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
