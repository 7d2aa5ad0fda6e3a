"""GPU: a Qwen2.5-VL-7B-shaped or Llama-3.2-11B-Vision-shaped model (random weights, bf16): image encode time,
TTFT, decode tok/s; and the documented vision example's mapping parameters under an enforced budget that spills
text layers.

    python benchmarks/vision.py [--arch qwen2_5_vl|mllama] [--out DIR] [--budget GIB] [--only whole|budget]

Each point runs in its own process (the budget is per process):
- "whole": no budget. The tower encodes one 1024 x 1024 image (1036 x 1036 after the processor's resize with
  the released checkpoints' max_pixels: 5476 patches -> 1369 tokens), timed with CUDA syncs, median of 5
  after 2 warm-ups; TTFT of that image + 64 text tokens (a new image each time: no prefix-cache hit), median
  of 3; decode tok/s over 128 tokens after it, beside the same prompt without the image (the peer).
- "budget": `torch.cuda.set_per_process_memory_fraction(budget / total)` and `max_memory={"cuda:0": budget}`
  (as benchmarks/fit_grid.py enforces budgets) with the example's parameters: --max-seq-len 4096
  --max-batch-size 2 --max-num-images 2 --max-image-length 1024. The plan must put the tower on cuda:0 and
  spill text layers; then 2 requests of 2 images each (1024 px) run batched: no OOM, peak within the budget.
Writes DIR/vision.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

GIB = 1 << 30
IMG, START, END = 151655, 151652, 151653
QWEN25_VL_7B = {
    "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], "vocab_size": 152064,
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": False,
    "image_token_id": IMG, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                      "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
}  # fmt: skip
RELEASED_PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056}  # Qwen2.5-VL's preprocessor_config.json
MLLAMA_IMG = 128256
LLAMA_32_11B_VISION = {
    "model_type": "mllama", "architectures": ["MllamaForConditionalGeneration"], "image_token_index": MLLAMA_IMG,
    "text_config": {"model_type": "mllama_text_model", "vocab_size": 128256, "hidden_size": 4096,
                    "intermediate_size": 14336, "num_hidden_layers": 40, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "rms_norm_eps": 1e-5,
                    "bos_token_id": 128000, "eos_token_id": 128009},
    "vision_config": {"hidden_size": 1280, "attention_heads": 16, "num_hidden_layers": 32, "num_global_layers": 8,
                      "intermediate_size": 5120, "image_size": 560, "patch_size": 14, "max_num_tiles": 4,
                      "intermediate_layers_indices": [3, 7, 15, 23, 30], "vision_output_dim": 7680},
}  # fmt: skip
ARCH = os.environ.get("VISION_ARCH", "qwen2_5_vl")  # set by --arch (passed on to the point processes)


def image(edge: int, seed: int):  # noqa: ANN201
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (edge, edge, 3), dtype=np.uint8))


def prompt(n_images: int, text: int = 64) -> list[int]:
    if ARCH == "mllama":
        return [MLLAMA_IMG] * n_images + list(range(1000, 1000 + text))
    return [START, IMG, END] * n_images + list(range(1000, 1000 + text))


def load(**kw):  # noqa: ANN201
    from spillover import LLM
    from spillover.loading.source import random_source

    cfg, name = (LLAMA_32_11B_VISION, "llama-3.2-11b-vision-shape") if ARCH == "mllama" else (QWEN25_VL_7B,
                                                                                             "qwen2.5-vl-7b-shape")  # fmt: skip
    # drawn on the GPU: CPU draws of the spilled layers' weights took minutes (the budget point timed out)
    llm = LLM(random_source(cfg, name, draw_on="cuda"), dtype="bf16", progress=False, **kw)
    if ARCH != "mllama":  # the released checkpoints' pixel range (mllama: 4 tiles of 560 px, the default)
        llm.image_processor = llm.arch.image_processor(llm.config, RELEASED_PREPROCESSOR)
    return llm


def point_whole() -> dict:
    import torch

    from spillover import SamplingParams

    llm = load(max_seq_len=4096, max_num_images=1, max_image_length=1024)
    out = {"device_map": llm.device_map.summary(), "vision_device": llm.device_map.stage_device("vision")}
    t = time.perf_counter()
    processed = llm.image_processor(image(1024, 0))
    out["preprocess_s"] = time.perf_counter() - t
    out["grid"], out["image_tokens"] = list(processed.grid), processed.num_tokens  # mllama: (ratio id, tiles)
    times = []
    with torch.inference_mode():
        for i in range(7):
            torch.cuda.synchronize()
            t = time.perf_counter()
            llm.model.encode_images([processed.pixels], [processed.grid])
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t)
    out["encode_s"] = statistics.median(times)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    llm.generate(prompt(1), one, images=[image(1024, 99)])  # warm-up: prefill shapes, SDPA kernels
    out["ttft_s"] = statistics.median(
        llm.generate(prompt(1), one, images=[image(1024, 100 + i)]).metrics["time_to_first_token_s"]
        for i in range(3)
    )
    dec = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    out["decode_tok_s"] = llm.generate(prompt(1), dec, images=[image(1024, 200)]).metrics["decode_tok_per_s"]
    text = prompt(0, 64 + processed.num_tokens)  # the peer: the same length, text only
    out["text_decode_tok_s"] = llm.generate(text, dec).metrics["decode_tok_per_s"]
    out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
    return out


def point_budget(budget: float) -> dict:
    import torch

    from spillover import SamplingParams

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(budget * GIB / total)
    out: dict = {"budget_gib": budget}
    t0 = time.perf_counter()
    isq = 4 if ARCH == "mllama" else None  # the documented example: run --isq 4 -m Llama-3.2-11B-Vision ...
    llm = load(max_memory={"cuda:0": f"{budget}GiB"}, max_seq_len=4096, max_batch_size=2, max_num_images=2,
               max_image_length=1024, offload="stream", isq=isq)  # fmt: skip
    out["load_s"] = time.perf_counter() - t0
    print(f"loaded in {out['load_s']:.1f} s: {llm.device_map.summary()}", file=sys.stderr, flush=True)
    dm = llm.device_map
    out |= {"device_map": dm.summary(), "vision_device": dm.stage_device("vision"),
            "cpu_layers": len(dm.layers_on("cpu")), "streamed_layers": len(dm.streamed),
            "gpu_layers": len(dm.layers_on("cuda:0")) - len(dm.streamed), "plan_vision": llm.plan.vision}  # fmt: skip
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    try:
        t = time.perf_counter()
        outs = llm.generate([prompt(2), prompt(2)], params, images=[[image(1024, 1), image(1024, 2)],
                                                                     [image(1024, 3), image(1024, 4)]])  # fmt: skip
        out["batch_wall_s"] = time.perf_counter() - t
        out["ttft_s"] = [o.metrics["time_to_first_token_s"] for o in outs]
        out["decode_tok_s"] = [o.metrics["decode_tok_per_s"] for o in outs]
        out["prompt_tokens"] = [o.metrics["prompt_tokens"] for o in outs]
        out["oom"] = False
    except torch.OutOfMemoryError as e:
        out["oom"] = str(e)[:300]
    out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget", type=float, default=14.0, help="GiB for the budget point (default 14)")
    ap.add_argument("--arch", default="qwen2_5_vl", choices=["qwen2_5_vl", "mllama"])
    ap.add_argument("--only", default=None, choices=["whole", "budget"], help="run one of the two points")
    ap.add_argument("--timeout", type=float, default=115, help="seconds per point")
    ap.add_argument("--point", default=None, help="run one point (JSON) in this process; prints its JSON")
    args = ap.parse_args()
    os.environ["VISION_ARCH"] = args.arch
    global ARCH
    ARCH = args.arch
    if args.point:
        p = json.loads(args.point)
        res = point_whole() if p["kind"] == "whole" else point_budget(p["budget"])
        print("RESULT " + json.dumps(res))
        return
    results = {}
    for p in ({"kind": "whole"}, {"kind": "budget", "budget": args.budget}):
        if args.only and p["kind"] != args.only:
            continue
        try:
            r = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--point", json.dumps(p)], capture_output=True,
                               text=True, timeout=args.timeout, check=False)  # fmt: skip
            stdout, stderr = r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            stdout, stderr = "", f"timed out after {args.timeout} s; stderr: {(e.stderr or b'')[-2000:]!r}"
        line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
        results[p["kind"]] = json.loads(line[7:]) if line else {"error": stderr[-3000:]}
        print(p["kind"], json.dumps(results[p["kind"]], indent=1), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"vision-{args.arch}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
