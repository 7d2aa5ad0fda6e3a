"""Compile the int8 GEMV / dequantization kernels of quant/kernels.py for an H200 (sm_90) on a machine without
a GPU (Triton's front end and the ptxas its wheel ships), and print per kernel and `SYM` a digest of its PTX
instructions (debug lines and labels left out), their count and the global loads. With two source trees,
whether each kernel compiles to the same instructions in both (a change meant to leave them as they were).

    python benchmarks/kernels_ptx.py [SRC] [--against OTHER_SRC]      (SRC: a checkout's src/, default ours)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
W8 = {"X": "*bf16", "Q": "*i32", "S": "*fp16", "Z": "*fp16", "OFF": "*fp16", "Y": "*bf16", "IDX": "*bf16"}
CASES = [  # (kernel, pointer types, constexprs): the default tilings' kernel, and each other the dispatch takes
    ("_gemv_rows_kernel", {}, dict(ROWS=4, BLOCK_C=128, EVEN=True, EXPERTS=False, BITS=8, GS=32)),
    ("_gemv_rows_kernel", {"X": "*i64", "S": "*bf16", "Z": "*bf16"},
     dict(ROWS=8, BLOCK_C=64, EVEN=False, EXPERTS=True, BITS=4, GS=32, PAIR=True, XPACK=True)),
    ("_gemv_persist_kernel", {}, dict(ROWS=4, BLOCK_C=128, EVEN=False, BITS=8, GS=16)),
    ("_gemv_w8_kernel", {"Q": "*u8"}, dict(BLOCK_N=4, BLOCK_K=512, EVEN=False, EXPERTS=False, GS=32)),
    ("_gemv_w8w_kernel", {}, dict(BLOCK_N=8, BLOCK_G=8, EVEN=True, EXPERTS=False, GS=32)),
    ("_dequant_w8_kernel", {"Q": "*u8", "W": "*bf16"}, dict(BLOCK_G=32, GS=32)),
    ("_gemv_w8_kernel", {"Q": "*u8"}, dict(BLOCK_N=4, BLOCK_K=512, EVEN=True, EXPERTS=True, GS=32)),
    ("_gemv_w8w_kernel", {}, dict(BLOCK_N=8, BLOCK_G=8, EVEN=False, EXPERTS=True, GS=16)),
    ("_gemv_w4_kernel", {"Q": "*u8"}, dict(BLOCK_N=8, BLOCK_KB=256, EVEN=False, EXPERTS=True)),
    ("_gemv_w4_kernel", {"Q": "*u8"}, dict(BLOCK_N=32, BLOCK_KB=256, EVEN=True, EXPERTS=False)),
    ("_gemv_w4w_kernel", {}, dict(BLOCK_N=8, BLOCK_G=8, EVEN=True, EXPERTS=False)),
    ("_gemv_w4w_kernel", {}, dict(BLOCK_N=4, BLOCK_G=4, EVEN=False, EXPERTS=True)),
]  # fmt: skip


def report(src: str) -> None:
    sys.path.insert(0, src)
    import torch

    torch.cuda.is_available = lambda: True  # (Triton is imported only where a GPU is)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from spillover.quant import kernels as K

    for i, (name, ptrs, consts) in enumerate(CASES):
        fn = getattr(K, name)
        for sym in (False, True) if "SYM" in fn.arg_names and consts.get("BITS", 8) == 8 else (False,):
            c = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}
            c.update(consts, **({"SYM": sym} if "SYM" in fn.arg_names else {}))
            sig = {a: "constexpr" if a in c else {**W8, **ptrs}.get(a, "i32") for a in fn.arg_names}
            k = triton.compile(
                ASTSource(fn, sig, c), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}
            )
            ptx = k.asm["ptx"].split(".section")[0].splitlines()
            code = [
                s.strip()
                for s in ptx
                if s.strip() and not s.strip().startswith(("//", ".loc", ".file", "$L"))
            ]
            digest = hashlib.md5("\n".join(code).encode()).hexdigest()[:12]
            loads = sum("ld.global" in s for s in code)
            print(f"case {i} {name} SYM={sym}: {digest} {len(code)} instructions, {loads} global loads")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", nargs="?", default=HERE)
    ap.add_argument("--against", help="another checkout's src/: compare the SYM=False kernels' instructions")
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = lambda s: subprocess.run(  # noqa: E731
        [sys.executable, __file__, "--one", s], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    ours = run(a.src)
    print("\n".join(ours))
    if a.against:
        theirs = {s.split(": ")[0]: s for s in run(a.against)}
        for s in ours:
            if s.split(": ")[0] in theirs:
                print(("same" if theirs[s.split(": ")[0]] == s else "DIFFERENT") + f" as {a.against}: {s}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        report(sys.argv[2])
    else:
        main()
