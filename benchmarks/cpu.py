"""CPU benchmark: spillover vs llama.cpp (and transformers) on SmolLM2-135M-Instruct, side by side, in one run.

    python benchmarks/cpu.py [--threads 2] [--runs 9] [--prompt 128] [--new 128] [--llama-bench PATH]

Measures load time (constructor to ready; and to the first token of a short prompt), prefill tok/s for a
`--prompt`-token prompt, and decode tok/s over `--new` tokens after that prompt (medians of `--runs`); the
peak RSS of a one-prompt `spillover run` per mode (a new process each) against the GGUF file's size; the
cold start of a one-token run. Then the targets of issue 14, each met or not.
llama.cpp's llama-bench: build a CPU one from the llama-cpp-python 0.3.36 sdist's vendor/llama.cpp
(`cmake -B build -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF && cmake --build build --target llama-bench`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def median_time(fn, runs: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def fresh(prompt: list[int]) -> list[int]:
    """The prompt with a new first token each call, so no run reuses another's prefix cache."""
    fresh.n = getattr(fresh, "n", 0) + 1
    return [100 + fresh.n, *prompt[1:]]


def bench_spillover(
    path: str, dtype: str, prompt: list[int], new: int, runs: int, isq: int | None = None
) -> dict[str, float]:
    from spillover import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(path, dtype=dtype, isq=isq, progress=False)
    load = time.perf_counter() - t
    llm.generate(prompt[:8], SamplingParams(max_tokens=1, temperature=0))
    first = time.perf_counter() - t
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    full = SamplingParams(max_tokens=new + 1, temperature=0, ignore_eos=True)
    pre = median_time(lambda: llm.generate(fresh(prompt), one), runs)
    tot = median_time(lambda: llm.generate(fresh(prompt), full), runs)
    return {
        "load_s": load,
        "first_token_s": first,
        "prefill_tok_s": len(prompt) / pre,
        "decode_tok_s": new / (tot - pre),
    }


def bench_transformers(
    path: str, dtype: torch.dtype, prompt: list[int], new: int, runs: int
) -> dict[str, float]:
    import transformers

    d, f = os.path.dirname(path), os.path.basename(path)
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype).eval()
    load = time.perf_counter() - t
    ids = torch.tensor([prompt])

    def gen(n: int):
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    gen(1)
    first = time.perf_counter() - t
    pre = median_time(lambda: gen(1), runs)
    tot = median_time(lambda: gen(new + 1), runs)
    return {
        "load_s": load,
        "first_token_s": first,
        "prefill_tok_s": len(prompt) / pre,
        "decode_tok_s": new / (tot - pre),
    }


def bench_llama_cpp(binary: str, path: str, args) -> dict[str, float]:
    """llama.cpp's own llama-bench on the same GGUF: prefill (pp) and decode at depth `--prompt` (tg).
    Build it yourself (e.g. from the llama-cpp-python sdist's vendor/llama.cpp with cmake); pass its path."""
    import json
    import subprocess

    cmd = [binary, "-m", path, "-t", str(args.threads), "-r", str(args.runs), "-o", "json",
           "-p", str(args.prompt), "-n", str(args.new), "-d", f"0,{args.prompt}", *args.llama_bench_arg]  # fmt: skip
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] == args.prompt and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] == args.new and r.get("n_depth", 0) == args.prompt)
    return {"load_s": float("nan"), "first_token_s": float("nan"), "prefill_tok_s": pp, "decode_tok_s": tg}


