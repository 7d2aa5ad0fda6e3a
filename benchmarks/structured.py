"""Decode speed with a JSON schema constraint vs without, same model, same run (issue 19's overhead check).

    python benchmarks/structured.py [-m MODEL] [--batch 1,32] [--tokens 128]
    python benchmarks/structured.py --random smollm2|llama8b --tokenizer-dir DIR   # GPU box: no model files

`--random` builds the named shape with random weights and the tokenizer files in DIR (write them with
`python benchmarks/structured.py --save-tokenizer DIR` where the SmolLM2 GGUF is installed); the vocabulary is
the tokenizer's, so the masks cost what they cost on SmolLM2. The shape sets the step time the masks hide behind.

Each row generates `--tokens` tokens for `batch` prompts twice, alternating plain and constrained runs
(`--reps` times, median kept). The constraint is a schema whose answers are long (an array of up to 400
bounded strings), so both runs decode the same number of tokens (ignore_eos keeps the plain ones going).
On a GPU the plain rows keep overlapped steps and the constrained ones do not (structured/grammar.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from shapes import LLAMA3_8B  # noqa: E402

from spillover import LLM, SamplingParams  # noqa: E402

SMOLLM2 = {
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip

SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 400}},
    "required": ["items"],
}


def run(llm: LLM, batch: int, tokens: int, schema: dict | None) -> float:
    msgs = [[{"role": "user", "content": f"List {batch + i} fruits as JSON."}] for i in range(batch)]
    p = SamplingParams(
        max_tokens=tokens, temperature=0.8, seed=0, ignore_eos=schema is None, json_schema=schema
    )
    t0 = time.perf_counter()
    outs = llm.chat(msgs, p)
    dt = time.perf_counter() - t0
    return sum(len(o.token_ids) for o in outs) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--random", choices=["smollm2", "llama8b"], help="random weights of this shape")
    ap.add_argument("--tokenizer-dir", help="tokenizer files for --random")
    ap.add_argument(
        "--save-tokenizer", metavar="DIR", help="write the default model's tokenizer files and exit"
    )
    a = ap.parse_args()
    if a.save_tokenizer:
        save_tokenizer(a.save_tokenizer)
        return
    batches = [int(b) for b in a.batch.split(",")]
    model = a.model
    if a.random:
        from spillover.loading.source import random_source

        cfg = {"smollm2": SMOLLM2, "llama8b": {**LLAMA3_8B, "vocab_size": 49152, "bos_token_id": 1,
                                               "eos_token_id": 2}}[a.random]  # fmt: skip
        model = dataclasses.replace(random_source(cfg, f"{a.random}-random"), hf_dir=a.tokenizer_dir)
    llm = LLM(
        model,
        dtype="bf16" if a.random else "auto",
        max_batch_size=max(batches),
        max_seq_len=1024,
        progress=False,
    )
    print(f"{model if isinstance(model, str) or model is None else a.random + ' (random weights)'}, "
          f"{llm.device_map.summary()}")  # fmt: skip
    run(llm, 1, 8, SCHEMA)  # warm-up: graphs, the llguidance vocabulary
    print("| batch | plain tok/s | JSON schema tok/s | overhead |\n| --- | --- | --- | --- |")
    for b in batches:
        plain, constrained = [], []
        for _ in range(a.reps):
            plain.append(run(llm, b, a.tokens, None))
            constrained.append(run(llm, b, a.tokens, SCHEMA))
        p, c = statistics.median(plain), statistics.median(constrained)
        print(f"| {b} | {p:.0f} | {c:.0f} | {100 * (p - c) / p:.1f}% |")


def save_tokenizer(out: str) -> None:
    """The default model's tokenizer as HF files (tokenizer.json + chat template), via transformers' GGUF reader."""
    from transformers import AutoTokenizer

    from spillover.loading.source import default_model_path

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tok.save_pretrained(out)
    print(f"wrote {sorted(os.listdir(out))}")


if __name__ == "__main__":
    main()
