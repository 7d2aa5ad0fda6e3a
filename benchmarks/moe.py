"""Mixture of experts that spills: Qwen3-30B-A3B shape under a 24 GiB GPU budget, spillover vs accelerate.

    python benchmarks/moe.py [--budget 24] [--new 64] [--acc-new 3] [--out moe.json] [--skip-accelerate]

Random weights drawn on the GPU (then moved where the map puts them), batch 1, prompts of 128 and 2048 tokens.
The budget is enforced with `torch.cuda.set_per_process_memory_fraction` and given to both as max_memory.
Rows:
- spillover bf16 and --isq 4, automatic plan: decode tok/s after each prompt (after the 128-token prompt
  the median of REPS runs, each with a fresh prompt, after a warm-up), prefill time of the 2048 prompt
  with the cost model's choice (CPU-resident experts copied to the GPU for long steps, `Experts.stream_pairs`)
  and with CPU compute forced, the fraction of expert bytes per device, and the GB/s of expert bytes the CPU
  path read per decode token (k experts x CPU-resident layers x bytes per expert / time per token).
- accelerate: the transformers model with `infer_auto_device_map(max_memory=...)` + `dispatch_model`
  (what `device_map="auto"` does), decode tokens capped (`--acc-new`: it streams every offloaded layer each
  token) and one 2048-token prefill.
- rooflines measured in the same run: host memory read (sum over 4 GiB), pinned and pageable host->GPU copies.
- CPU expert paths alone (`cpu_experts`): one CPU-resident layer's decode step (1 token, top-8, experts of
  Qwen3-30B-A3B's shape) in bf16 through oneDNN and through torch's own GEMV, and in ISQ int8 / int4 (torch's
  weight-only CPU kernels): ms per layer and GB/s of the expert bytes read.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

REPS = 3
"""Decode runs per measurement at the 128-token prompt (fresh prompts); the table gives their median."""
GiB = 1 << 30
ROOT = Path(__file__).resolve().parent.parent
QWEN3_30B_A3B = json.loads((ROOT / "tests" / "configs" / "qwen3-30b-a3b" / "config.json").read_text())
OUT = Path(os.environ.get("OUT", "."))


def log(*a: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def cleanup() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def set_budget(gib: float | None) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GiB / total) if gib else 1.0, 0)


def rooflines() -> dict:
    """Host memory read GB/s (torch sum over 4 GiB of f32; a bf16 sum converts and measures that instead),
    pinned and pageable host->GPU GB/s."""
    out: dict = {"cpu_threads": torch.get_num_threads()}
    a = torch.ones(GiB, dtype=torch.float32)  # 4 GiB
    a.sum()
    t = time.perf_counter()
    for _ in range(3):
        a.sum()
    out["host_read_gbps"] = 3 * a.numel() * 4 / (time.perf_counter() - t) / 1e9
    del a
    for kind in ("pinned", "pageable"):
        h = torch.ones(GiB // 2, dtype=torch.bfloat16, pin_memory=kind == "pinned")  # 1 GiB
        d = torch.empty_like(h, device="cuda")
        d.copy_(h)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            d.copy_(h, non_blocking=kind == "pinned")
        torch.cuda.synchronize()
        out[f"{kind}_h2d_gbps"] = 3 * h.numel() * 2 / (time.perf_counter() - t) / 1e9
        del h, d
    return out


def cpu_experts(n_experts: int = 32, steps: int = 16) -> dict:
    """One CPU-resident MoE layer's decode step per expert format (see the module docstring)."""
    from torch import nn

    from spillover.layers import moe
    from spillover.layers.moe import Experts, route_topk

    H, inter, k = QWEN3_30B_A3B["hidden_size"], QWEN3_30B_A3B["moe_intermediate_size"], 8
    out: dict = {"threads": torch.get_num_threads(), "experts": n_experts}
    g = torch.Generator(device="cuda").manual_seed(0)
    rg = torch.Generator().manual_seed(0)
    routes = [route_topk(torch.randn(1, n_experts, generator=rg), k, True) for _ in range(steps)]
    x = torch.randn(1, H, generator=rg).to(torch.bfloat16)
    keys = [(2 * inter, H, torch.bfloat16), (H, inter, torch.bfloat16)]
    saved = {kk: moe._NATIVE_GEMV.pop(kk) for kk in keys if kk in moe._NATIVE_GEMV}
    for fmt in ("bf16 oneDNN", "bf16 torch GEMV", "int8", "int4"):
        with torch.device("meta"):
            ex = Experts(n_experts, H, inter)
        for attr, shape in (
            ("gate_up_proj", (n_experts, 2 * inter, H)),
            ("down_proj", (n_experts, H, inter)),
        ):
            w = (torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02).cpu()
            setattr(ex, attr, nn.Parameter(w, requires_grad=False))
            if fmt.startswith("int"):
                ex.quantize_(attr, int(fmt[3:]), torch.device("cuda"), "cpu")
        for kk in keys:
            moe._NATIVE_GEMV[kk] = fmt == "bf16 torch GEMV"
        per_expert = sum(p.numel() * p.element_size() for p in ex.parameters()) / n_experts
        with torch.inference_mode():
            for idx, wt in routes[:3]:
                ex(x, idx, wt)
            t = time.perf_counter()
            for idx, wt in routes:
                ex(x, idx, wt)
            dt = (time.perf_counter() - t) / steps
        out[fmt] = {
            "ms_per_layer": dt * 1e3,
            "gbps": k * per_expert / dt / 1e9,
            "mb_per_expert": per_expert / 1e6,
        }
        log("cpu experts", fmt, out[fmt])
        del ex
    for kk in keys:  # the engine times its own choice (moe.cpu_native_gemv)
        moe._NATIVE_GEMV.pop(kk, None)
    moe._NATIVE_GEMV.update(saved)
    return out


