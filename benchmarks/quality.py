"""What quantization costs in accuracy, on real weights: perplexity and top-1 agreement per mode.

    python benchmarks/quality.py [-m MODEL.gguf] [--device cpu|cuda] [--modes f32,bf16,isq8,isq4]
    python benchmarks/quality.py --modes f32,act8,act12,act16      # how many activation bits a model needs

The text is benchmarks/texts/public_domain_en.txt (public domain, see texts/README.md). Each mode loads the
model and scores the text once as a prompt (prompt logprobs): perplexity = exp(-mean logprob of each next
token), top-1 agreement = share of positions whose most likely next token equals the reference mode's (the
first of --modes). The default model is SmolLM2-135M-Instruct (Q4_1 GGUF): its reference is the GGUF
dequantized to f32.

`actN` (N = 2..24) is the f32 mode with the input of every layer projection rounded per row and block of 32 to a
signed N-bit integer times the block's scale (max |x| / (2^(N-1) - 1)): the activations an integer prompt GEMM
with N-bit activations multiplies (gguf_cpu.c's: 16, int16 with vpdpwssd; llama.cpp's Q8_0 / Q8_K: 8), the
weights and the accumulation exact. It answers whether 8-bit activations (twice the VNNI rate) keep a model's
top-1 agreement (benchmarks/NOTES-cpu.md, sixth session: they do not on SmolLM2 or Gemma 3 270M).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

TEXT = os.path.join(os.path.dirname(__file__), "texts", "public_domain_en.txt")
MODES = {  # name -> LLM keyword arguments
    "default": {},  # --dtype auto: a GGUF on the CPU keeps its Q4 blocks (quant/gguf_native.py)
    "f32": {"dtype": "f32"},
    "bf16": {"dtype": "bf16"},
    "isq8": {"dtype": "f32", "isq": 8},
    "isq4": {"dtype": "f32", "isq": 4},
    "bf16+isq8": {"dtype": "bf16", "isq": 8},
    "bf16+isq4": {"dtype": "bf16", "isq": 4},
}


def round_activations(model: torch.nn.Module, bits: int) -> None:
    """Round the input of every projection in `model.layers` per row and block of 32 to `bits`-bit integers
    times the block's scale, as an integer GEMM with `bits`-bit activations sees them (hooks, in place)."""
    qmax = 2 ** (bits - 1) - 1

    def hook(_mod: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        b = x.reshape(-1, 32)
        s = b.abs().amax(-1, keepdim=True) / qmax
        q = torch.where(s > 0, torch.round(b / torch.where(s > 0, s, 1)) * s, b)
        return (q.reshape(x.shape), *args[1:])

    for mod in model.layers.modules():
        if isinstance(mod, torch.nn.Linear) and mod.in_features % 32 == 0:
            mod.register_forward_pre_hook(hook)


def score(model: str | None, mode: str, device: str, ids: list[int] | None) -> dict:
    from spillover import LLM, SamplingParams

    bits = int(mode[3:]) if mode.startswith("act") and mode[3:].isdigit() else None
    t = time.perf_counter()
    llm = LLM(model, device_map=device, progress=False, max_seq_len=2048, **MODES["f32" if bits else mode])
    load = time.perf_counter() - t
    if bits:
        round_activations(llm.model, bits)
    if ids is None:
        with open(TEXT, encoding="utf-8") as f:
            ids = llm.tokenizer.encode(f.read())
    top1: list[torch.Tensor] = []
    head = llm.model.head

    def recording_head(x: torch.Tensor) -> torch.Tensor:  # the runner asks logits of every prompt position
        out = head(x)
        top1.append(out.argmax(-1).cpu())
        return out

    llm.model.head = recording_head
    out = llm.generate(ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True))
    lps = [x for x in out.prompt_logprobs if x is not None]
    return {
        "ids": ids,
        "ppl": math.exp(-sum(lps) / len(lps)),
        "lps": torch.tensor(lps),
        "top1": torch.cat(top1)[: len(ids) - 1],
        "weights_gib": sum(p.nbytes for p in llm.model.parameters()) / (1 << 30),
        "load_s": load,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=None, help="a model path (default: the SmolLM2 GGUF)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="f32,isq8,isq4,bf16")
    args = ap.parse_args()
    modes = args.modes.split(",")
    ref = score(args.model, modes[0], args.device, None)
    rows = [(modes[0], ref)]
    for m in modes[1:]:
        rows.append((m, score(args.model, m, args.device, ref["ids"])))
    name = os.path.basename(args.model) if args.model else "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"\n{name}, {len(ref['ids'])} tokens of texts/public_domain_en.txt, device {args.device}")
    print(
        f"| mode | perplexity | vs {modes[0]} | top-1 agreement with {modes[0]} | prompt logprob deviation "
        "mean / max (nats) | weights in memory GiB |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for m, r in rows:
        agree = (r["top1"] == ref["top1"]).float().mean().item()
        dev = (r["lps"] - ref["lps"]).abs()
        print(
            f"| {m} | {r['ppl']:.3f} | {r['ppl'] / ref['ppl'] - 1:+.1%} | {agree:.2%} | "
            f"{dev.mean():.4f} / {dev.max():.3f} | {r['weights_gib']:.3f} |"
        )


if __name__ == "__main__":
    main()
