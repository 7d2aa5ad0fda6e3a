"""GPU fast path: spillover vs transformers (eager generate) on a Llama-3-8B-shaped model, random bf16 weights.

    python benchmarks/gpu.py [--layers 32] [--skip-transformers]

Reports decode tok/s at batch 1 after a 128-token prompt, prefill of 1 x 2048 tokens (achieved TFLOP/s),
aggregate decode tok/s at batch 32, time from LLM(...) to the first token (random weights made on the GPU:
no disk), and the CUDA-graph capture cost. Also checks that graph decode gives the eager path's greedy tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from shapes import LLAMA3_8B  # noqa: E402


def sync() -> None:
    torch.cuda.synchronize()


def flops_per_token(cfg: dict, ctx: int) -> float:
    """Matmul FLOPs per token (2 x params of the linear layers) plus causal attention at context `ctx`."""
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    linear = L * (h * (h + 2 * kv) + h * h + 3 * h * i)  # lm_head excluded: prefill computes it for one row
    attn = L * 2 * 2 * ctx / 2 * h  # QK^T and PV, causal: half the context on average
    return 2 * linear + attn


def bench_spillover(cfg: dict, prompt: list[int], args) -> dict[str, float]:
    from spillover import LLM, SamplingParams
    from spillover.loading.source import random_source

    res: dict[str, float] = {}
    sync()
    t0 = time.perf_counter()
    llm = LLM(random_source(cfg, "llama3-8b-random"), dtype="bf16", device_map="cuda", max_seq_len=4096,
              max_batch_size=32, progress=False)  # fmt: skip
    llm.generate(prompt[:16], SamplingParams(max_tokens=1, temperature=0))
    sync()
    res["to_first_token_s"] = time.perf_counter() - t0
    greedy = SamplingParams(max_tokens=args.new, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # captures graphs
    sync()
    res["first_capture_s"] = time.perf_counter() - t
    # parity: graphs vs eager (same weights: switch graphs off on the same runner)
    with_graphs = llm.generate(
        prompt, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    ).token_ids
    graphs = llm.engine.runner.graphs
    llm.engine.runner.graphs = {}
    eager = llm.generate(prompt, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)).token_ids
    t = time.perf_counter()
    o = llm.generate(prompt, greedy)
    sync()
    res["eager_decode_tok_s"] = o.metrics["decode_tok_per_s"]
    llm.engine.runner.graphs = graphs
    res["graph_equals_eager"] = float(with_graphs == eager)
    for _ in range(2):
        o = llm.generate(prompt, greedy)
    res["decode_tok_s"] = o.metrics["decode_tok_per_s"]
    res["ttft_128_s"] = o.metrics["time_to_first_token_s"]
    llm.engine.overlap = False  # what overlapping host work with the GPU is worth
    res["decode_sync_tok_s"] = llm.generate(prompt, greedy).metrics["decode_tok_per_s"]
    llm.engine.overlap = True
    sampled = SamplingParams(max_tokens=args.new, temperature=0.8, top_p=0.95, seed=0, ignore_eos=True)
    res["decode_sampled_tok_s"] = llm.generate(prompt, sampled).metrics["decode_tok_per_s"]
    gen = torch.Generator().manual_seed(1)  # a fresh prompt each time: no prefix-cache hits
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    llm.generate(torch.randint(1000, 100000, (2048,), generator=gen).tolist(), one)
    sync()
    ts = []
    for _ in range(3):
        long = torch.randint(1000, 100000, (2048,), generator=gen).tolist()
        t = time.perf_counter()
        llm.generate(long, one)
        sync()
        ts.append(time.perf_counter() - t)
    res["prefill_2048_s"] = min(ts)
    res["prefill_tflops"] = flops_per_token(cfg, 2048) * 2048 / min(ts) / 1e12
    batch = [
        torch.randint(1000, 100000, (128,), generator=torch.Generator().manual_seed(10 + i)).tolist()
        for i in range(32)
    ]
    llm.generate(batch, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    sync()
    t = time.perf_counter()
    outs = llm.generate(batch, greedy)
    sync()
    total = time.perf_counter() - t
    ttft = max(x.metrics["time_to_first_token_s"] for x in outs)
    res["batch32_decode_tok_s"] = 32 * (args.new - 1) / (total - ttft)
    res["graphs_captured"] = sum(len(g.graphs) for g in graphs.values())
    del llm
    torch.cuda.empty_cache()
    return res


def bench_transformers(cfg: dict, prompt: list[int], args) -> dict[str, float]:
    import transformers

    res: dict[str, float] = {}
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    sync()
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    ids = torch.tensor([prompt], device="cuda")

    def gen(x, n):
        with torch.inference_mode():
            return model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    gen(ids[:, :16], 1)
    sync()
    res["to_first_token_s"] = time.perf_counter() - t0
    gen(ids, 8)
    sync()
    t = time.perf_counter()
    gen(ids, 1)
    sync()
    pre = time.perf_counter() - t
    res["ttft_128_s"] = pre
    t = time.perf_counter()
    gen(ids, args.new)
    sync()
    res["decode_tok_s"] = (args.new - 1) / (time.perf_counter() - t - pre)
    long = torch.randint(1000, 100000, (1, 2048), device="cuda")
    gen(long, 1)
    sync()
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        gen(long, 1)
        sync()
        ts.append(time.perf_counter() - t)
    res["prefill_2048_s"] = min(ts)
    res["prefill_tflops"] = flops_per_token(cfg, 2048) * 2048 / min(ts) / 1e12
    batch = torch.randint(1000, 100000, (32, 128), device="cuda")
    gen(batch, 4)
    sync()
    t = time.perf_counter()
    gen(batch, 1)
    sync()
    pre32 = time.perf_counter() - t
    t = time.perf_counter()
    gen(batch, args.new)
    sync()
    res["batch32_decode_tok_s"] = 32 * (args.new - 1) / (time.perf_counter() - t - pre32)
    model = None  # noqa: F841 (free GPU memory before returning)
    torch.cuda.empty_cache()
    return res


def bench_disk_load(args) -> dict[str, float]:
    """Seconds from `LLM(path)` (and transformers' from_pretrained) to the first token, for a Llama-3-8B-shaped
    checkpoint just written to local disk as bf16 safetensors (so it is likely in the page cache)."""
    from serve import make_random_model

    from spillover import LLM, SamplingParams

    path = make_random_model("llama3-8b", __import__("pathlib").Path(args.disk_dir))
    res: dict[str, float] = {}
    sync()
    t = time.perf_counter()
    llm = LLM(str(path), dtype="bf16", device_map="cuda", max_seq_len=4096, progress=False)
    llm.generate(list(range(1000, 1016)), SamplingParams(max_tokens=1, temperature=0))
    sync()
    res["spillover"] = time.perf_counter() - t
    llm = None  # noqa: F841
    torch.cuda.empty_cache()
    if not args.skip_transformers:
        import transformers

        t = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, device_map="cuda"
        )
        with torch.inference_mode():
            model.generate(torch.arange(1000, 1016, device="cuda")[None], max_new_tokens=1, do_sample=False)
        sync()
        res["transformers"] = time.perf_counter() - t
    return res


def bench_ttft_lengths(cfg: dict) -> list[tuple[int, float]]:
    """Milliseconds to the first token for fresh prompts of varied lengths (a new length must not cost a
    kernel-plan build, which cuDNN attention would do: ~90 ms for each new length on an H100)."""
    from spillover import LLM, SamplingParams
    from spillover.loading.source import random_source

    llm = LLM(random_source(cfg, "llama3-8b-random"), dtype="bf16", device_map="cuda", max_seq_len=8192,
              progress=False)  # fmt: skip
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in (128, 128, 131, 200, 377, 1000, 1000, 2048, 2048, 6000, 6001):
        prompt = torch.randint(1000, 100000, (n,), generator=gen).tolist()  # fresh: no prefix-cache hits
        sync()
        t = time.perf_counter()
        llm.generate(prompt, one)
        sync()
        out.append((n, (time.perf_counter() - t) * 1e3))
    return out


def bench_long_context(cfg: dict, lengths: list[int]) -> list[tuple[int, float, float]]:
    """Decode tok/s at batch 1 after long prompts, with the paged decode kernel's context split
    (flash-decoding) on and off: (prompt tokens, tok/s split, tok/s one pass per kv head)."""
    from spillover import LLM, SamplingParams
    from spillover.layers import triton_attention
    from spillover.loading.source import random_source

    cfg = dict(cfg, max_position_embeddings=max(cfg["max_position_embeddings"], max(lengths) + 256))
    llm = LLM(random_source(cfg, "llama3-8b-random"), dtype="bf16", device_map="cuda",
              max_seq_len=max(lengths) + 256, progress=False)  # fmt: skip
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    rows, split_from = [], triton_attention.MIN_SPLIT_LEN
    for n in lengths:
        prompt = torch.randint(1000, 100000, (n,), generator=gen).tolist()
        rates = []
        for min_split in (split_from, 1 << 40):
            triton_attention.MIN_SPLIT_LEN = min_split
            for graphs in llm.engine.runner.graphs.values():
                graphs.graphs.clear()  # the split is baked into a captured graph
            llm.generate(prompt, params)  # captures the graphs of this length
            rates.append(llm.generate(prompt, params).metrics["decode_tok_per_s"])
        rows.append((n, *rates))
    triton_attention.MIN_SPLIT_LEN = split_from
    return rows


def spillover_vs_llamacpp_row(path: str, isq: int | None, new: int) -> dict[str, float]:
    """spillover on the whole GPU from a GGUF file: decode tok/s at batch 1 after a 128-token prompt, and the
    time to the first token of fresh 128-token prompts (prefill 128 + one sampled token), median of 3."""
    from spillover import LLM, SamplingParams

    sync()
    t = time.perf_counter()
    llm = LLM(path, dtype="bf16", device_map="cuda", max_seq_len=4096, isq=isq, progress=False)
    res = {"load_s": time.perf_counter() - t}
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(1000, 100000, (128,), generator=gen).tolist()
    greedy = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # graphs, kernels
    for _ in range(2):
        o = llm.generate(prompt, greedy)
    res["decode_tok_s"] = o.metrics["decode_tok_per_s"]
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    ts = []
    for _ in range(3):
        fresh = torch.randint(1000, 100000, (128,), generator=gen).tolist()  # no prefix-cache hits
        sync()
        t = time.perf_counter()
        llm.generate(fresh, one)
        sync()
        ts.append(time.perf_counter() - t)
    res["prefill_128_s"] = sorted(ts)[1]
    res["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del llm
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return res


def bench_vs_llamacpp(args) -> None:
    """--llamacpp: spillover (bf16 from the GGUF; --isq 4) against llama.cpp (CUDA, bf16 and Q4_K_M), whole
    model on the GPU. Rows are merged into --llamacpp-json (so a run can be split in parts) and the table of
    all rows is printed."""
    import json

    import llamacpp

    path = (
        os.path.join(os.environ.get("OUT", "."), "gpu_llamacpp.json")
        if not args.llamacpp_json
        else args.llamacpp_json
    )
    rows = json.load(open(path)) if os.path.exists(path) else {}
    for e in args.engines.split(","):
        try:
            if e == "spillover bf16":
                rows[e] = spillover_vs_llamacpp_row(args.gguf_bf16, None, args.new)
            elif e == "spillover isq 4":
                rows[e] = spillover_vs_llamacpp_row(args.gguf_bf16, 4, args.new)
            elif e in ("llama.cpp bf16", "llama.cpp Q4_K_M"):
                f = args.gguf_bf16 if "bf16" in e else args.gguf_q4km
                rows[e] = llamacpp.LlamaCpp().bench(
                    f, 99, n_prompt=128, n_gen=args.new, depth="0,128", reps=3
                )
            else:
                raise ValueError(f"unknown engine {e!r}")
        except Exception as ex:  # noqa: BLE001 (one engine's failure is a row)
            rows[e] = {"error": f"{type(ex).__name__}: {ex}"[:300]}
        print(e, rows[e], flush=True)
        with open(path, "w") as fh:
            json.dump(rows, fh, indent=1, default=str)
    print(f"\nLlama-3-8B shape, random weights from {args.gguf_bf16}, whole model on {torch.cuda.get_device_name()}; "
          f"batch 1; decode after a 128-token prompt ({args.new} tokens); llama.cpp: llama-bench pp128 / tg{args.new}@d128, "
          f"spillover: time to first token of a fresh 128-token prompt")  # fmt: skip
    print("| engine | decode tok/s | prefill 128 s | notes |\n|---|---|---|---|")
    for e, r in rows.items():
        if "error" in r:
            print(f"| {e} | error | | {r['error'][:150]} |")
            continue
        note = f"load {r['load_s']:.1f} s" if "load_s" in r else f"{r.get('threads')} CPU threads, -fa 0"
        print(f"| {e} | {r['decode_tok_s']:.1f} | {r['prefill_128_s']:.4f} | {note} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--disk", action="store_true", help="only: time LLM(path) to first token from local disk")
    ap.add_argument("--disk-dir", default="/tmp/spillover-bench")
    ap.add_argument(
        "--ttft", action="store_true", help="only: ms to first token for fresh prompts of varied lengths"
    )
    ap.add_argument(
        "--long", default="", help="only: decode tok/s after prompts of these lengths, e.g. 8192,32768"
    )
    ap.add_argument(
        "--llamacpp", action="store_true", help="only: spillover vs llama.cpp (CUDA) on GGUF files"
    )
    ap.add_argument("--gguf-bf16", default="/tmp/llamacpp-gguf/llama3-8b-bf16.gguf")
    ap.add_argument("--gguf-q4km", default="/tmp/llamacpp-gguf/llama3-8b-Q4_K_M.gguf")
    ap.add_argument("--engines", default="spillover bf16,spillover isq 4,llama.cpp bf16,llama.cpp Q4_K_M")
    ap.add_argument("--llamacpp-json", default=None, help="rows file (default $OUT/gpu_llamacpp.json)")
    args = ap.parse_args()
    if args.llamacpp:
        bench_vs_llamacpp(args)
        return
    if args.long:
        print("prompt tokens  decode tok/s (context split)  decode tok/s (one pass per kv head)")
        for n, split, one in bench_long_context(dict(LLAMA3_8B, num_hidden_layers=args.layers),
                                                [int(x) for x in args.long.split(",")]):  # fmt: skip
            print(f"{n:>13}  {split:26.1f}  {one:34.1f}")
        return
    if args.ttft:
        print("prompt tokens  ms to first token (the first call includes one-time kernel compilation)")
        for n, ms in bench_ttft_lengths(dict(LLAMA3_8B, num_hidden_layers=args.layers)):
            print(f"{n:>13}  {ms:8.1f}")
        return
    if args.disk:
        for name, secs in bench_disk_load(args).items():
            print(f"{name}: {secs:.2f} s from loading a local 16 GB bf16 checkpoint to the first token")
        return
    cfg = dict(LLAMA3_8B, num_hidden_layers=args.layers)
    prompt = torch.randint(1000, 100000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = {"spillover": bench_spillover(cfg, prompt, args)}
    if not args.skip_transformers:
        rows["transformers eager"] = bench_transformers(cfg, prompt, args)
    name = torch.cuda.get_device_name()
    weights_gb = (flops_per_token(cfg, 0) / 2 + cfg["hidden_size"] * cfg["vocab_size"]) * 2 / 1e9
    print(
        f"\nLlama-3-8B shape ({args.layers} layers), random bf16 weights, {name}, torch {torch.__version__}"
    )
    keys = [
        "to_first_token_s",
        "ttft_128_s",
        "decode_tok_s",
        "prefill_2048_s",
        "prefill_tflops",
        "batch32_decode_tok_s",
    ]
    print(f"{'engine':<20}" + "".join(f"{k:>22}" for k in keys))
    for n, r in rows.items():
        print(f"{n:<20}" + "".join(f"{r.get(k, float('nan')):>22.3f}" for k in keys))
    s = rows["spillover"]
    print(
        f"spillover decode tok/s at batch 1: without overlapping the host {s['decode_sync_tok_s']:.1f}; "
        f"sampled (T 0.8, top-p 0.95) {s['decode_sampled_tok_s']:.1f}"
    )
    print(
        f"spillover: eager decode {s['eager_decode_tok_s']:.1f} tok/s; graph tokens equal eager: {bool(s['graph_equals_eager'])}; "
        f"first graph capture {s['first_capture_s']:.2f} s; graphs captured {int(s['graphs_captured'])}"
    )
    print(
        f"decode roofline: {weights_gb:.2f} GB of linear weights per token; at batch 1 spillover reads "
        f"{weights_gb * s['decode_tok_s']:.0f} GB/s"
    )


if __name__ == "__main__":
    main()