def expert_bytes(model) -> dict[str, int]:  # noqa: ANN001
    from spillover.layers.moe import Experts

    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, Experts):
            for p in m.parameters():
                out[p.device.type] = out.get(p.device.type, 0) + p.numel() * p.element_size()
    return out


def set_stream(model, pairs) -> None:  # noqa: ANN001
    from spillover.layers.moe import Experts

    for m in model.modules():
        if isinstance(m, Experts) and m.device.type == "cpu":
            m.stream_pairs = pairs


def timed(fn):  # noqa: ANN001, ANN201
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return r, time.perf_counter() - t


def bench_spillover(isq: int | None, budget: float, new: int) -> dict:
    from spillover import LLM, SamplingParams
    from spillover.loading.source import random_source

    res: dict = {"isq": isq}
    set_budget(budget)
    try:
        src = random_source(QWEN3_30B_A3B, "qwen3-30b-a3b-random", draw_on="cuda")
        llm, res["load_s"] = timed(
            lambda: LLM(src, dtype="bf16", isq=isq, max_memory={"cuda:0": f"{budget}GiB"}, progress=False)
        )
        log("loaded", res["load_s"])
        dm = llm.device_map
        res["map"] = dm.summary()
        res["experts_on_cpu_layers"] = [i for i, d in enumerate(dm.experts) if d == "cpu"]
        res["expert_bytes"] = eb = expert_bytes(llm.model)
        res["expert_fraction"] = {d: b / sum(eb.values()) for d, b in eb.items()}
        res["plan_gpu_gib"] = sum(r.total_bytes for r in llm.plan.rows if r.device.startswith("cuda")) / GiB
        cpu_ex = [m for m in llm.model.modules() if type(m).__name__ == "Experts" and m.device.type == "cpu"]
        res["stream_pairs"] = cpu_ex[0].stream_pairs if cpu_ex else None
        res["cpu_experts_pinned"] = (
            all(m.gate_up_proj.is_pinned() for m in cpu_ex) if cpu_ex and isq is None else None
        )
        gen = torch.Generator().manual_seed(0)
        # a fresh prompt per measurement: a repeated one would hit the prefix cache and skip its prefill
        p128s = [torch.randint(1000, 100000, (128,), generator=gen).tolist() for _ in range(REPS)]
        p128 = p128s[0]
        p2048 = [torch.randint(1000, 100000, (2048,), generator=gen).tolist() for _ in range(3)]
        greedy = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        llm.generate(p128[::2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
        rates = [llm.generate(p, greedy).metrics["decode_tok_per_s"] for p in p128s]
        res["decode_tok_s_128_runs"] = rates
        res["decode_tok_s_128"] = statistics.median(rates)  # the first run was slower in every session
        log("decode 128", res["decode_tok_s_128"], rates)
        if cpu_ex:  # time inside the CPU expert compute (after its wait for the GPU) per decode token
            spent = [0.0, 0]

            def timed_few(f):  # noqa: ANN001, ANN202
                def run(*a):  # noqa: ANN002, ANN202
                    t = time.perf_counter()
                    r = f(*a)
                    spent[0] += time.perf_counter() - t
                    spent[1] += 1
                    return r

                return run

            for m in cpu_ex:
                m._few = timed_few(m._few)
            n = 16
            o2 = llm.generate(p128[::-1], SamplingParams(max_tokens=n + 1, temperature=0, ignore_eos=True))
            for m in cpu_ex:
                del m._few
            calls = spent[1] // len(cpu_ex)  # decode steps (the prompt takes the grouped path)
            per_tok = spent[0] / max(calls, 1)
            res["cpu_expert_ms_per_token"] = per_tok * 1e3
            res["decode_tok_s_128_timed_run"] = o2.metrics["decode_tok_per_s"]
            log("cpu expert ms/token", res["cpu_expert_ms_per_token"], calls)
        one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        choice = res["stream_pairs"] is not None and 2048 * 8 >= res["stream_pairs"]
        res["prefill_choice"] = "stream experts to GPU" if choice else "CPU experts"
        _, res["prefill_2048_s"] = timed(lambda: llm.generate(p2048[0], one))
        log("prefill", res["prefill_2048_s"])
        if cpu_ex:  # the other way, for the comparison
            saved = res["stream_pairs"]
            set_stream(llm.model, None if choice else 1)
            _, res["prefill_2048_s_other"] = timed(lambda: llm.generate(p2048[1], one))
            set_stream(llm.model, saved)
            log("prefill other", res["prefill_2048_s_other"])
        out = llm.generate(
            p2048[2], SamplingParams(max_tokens=max(16, new // 2), temperature=0, ignore_eos=True)
        )
        res["decode_tok_s_2048"] = out.metrics["decode_tok_per_s"]
        if cpu_ex:  # bytes the CPU path reads per decode token: k distinct experts per CPU-resident layer
            per_expert = sum(p.numel() * p.element_size() for p in cpu_ex[0].parameters()) / 128
            per_token = len(cpu_ex) * 8 * per_expert
            res["cpu_expert_gb_per_token"] = per_token / 1e9
            res["cpu_expert_gbps_at_decode"] = per_token * res["decode_tok_s_128"] / 1e9
            res["cpu_expert_gbps_in_compute"] = per_token / (res["cpu_expert_ms_per_token"] / 1e3) / 1e9
            streamed = len(cpu_ex) * 128 * per_expert
            t_stream = res["prefill_2048_s"] if choice else res["prefill_2048_s_other"]
            res["prefill_stream_gbps"] = streamed / t_stream / 1e9
        # bytes the GPU reads per decode token: every non-expert weight there, k of E experts of its layers
        gpu_all = sum(p.numel() * p.element_size() for p in llm.model.parameters() if p.is_cuda)
        gpu_ex = res["expert_bytes"].get("cuda", 0)
        res["gpu_gb_per_token"] = (gpu_all - gpu_ex + gpu_ex * 8 / 128) / 1e9
        res["gpu_gbps_at_decode"] = res["gpu_gb_per_token"] * res["decode_tok_s_128"]
        from spillover.layers import moe

        res["cpu_native_gemv"] = {str(k[:2]): v for k, v in moe._NATIVE_GEMV.items()}
        res["gpu_peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GiB
        res["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
        llm = out = None  # freed before the next run
    except Exception as e:  # noqa: BLE001  (a crash is a result here: it goes in the table)
        import traceback

        traceback.print_exc()
        res["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    cleanup()
    set_budget(None)
    return res


def bench_accelerate(budget: float, new: int) -> dict:
    """The peer: transformers' Qwen3-MoE dispatched by accelerate under the same budget."""
    import transformers
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    res: dict = {}
    set_budget(budget)
    try:
        t0 = time.perf_counter()
        cfg = transformers.Qwen3MoeConfig(**{k: v for k, v in QWEN3_30B_A3B.items() if k != "architectures"})
        with init_empty_weights():
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        dmap = infer_auto_device_map(
            model, max_memory={0: f"{budget - 2}GiB", "cpu": "100GiB"}, dtype=torch.bfloat16,
            no_split_module_classes=getattr(model, "_no_split_modules", None),
        )  # fmt: skip

        def where(name: str):  # noqa: ANN202
            best = max((k for k in dmap if k == "" or name == k or name.startswith(k + ".")), key=len)
            return dmap[best]

        g = torch.Generator(device="cuda").manual_seed(0)
        on: dict[str, int] = {}
        for name, p in list(model.named_parameters()):
            dev = where(name)
            w = torch.randn(p.shape, generator=g, device="cuda", dtype=torch.bfloat16)
            w = w.mul_(0.02).add_(1.0) if "norm" in name else w.mul_(0.02)
            target = "cpu" if dev in ("cpu", "disk") else f"cuda:{dev}" if isinstance(dev, int) else dev
            set_module_tensor_to_device(model, name, target, value=w.to(target))
            if ".experts." in name:
                kind = "cpu" if target == "cpu" else "cuda"
                on[kind] = on.get(kind, 0) + w.numel() * 2
        model = dispatch_model(model, device_map=dmap)
        model.eval()
        res["load_s"] = time.perf_counter() - t0
        res["expert_bytes"] = on
        res["offloaded_modules"] = sum(1 for v in dmap.values() if v == "cpu")
        log("accelerate loaded", res["load_s"], res["expert_bytes"])
        gen = torch.Generator().manual_seed(0)
        p128 = torch.randint(1000, 100000, (1, 128), generator=gen).cuda()
        p2048 = torch.randint(1000, 100000, (1, 2048), generator=gen).cuda()

        def run(ids, n):  # noqa: ANN001, ANN202
            with torch.no_grad():
                return model.generate(
                    ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
                )

        run(p128, 1)  # warm-up
        _, t1 = timed(lambda: run(p128, 1))
        _, tn = timed(lambda: run(p128, 1 + new))
        res["decode_tokens"] = new
        res["decode_tok_s_128"] = new / (tn - t1)
        log("accelerate decode", res["decode_tok_s_128"])
        _, res["prefill_2048_s"] = timed(lambda: run(p2048, 1))
        log("accelerate prefill", res["prefill_2048_s"])
        res["gpu_peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GiB
        model = None  # freed before the next run
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        res["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    cleanup()
    set_budget(None)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=24.0)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--acc-new", type=int, default=3, help="accelerate: decode tokens (capped: it is slow)")
    ap.add_argument("--skip-accelerate", action="store_true")
    ap.add_argument("--skip-cpu-experts", action="store_true")
    ap.add_argument("--only", default="bf16,isq4")
    ap.add_argument("--out", default=str(OUT / "moe.json"))
    args = ap.parse_args()
    runs: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}

    def save() -> None:
        Path(args.out).write_text(json.dumps(runs, indent=1))

    runs["rooflines"] = rooflines()
    log("rooflines", runs["rooflines"])
    save()
    if not args.skip_cpu_experts:
        runs["cpu experts"] = cpu_experts()
        save()
    for name in ("bf16", "isq4", "accelerate"):  # the peer last: its figures are known from earlier runs
        if name == "accelerate" and not args.skip_accelerate:
            runs["accelerate bf16"] = bench_accelerate(args.budget, args.acc_new)
            log("accelerate", json.dumps(runs["accelerate bf16"]))
        elif name in args.only.split(","):
            runs[f"spillover {name}"] = bench_spillover(4 if name == "isq4" else None, args.budget, args.new)
            log(name, json.dumps(runs[f"spillover {name}"]))
        save()
    print(
        f"\n{runs['device']}, torch {runs['torch']}, Qwen3-30B-A3B shape, budget {args.budget} GiB, batch 1"
    )
    print("| run | decode tok/s (128) | decode tok/s (2048) | prefill 2048 s | experts GPU / CPU GiB |")
    print("| --- | --- | --- | --- | --- |")
    for n, r in runs.items():
        if not isinstance(r, dict) or n in ("rooflines", "cpu experts"):
            continue
        if "error" in r:
            print(f"| {n} | error: {r['error'][:150]} | | | |")
            continue
        eb = r.get("expert_bytes", {})
        print(f"| {n} | {r.get('decode_tok_s_128', 0):.2f} | {r.get('decode_tok_s_2048', 0):.2f} | "
              f"{r.get('prefill_2048_s', 0):.2f} | {eb.get('cuda', 0) / GiB:.1f} / {eb.get('cpu', 0) / GiB:.1f} |")  # fmt: skip
    save()


if __name__ == "__main__":
    main()
