"""Offload benchmark (issue 5): Llama-3-8B shape, random bf16 weights, a GPU budget smaller than the model.

    PYTHONPATH=src python3 benchmarks/offload.py --budgets 8 --out $OUT

One table, peers in the same run: transformers + accelerate (device_map="auto" with max_memory),
spillover --offload cpu / stream / auto, and with `--modes ...,llamacpp` llama.cpp (CUDA, benchmarks/llamacpp.py)
at the same budget: `-ngl N` with N from `--fit` given the budget, and N = spillover's GPU-resident layer count
(by hand), from a GGUF of the same weights (`--llamacpp-gguf`, written from this run's weights if missing).
Per run: decode tok/s (batch 1, prompt 128), prefill time of 128 and 4096 tokens, the bytes each path moves
per token and the fraction of that path's roofline (pinned H2D and CPU GEMV measured at the start of the same
run). Parity: prompt log-probs and greedy tokens of every
spillover mode against the transformers run (its offloaded layers execute on the GPU, so it is the
one-device reference), in bf16.

The model is built in memory: weights are drawn on the GPU (random init on the CPU takes minutes) and copied
to host; spillover loads them through a ModelSource whose reader serves those host tensors (the same
loader, planner and engine path as `LLM(path)`, without writing and re-reading 16 GB of safetensors).
The GPU budget is enforced twice: `--max-memory cuda:0=<B>GiB` for the planners and
`torch.cuda.set_per_process_memory_fraction` for the allocator.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from shapes import LLAMA3_8B

GiB = 1 << 30
CFG = dict(
    LLAMA3_8B, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16", bos_token_id=1, eos_token_id=128255
)
T0 = time.perf_counter()
ACCELERATE_SLACK_GIB = 2.0


def log(*a: object) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


# ------------------------------------------------------------------ weights and rooflines


def hf_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    out = {
        "model.embed_tokens.weight": (c["vocab_size"], h),
        "model.norm.weight": (h,),
        "lm_head.weight": (c["vocab_size"], h),
    }
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}  # fmt: skip
    return out


def random_host_weights(c: dict) -> dict[str, torch.Tensor]:
    """Random bf16 weights drawn on the GPU, copied to host. Norm weights ~1, matrices ~N(0, 0.02)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    out = {}
    for name, shape in hf_shapes(c).items():
        t = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16)
        t = 1.0 + 0.1 * t if "norm" in name else 0.02 * t
        out[name] = t.cpu()
    torch.cuda.synchronize()
    return out


def pinned_h2d_gbps(nbytes: int = 512 << 20, reps: int = 10) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return nbytes * reps / (time.perf_counter() - t) / 1e9


def cpu_gemv_gbps(reps: int = 20) -> float:
    """bf16 1x4096 @ 4096x14336 (one Llama-3-8B MLP matrix), the CPU-compute path's inner loop."""
    ws = [torch.randn(14336, 4096, dtype=torch.bfloat16) for _ in range(4)]  # 470 MB: out of cache
    x = torch.randn(1, 4096, dtype=torch.bfloat16)
    for w in ws:
        F.linear(x, w)
    t = time.perf_counter()
    for r in range(reps):
        F.linear(x, ws[r % 4])
    return ws[0].nbytes * reps / (time.perf_counter() - t) / 1e9


def save_calibration(pinned: float, gemv: float, cache_dir: str) -> str:
    """Hand the measured rates to spillover's cost model through its calibration cache, if that exists."""
    os.environ["SPILLOVER_CACHE_DIR"] = cache_dir
    try:
        from datetime import datetime, timezone

        from spillover import calibration as cal
        from spillover.placement.inventory import cpu_model_name

        c = cal.Calibration(
            pinned_h2d_gbps=pinned, pageable_h2d_gbps=None, gpu_mem_gbps=None, cpu_gemv_gbps=gemv,
            cpu_threads=torch.get_num_threads(), device_name=torch.cuda.get_device_name(0),
            torch_version=torch.__version__, measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            cpu_model=cpu_model_name(),
        )  # fmt: skip
        cal.save(c)
        return "calibration saved"
    except Exception as e:  # the cost model then uses its built-in figures
        return f"calibration not saved ({type(e).__name__}: {e})"


def limit_gpu(budget_gib: float) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * GiB / total), 0)


def cleanup() -> None:
    gc.collect()
    torch.cuda.empty_cache()


# ------------------------------------------------------------------ transformers + accelerate