def ab_decode(path: str, prompt: list[int], args) -> None:
    """Prefill and decode, spillover's default mode and llama.cpp taking turns (`--ab ROUNDS`): on a shared
    machine the load changes from minute to minute, so each round's ratios compare measurements seconds
    apart (spillover: medians of 3; llama-bench: means of 3, prefill from an empty cache, decode after
    `--prompt` tokens)."""
    import json
    import subprocess

    from spillover import LLM, SamplingParams

    llm = LLM(path, progress=False)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    full = SamplingParams(max_tokens=args.new + 1, temperature=0, ignore_eos=True)
    cmd = [args.llama_bench, "-m", path, "-t", str(args.threads), "-r", "3", "-o", "json",
           "-p", str(args.prompt), "-n", str(args.new), "-d", f"0,{args.prompt}", *args.llama_bench_arg]  # fmt: skip
    llm.generate(fresh(prompt), one)  # warm-up
    dec, pre = [], []
    for r in range(args.ab):
        ds, ps = [], []
        for _ in range(3):
            p = fresh(prompt)
            t = time.perf_counter()
            llm.generate(p, one)
            t1 = time.perf_counter()
            llm.generate(fresh(prompt), full)
            ds.append(args.new / (time.perf_counter() - t1 - (t1 - t)))
            ps.append(len(prompt) / (t1 - t))
        rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        tg = next(x["avg_ts"] for x in rows if x["n_gen"] and x.get("n_depth", 0) == args.prompt)
        pp = next(x["avg_ts"] for x in rows if x["n_prompt"] and not x["n_gen"] and not x.get("n_depth", 0))
        d, p = statistics.median(ds), statistics.median(ps)
        dec.append(d / tg)
        pre.append(p / pp)
        print(
            f"round {r + 1}: prefill {len(prompt)} spillover {p:.0f} tok/s, llama.cpp {pp:.0f}: {pre[-1]:.2f}x; "
            f"decode spillover {d:.1f} tok/s, llama.cpp {tg:.1f}: {dec[-1]:.2f}x",
            flush=True,
        )
    print(f"prefill {len(prompt)} vs llama.cpp, median of {args.ab} rounds: {statistics.median(pre):.2f}x")
    print(f"decode vs llama.cpp, median of {args.ab} rounds: {statistics.median(dec):.2f}x")


MODES = {  # row name -> (LLM dtype, isq, CLI flags)
    "spillover default (GGUF kept)": ("auto", None, []),
    "spillover --dtype f32 (reference)": ("f32", None, ["--dtype", "f32"]),
    "spillover --isq 4 --dtype bf16": ("bf16", 4, ["--isq", "4", "--dtype", "bf16"]),
    "spillover --isq 8": ("auto", 8, ["--isq", "8"]),  # int8 groups as Q8_0 blocks + offsets (f32 elsewhere)
}


def peak_rss_mib(flags: list[str], threads: int) -> float:
    """Peak resident memory of a new process that answers one short prompt (`spillover run -p`), MiB."""
    import subprocess

    code = (
        f"import sys, torch; torch.set_num_threads({threads});"
        f"sys.argv = ['spillover', 'run', '-p', 'What is the capital of France?', '--max-tokens', '16', *{flags!r}];"
        # (argv passed: main() then returns instead of ending the process at once, as a command line's run does)
        "from spillover.cli.main import main\ntry: main(sys.argv[1:])\nexcept SystemExit: pass\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (this benchmark, with models)
        "print(next(ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')), file=sys.stderr)"
    )
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src")}
    r = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return int(r.stderr.strip().splitlines()[-1]) / 1024


def cold_start(flags: list[str], runs: int = 3) -> float:
    """Seconds from starting a new Python process to the end of a one-token answer, imports included."""
    import subprocess

    code = (
        f"import sys; sys.argv = ['spillover', 'run', '-p', 'Hi', '--max-tokens', '1', *{flags!r}];"
        "from spillover.cli.main import main; main()"
    )
    import tempfile

    # as installed: bytecode cached (pip compiles it; a PYTHONDONTWRITEBYTECODE shell would recompile every
    # module each run, ~0.1 s), in a folder of this measurement's, filled by one run not timed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env |= {"PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "src")}
    env["PYTHONPYCACHEPREFIX"] = env.get("PYTHONPYCACHEPREFIX") or tempfile.mkdtemp(prefix="spillover-pyc-")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=env)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=env)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--transformers", action="store_true", help="also run transformers f32 (slow)")
    ap.add_argument(
        "--llama-bench", default=None, metavar="PATH", help="llama.cpp's llama-bench binary (peer)"
    )
    ap.add_argument(
        "--llama-bench-arg", action="append", default=[], help="extra llama-bench flag (repeatable)"
    )
    ap.add_argument(
        "--modes",
        default=None,
        help="comma-separated row names of MODES to run (default: all), e.g. 'default'",
    )
    ap.add_argument("--quick", action="store_true", help="skip the new-process measures (RSS, cold start)")
    ap.add_argument(
        "--ab",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="only prefill and decode of the default mode, taking turns with llama.cpp",
    )
    ap.add_argument("-m", "--model", default=None, help="a GGUF (default: the SmolLM2 Q4_1 file)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modes = {
        n: m for n, m in MODES.items() if args.modes is None or any(k in n for k in args.modes.split(","))
    }
    from spillover.loading.source import default_model_path

    path = args.model or default_model_path()
    prompt = torch.randint(100, 40000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    if args.ab:
        return ab_decode(path, prompt, args)
    # new processes first (before this one holds models)
    mflag = ["-m", path] if args.model else []
    rss = (
        {} if args.quick else {n: peak_rss_mib([*f, *mflag], args.threads) for n, (_, _, f) in modes.items()}
    )
    cold = {} if args.quick else {n: cold_start([*f, *mflag]) for n, (_, _, f) in list(modes.items())[:2]}
    rows = {}
    for name, (dtype, isq, _) in modes.items():
        rows[name] = bench_spillover(path, dtype, prompt, args.new, args.runs, isq=isq)
    if args.transformers:
        rows["transformers f32"] = bench_transformers(path, torch.float32, prompt, args.new, args.runs)
    if args.llama_bench:
        rows["llama.cpp (llama-bench)"] = bench_llama_cpp(args.llama_bench, path, args)
    file_mib = os.path.getsize(path) / 2**20

    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{os.path.basename(path)} ({file_mib:.0f} MiB), CPU, {args.threads} threads, medians of {args.runs}"
    )
    for col in ("engine", "load s", "to first token s", f"prefill {args.prompt} tok/s",
                f"decode tok/s (after {args.prompt})", "peak RSS MiB (one prompt)", "RSS / file"):  # fmt: skip
        table.add_column(col, justify="right")
    for name, r in rows.items():
        m = rss.get(name)
        table.add_row(name, f"{r['load_s']:.2f}", f"{r['first_token_s']:.2f}", f"{r['prefill_tok_s']:.0f}",
                      f"{r['decode_tok_s']:.1f}", "" if m is None else f"{m:.0f}",
                      "" if m is None else f"{m / file_mib:.1f}x")  # fmt: skip
    Console().print(table)
    print(
        "load s: LLM(...) in this process (torch already imported); 'to first token' adds one 8-token prompt"
    )
    for name, c in cold.items():
        print(
            f"cold start, new process to the end of a one-token `spillover run -p`, {name} (median of 3): {c:.2f} s"
        )
    d = rows.get("spillover default (GGUF kept)")
    lc = rows.get("llama.cpp (llama-bench)")
    print("\nissue 14 targets (default mode):")
    if lc and d:
        dec, pre = d["decode_tok_s"] / lc["decode_tok_s"], d["prefill_tok_s"] / lc["prefill_tok_s"]
        print(f"  decode vs llama.cpp: {dec:.2f}x (target >= 1.0: {'met' if dec >= 1 else 'not met'})")
        print(
            f"  prefill {args.prompt} vs llama.cpp: {pre:.2f}x (target >= 3: {'met' if pre >= 3 else 'not met'})"
        )
    else:
        print("  decode / prefill vs llama.cpp: pass --llama-bench PATH")
    if "spillover default (GGUF kept)" in rss:
        r = rss["spillover default (GGUF kept)"] / file_mib
        print(f"  peak RSS vs the GGUF file: {r:.1f}x (target <= 5: {'met' if r <= 5 else 'not met'})")
        c = cold["spillover default (GGUF kept)"]
        print(
            f"  one-token run from a new process: {c:.2f} s (target <= 1.5: {'met' if c <= 1.5 else 'not met'})"
        )
    print("  answers and prompt logprobs vs f32: python benchmarks/quality.py --modes f32,default")


if __name__ == "__main__":
    main()