def run_accelerate(
    host: dict, budget: float, prompt: list[int], long_prompt: list[int] | None, decode_tokens: int
) -> dict:
    import transformers
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    skip = ("model_type", "architectures", "torch_dtype")
    rope = {"rope_type": "default", "rope_theta": CFG["rope_theta"]}  # transformers 5 reads rope_parameters
    cfg = transformers.LlamaConfig(**{k: v for k, v in CFG.items() if k not in skip}, rope_parameters=rope)
    cfg.rope_theta = CFG["rope_theta"]
    with init_empty_weights():
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    dmap = infer_auto_device_map(model, max_memory={0: f"{budget}GiB", "cpu": "110GiB"},
                                 no_split_module_classes=["LlamaDecoderLayer"], dtype=torch.bfloat16)  # fmt: skip
    for name, _ in model.named_parameters():
        dev = next(
            v
            for k, v in sorted(dmap.items(), key=lambda kv: -len(kv[0]))
            if name == k or name.startswith(k + ".") or k == ""
        )
        set_module_tensor_to_device(model, name, "cpu" if dev in ("cpu", "disk") else dev, value=host[name])
    model = dispatch_model(model, dmap, main_device=0)
    model.eval()
    on_gpu = sum(1 for k, v in dmap.items() if ".layers." in k and v == 0)
    ids = torch.tensor([prompt], device=0)
    res: dict = {"gpu_layers": on_gpu}
    with torch.inference_mode():
        out = model(ids, use_cache=True)  # warm-up, also the reference log-probs
        torch.cuda.synchronize()
        lp = torch.log_softmax(out.logits[0].float(), -1)
        res["prompt_logprobs"] = lp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].tolist()
        t = time.perf_counter()
        out = model(ids, use_cache=True)
        torch.cuda.synchronize()
        res["prefill_128_s"] = time.perf_counter() - t
        past, tok = out.past_key_values, out.logits[0, -1].argmax()
        toks = [int(tok)]
        t = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(tok.view(1, 1), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[0, -1].argmax()
            toks.append(int(tok))
        torch.cuda.synchronize()
        res["decode_tok_s"] = decode_tokens / (time.perf_counter() - t)
        res["tokens"] = toks
        if long_prompt is not None:
            del past, out
            cleanup()
            t = time.perf_counter()
            model(torch.tensor([long_prompt], device=0), use_cache=True)
            torch.cuda.synchronize()
            res["prefill_4096_s"] = time.perf_counter() - t
    del model
    cleanup()
    return res


# ------------------------------------------------------------------ spillover


def memory_source(host: dict):  # noqa: ANN201
    from spillover.config import ModelConfig
    from spillover.loading.source import ModelSource, TensorInfo

    tensors = {n: TensorInfo(n, tuple(t.shape), "bf16", t.nbytes) for n, t in host.items()}
    reader = lambda name, device, dtype: host[name].to(device=device, dtype=dtype)  # noqa: E731
    return ModelSource("memory://llama3-8b-random", "safetensors", "llama3-8b-random", ModelConfig.from_hf(CFG),
                       tensors, _reader=reader)  # fmt: skip


def run_spillover(host: dict, mode: str, budget: float, prompt: list[int], long_prompt: list[int] | None,
                  decode_tokens: int) -> dict:  # fmt: skip
    import spillover.llm as L
    from spillover import SamplingParams

    L.open_source = lambda model, gguf=None, **kw: memory_source(host)
    t = time.perf_counter()
    llm = L.LLM("memory", dtype="bf16", max_memory={"cuda:0": f"{budget}GiB"}, max_seq_len=4352,
                pa_context_len=4352, offload=mode, progress=False)  # fmt: skip
    res: dict = {"load_s": time.perf_counter() - t, "map": llm.device_map.summary()}
    dm = llm.device_map
    lb = [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in llm.model.layers]
    res["streamed"], res["cpu_layers"] = list(dm.streamed), dm.layers_on("cpu")
    res["gpu_layers"] = len([i for i in dm.layers_on("cuda:0") if i not in dm.streamed])
    res["streamed_bytes"] = sum(lb[i] for i in dm.streamed)
    res["cpu_bytes"] = sum(lb[i] for i in dm.layers_on("cpu"))
    res["gpu_prefill_tokens"] = llm.offload.promote_at if llm.offload else None
    res["notes"] = [n for n in llm.plan.notes if "offload" in n or "stream" in n]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, prompt_logprobs=True)
    warm = llm.generate(prompt, greedy)  # warm-up (kernels, CUDA graphs) and the parity outputs
    res["prompt_logprobs"] = [x for x in warm.prompt_logprobs if x is not None]
    res["tokens"] = list(warm.token_ids)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(prompt, one)
        times.append(time.perf_counter() - t)
    res["prefill_128_s"] = sorted(times)[1]
    out = llm.generate(prompt, SamplingParams(max_tokens=decode_tokens + 1, temperature=0.0))
    res["decode_tok_s"] = out.metrics["decode_tok_per_s"]
    res["decoded"] = out.metrics["completion_tokens"]
    if long_prompt is not None:
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(long_prompt, one)
        res["prefill_4096_s"] = time.perf_counter() - t
    if llm.offload is not None:
        res["steps"] = dict(llm.offload.steps)
    res["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / GiB
    del llm, out, warm
    cleanup()
    torch.cuda.reset_peak_memory_stats()
    return res


# ------------------------------------------------------------------ llama.cpp


def run_llamacpp(gguf: str, ngl: int, how: str, decode_tokens: int) -> dict:
    """llama-bench at -ngl `ngl` (the last `ngl` layers on the GPU; the output layer only when ngl > layers):
    prefill 128 at depth 0, decode after 128 tokens, peak device memory of the process."""
    import llamacpp

    L = CFG["num_hidden_layers"]
    r = llamacpp.LlamaCpp().bench(gguf, ngl, n_prompt=128, n_gen=decode_tokens, depth="0,128", reps=2)
    shapes = hf_shapes(CFG)
    layer = sum(2 * int(torch.Size(v).numel()) for k, v in shapes.items() if k.startswith("model.layers.0."))
    head = 2 * int(torch.Size(shapes["lm_head.weight"]).numel())
    r["cpu_bytes"] = (L - min(ngl, L)) * layer + (head if ngl <= L else 0)
    r["map"] = (f"-ngl {ngl} ({how}): {min(ngl, L)} GPU, {L - min(ngl, L)} CPU"
                f"{' (+head on CPU)' if ngl <= L else ''}; peak {r['peak_mib']:.0f} MiB incl. CUDA context")  # fmt: skip
    return r


# ------------------------------------------------------------------ report


def parity(ref: dict, res: dict) -> str:
    if "prompt_logprobs" not in ref or "prompt_logprobs" not in res:
        return "-"
    a, b = torch.tensor(ref["prompt_logprobs"]), torch.tensor(res["prompt_logprobs"])
    n = min(len(a), len(b))
    d = (a[:n] - b[:n]).abs().max().item()
    same = sum(x == y for x, y in zip(ref["tokens"], res["tokens"], strict=False))
    return f"max|dlogp|={d:.3f}, tok {same}/{min(len(ref['tokens']), len(res['tokens']))}"


def table(rows: list[tuple[str, dict]], pinned: float, gemv: float) -> str:
    head = ("run", "decode tok/s", "prefill 128 s", "prefill 4096 s", "stream GB/s (roofline %)",
            "CPU GB/s (roofline %)", "parity vs accelerate", "parity vs spillover cpu", "map")  # fmt: skip
    own = next((r for n, r in rows if n.startswith("spillover cpu") and "error" not in r), {})
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = next((r for n, r in rows if n.startswith("accelerate") and "error" not in r), {})
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:120]} |")
            continue
        tps = r.get("decode_tok_s", 0.0)
        s_gbps = r.get("streamed_bytes", 0) * tps / 1e9
        c_gbps = r.get("cpu_bytes", 0) * tps / 1e9
        cells = [
            name, f"{tps:.2f}", f"{r.get('prefill_128_s', float('nan')):.3f}",
            f"{r['prefill_4096_s']:.2f}" if "prefill_4096_s" in r else "-",
            f"{s_gbps:.1f} ({100 * s_gbps / pinned:.0f}%)" if s_gbps else "-",
            f"{c_gbps:.1f} ({100 * c_gbps / gemv:.0f}%)" if c_gbps else "-",
            parity(ref, r) if not name.startswith("accelerate") else "reference",
            parity(own, r) if r is not own else "reference",  # "-" for llama.cpp: llama-bench has no logits
            r.get("map", f"{r.get('gpu_layers', '?')} layers on GPU"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="8", help="GPU budgets in GiB, comma-separated")
    ap.add_argument("--modes", default="auto,stream,cpu,accelerate")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--accelerate-decode-tokens", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=480, help="skip runs that start after this many s")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument(
        "--llamacpp-gguf",
        default="/tmp/llamacpp-gguf/llama3-8b-offload-bf16.gguf",
        help="GGUF of this run's weights for mode llamacpp (written here if missing)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    prompt = torch.randint(10, 120000, (128,)).tolist()
    long_prompt = torch.randint(10, 120000, (4096,)).tolist()
    host = random_host_weights(CFG)
    if "llamacpp" in args.modes.split(",") and not os.path.exists(args.llamacpp_gguf):
        import llamacpp

        t = time.perf_counter()
        llamacpp.write_gguf(args.llamacpp_gguf, CFG, llamacpp.torch_weights(host))
        log(f"wrote {args.llamacpp_gguf} in {time.perf_counter() - t:.1f} s")
    log(f"weights on host: {sum(t.nbytes for t in host.values()) / 1e9:.2f} GB; {torch.cuda.get_device_name(0)}; "
        f"torch {torch.__version__}; CPU threads {torch.get_num_threads()}")  # fmt: skip
    from spillover.calibration import cpu_gemv_gbps as engine_gemv_gbps

    pinned, gemv = pinned_h2d_gbps(), cpu_gemv_gbps()
    engine_gemv = engine_gemv_gbps(1 << 30)[0]  # the kernel the engine's CPU layers run (the C GEMV)
    log(
        f"pinned H2D {pinned:.1f} GB/s; CPU bf16 GEMV torch {gemv:.1f}, engine {engine_gemv:.1f} GB/s;",
        save_calibration(pinned, engine_gemv, "/tmp/spill-cal"),
    )
    results: dict = {"pinned_h2d_gbps": pinned, "cpu_gemv_gbps": gemv, "runs": {}}
    all_rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        cleanup()
        limit_gpu(budget)
        rows: list[tuple[str, dict]] = []
        for mode in args.modes.split(","):
            if time.perf_counter() - T0 > args.time_limit:
                log(f"time limit: skipping {mode} @ {budget} GiB")
                continue
            eng = {"accelerate": "accelerate", "llamacpp": "llama.cpp"}.get(mode, "spillover " + mode)
            name = f"{eng} @{budget:g}GiB"
            log("start", name)
            try:
                if mode == "llamacpp":
                    import llamacpp

                    fit = llamacpp.LlamaCpp().fit_layers(args.llamacpp_gguf, budget, 4352)
                    log("llama.cpp --fit:", fit)
                    r = run_llamacpp(args.llamacpp_gguf, fit["ngl"], "--fit", args.decode_tokens // 2)
                    r["fit"] = fit
                    name = f"llama.cpp -ngl {fit['ngl']} (--fit) @{budget:g}GiB"
                    own = next((x for n, x in rows if n.startswith("spillover") and "gpu_layers" in x), None)
                    if own is not None and own["gpu_layers"] != fit["ngl"]:
                        rows.append((name, r))
                        results["runs"][name] = r
                        name = f"llama.cpp -ngl {own['gpu_layers']} (as spillover) @{budget:g}GiB"
                        log("start", name)
                        r = run_llamacpp(
                            args.llamacpp_gguf, own["gpu_layers"], "as spillover", args.decode_tokens // 2
                        )
                elif mode == "accelerate":
                    # accelerate's planner counts weights only: at the budget itself its lm_head move runs
                    # out of memory (seen at 8 GiB), so its allocator gets ACCELERATE_SLACK_GIB more
                    limit_gpu(budget + ACCELERATE_SLACK_GIB)
                    r = run_accelerate(
                        host,
                        budget,
                        prompt,
                        long_prompt if budget <= 8 else None,
                        args.accelerate_decode_tokens,
                    )
                else:
                    limit_gpu(budget)
                    long_ok = mode != "cpu"  # CPU-computed prefill of 4096 tokens: minutes; not measured
                    dec = args.decode_tokens if mode != "cpu" else max(8, args.decode_tokens // 2)
                    r = run_spillover(host, mode, budget, prompt, long_prompt if long_ok else None, dec)
            except Exception as e:
                traceback.print_exc()
                r = {"error": f"{type(e).__name__}: {e}"[:400]}
            cleanup()  # outside the except block: its traceback no longer pins the failed run's tensors
            log("done", name, {k: v for k, v in r.items() if k not in ("prompt_logprobs", "tokens")})
            rows.append((name, r))
            results["runs"][name] = r
            with open(os.path.join(args.out, "offload_results.json"), "w") as f:
                json.dump(results, f, indent=1, default=str)
        all_rows += rows
    print(f"\ndevice: {torch.cuda.get_device_name(0)}; pinned H2D {pinned:.1f} GB/s, CPU GEMV {gemv:.1f} GB/s "
          f"({torch.get_num_threads()} threads); batch 1, prompt 128, {args.decode_tokens} new tokens")  # fmt: skip
    print(table(all_rows, pinned, gemv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
