"""Decode speed with a JSON schema constraint vs without, same model, same run (issue 19's overhead check).

    python benchmarks/structured.py [-m MODEL] [--batch 1,32] [--tokens 128] [--schemas open,bounded] [--profile]
    python benchmarks/structured.py --random smollm2|llama8b --tokenizer-dir DIR   # GPU box: no model files
    ... --copy-check   # first: on a GPU, does a mask's host->device copy wait for the queued kernels?
    ... --mask-check   # first: 32 masks filled one at a time, on llguidance's pool, on Python threads

`--random` builds the named shape with random weights and the tokenizer files in DIR (write them with
`python benchmarks/structured.py --save-tokenizer DIR` where the SmolLM2 GGUF is installed); the vocabulary is
the tokenizer's, so the masks cost what they cost on SmolLM2. The shape sets the step time the masks hide behind.

Each row generates `--tokens` tokens for `batch` prompts, alternating a plain run and one run per schema
(`--reps` times, median kept); ignore_eos keeps the plain ones going. Schemas: `open`, an object with an
array of up to 400 strings of at most 24 characters (other keys allowed: random weights soon write an
unbounded extra key, where masks are cheap, or end the object and stop early: compare its tok/s with
the "JSON tokens/row" column in mind); `bounded`, the same array with at least 64 items and nothing
else, so every row stays inside bounded strings, where llguidance's masks cost most. `--profile` adds the
host milliseconds per constrained step spent filling the masks and handing them to the sampler (the copy to
the GPU included), by wrapping `Grammars.fill_bitmask` and `runner.apply_token_bitmask`.
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
from spillover.engine.sampler import apply_token_bitmask  # noqa: E402

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
BOUNDED = {
    "type": "object",
    "properties": {"items": {**SCHEMA["properties"]["items"], "minItems": 64}},
    "required": ["items"],
    "additionalProperties": False,
}
SCHEMAS = {"open": SCHEMA, "bounded": BOUNDED}


def run(llm: LLM, batch: int, tokens: int, schema: dict | None) -> float:
    msgs = [[{"role": "user", "content": f"List {batch + i} fruits as JSON."}] for i in range(batch)]
    p = SamplingParams(
        max_tokens=tokens, temperature=0.8, seed=0, ignore_eos=schema is None, json_schema=schema
    )
    t0 = time.perf_counter()
    outs = llm.chat(msgs, p)
    dt = time.perf_counter() - t0
    run.tokens_per_row = sum(len(o.token_ids) for o in outs) / batch  # type: ignore[attr-defined]
    return sum(len(o.token_ids) for o in outs) / dt


class HostTimes:
    """Host seconds in the mask fill and the mask hand-over (copy + unpack), per constrained step."""

    def __init__(self, llm: LLM) -> None:
        import spillover.engine.runner as runner_mod

        self.fill = self.apply = 0.0
        self.steps = 0
        grammars = llm.engine.runner.grammars
        fill, apply = grammars.fill_bitmask, runner_mod.apply_token_bitmask

        def timed_fill(*args, **kw):
            t = time.perf_counter()
            try:
                return fill(*args, **kw)
            finally:
                self.fill += time.perf_counter() - t
                self.steps += 1

        def timed_apply(*args, **kw):
            t = time.perf_counter()
            try:
                return apply(*args, **kw)
            finally:
                self.apply += time.perf_counter() - t

        grammars.fill_bitmask, runner_mod.apply_token_bitmask = timed_fill, timed_apply

    def take(self) -> tuple[float, float]:
        n = max(self.steps, 1)
        out = (1e3 * self.fill / n, 1e3 * self.apply / n)
        self.fill = self.apply = 0.0
        self.steps = 0
        return out


def mask_check(llm: LLM, batch: int = 32, steps: int = 30) -> None:
    """Host ms per step to fill `batch` masks of rows inside bounded JSON strings (the BOUNDED schema, one
    random path), by how the rows are computed: one at a time; on llguidance's pool (default size and
    Grammars.threads) with a matcher per row, into empty memory or right after a `torch.full` of the mask
    (torch's OpenMP threads then spin on every core); with copies of one matcher (deep_copy shares the lexer
    and its lock); on Python threads. Each fill starts 20 ms after the last torch op on the CPU.
    cpu/wall: the process's CPU seconds per wall second while filling (spinning threads included)."""
    from concurrent.futures import ThreadPoolExecutor

    import llguidance
    import torch

    from spillover.structured.grammar import grammar_text

    g = llm.engine.runner.grammars
    ll, words = g.ll_tokenizer, (g.vocab_size + 31) // 32
    text = grammar_text(SamplingParams(json_schema=BOUNDED))
    own = lambda: [llguidance.LLMatcher(ll, text, log_level=0) for _ in range(batch)]  # noqa: E731
    one = llguidance.LLMatcher(ll, text, log_level=0)
    pool, default = llguidance.LLExecutor(g.threads), llguidance.LLExecutor()
    py = ThreadPoolExecutor(g.threads)
    n = g.threads
    kinds = {  # name: (matchers, how, allocate the mask with torch.full)
        "one row at a time": (own(), None, False),
        "LLExecutor() default, own matchers": (own(), default, False),
        f"LLExecutor({n}), own matchers": (own(), pool, False),
        f"LLExecutor({n}), own matchers, after torch.full": (own(), pool, True),
        f"LLExecutor({n}), copies of one matcher": ([one.deep_copy() for _ in range(batch)], pool, False),
        f"Python threads ({n}), own matchers": (own(), py, False),
    }
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    cpu = dict.fromkeys(kinds, 0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        masks = []
        for k, (ms, how, full) in kinds.items():
            time.sleep(0.02)
            t, c = time.perf_counter(), time.process_time()
            if full:
                mask = torch.full((batch, words), -1, dtype=torch.int32)
            else:
                mask = torch.empty((batch, words), dtype=torch.int32)
            if how is None:
                for i, m in enumerate(ms):
                    m.unsafe_compute_mask_ptr(mask[i].data_ptr(), words * 4)
            elif how is py:
                rows = [(m, mask[i].data_ptr()) for i, m in enumerate(ms)]
                list(py.map(lambda r: r[0].unsafe_compute_mask_ptr(r[1], words * 4), rows))
            else:
                how.unsafe_compute_mask_ptr(
                    [(m, i) for i, m in enumerate(ms)], mask.data_ptr(), words * 4, batch
                )
            wall[k].append(time.perf_counter() - t)
            cpu[k] += time.process_time() - c
            masks.append(mask)
        assert all(torch.equal(masks[0], m) for m in masks)
        logits = torch.randn(batch, g.vocab_size, generator=gen)
        apply_token_bitmask(logits, masks[0], list(range(batch)))
        for ms, _, _ in kinds.values():
            for m, tok in zip(ms, logits.argmax(-1).tolist(), strict=True):
                m.consume_token(tok)
    print(f"mask check: {batch} rows in bounded strings, {steps} steps, a pool of {n} threads")
    for k in kinds:
        ms_step, ratio = 1e3 * statistics.median(wall[k]), cpu[k] / sum(wall[k])
        print(f"mask check: {k}: {ms_step:.2f} ms/step, cpu/wall {ratio:.1f}")
    py.shutdown()


def copy_check() -> None:
    """Host time of a [32, 1536] int32 mask's non_blocking copy to the GPU queued behind ~50 ms of matmuls:
    from pageable memory, from pinned memory; a one-row mask and 32 floats from pageable memory."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for name, t in (("32 rows, pageable", torch.full((32, 1536), -1, dtype=torch.int32)),
                    ("32 rows, pinned", torch.full((32, 1536), -1, dtype=torch.int32, pin_memory=True)),
                    ("1 row, pageable", torch.full((1, 1536), -1, dtype=torch.int32)),
                    ("32 floats (a sampler column), pageable", torch.ones(32))):  # fmt: skip
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(40):
                a @ a  # noqa: B018  (queued work)
            queued = time.perf_counter()
            t.to("cuda", non_blocking=True)
            copied = time.perf_counter()
            torch.cuda.synchronize()
            times.append((1e3 * (copied - queued), 1e3 * (time.perf_counter() - t0)))
        c, total = statistics.median(x[0] for x in times), statistics.median(x[1] for x in times)
        print(f"copy check: {name}: the copy call took {c:.2f} ms of the {total:.1f} ms queued")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--schemas", default="open,bounded", help=f"comma-separated, of {', '.join(SCHEMAS)}")
    ap.add_argument("--profile", action="store_true", help="host ms per constrained step in the masks")
    ap.add_argument("--random", choices=["smollm2", "llama8b"], help="random weights of this shape")
    ap.add_argument("--tokenizer-dir", help="tokenizer files for --random")
    ap.add_argument(
        "--save-tokenizer", metavar="DIR", help="write the default model's tokenizer files and exit"
    )
    ap.add_argument(
        "--copy-check", action="store_true", help="first time a mask's copy behind queued GPU work"
    )
    ap.add_argument("--mask-check", action="store_true", help="first compare ways of filling 32 masks")
    a = ap.parse_args()
    if a.save_tokenizer:
        save_tokenizer(a.save_tokenizer)
        return
    if a.copy_check:
        copy_check()
    batches = [int(b) for b in a.batch.split(",")]
    schemas = {n: SCHEMAS[n] for n in a.schemas.split(",")}
    model = a.model
    if a.random:
        from spillover.loading.source import random_source

        cfg = {"smollm2": SMOLLM2, "llama8b": {**LLAMA3_8B, "vocab_size": 49152, "bos_token_id": 1,
                                               "eos_token_id": 2}}[a.random]  # fmt: skip
        model = dataclasses.replace(random_source(cfg, f"{a.random}-random"), hf_dir=a.tokenizer_dir)
    t0 = time.perf_counter()
    llm = LLM(
        model,
        dtype="bf16" if a.random else "auto",
        max_batch_size=max(batches),
        max_seq_len=1024,
        progress=False,
    )
    print(f"{model if isinstance(model, str) or model is None else a.random + ' (random weights)'}, "
          f"{llm.device_map.summary()}, loaded in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    for schema in schemas.values():
        run(llm, 1, 8, schema)  # warm-up: graphs, the llguidance vocabulary
    if a.mask_check:
        mask_check(llm)
    host = HostTimes(llm) if a.profile else None
    head = "| schema | batch | plain tok/s | JSON schema tok/s | overhead | JSON tokens/row |"
    print(head + (" mask fill ms/step | mask hand-over ms/step |" if host else ""))
    print("| --- " * (head.count("|") - 1 + (2 if host else 0)) + "|")
    for b in batches:
        plain: list[float] = []
        shaped: dict[str, list[float]] = {n: [] for n in schemas}
        lengths: dict[str, list[float]] = {n: [] for n in schemas}
        prof: dict[str, list[tuple[float, float]]] = {n: [] for n in schemas}
        for _ in range(a.reps):
            plain.append(run(llm, b, a.tokens, None))
            for n, schema in schemas.items():
                if host:
                    host.take()
                shaped[n].append(run(llm, b, a.tokens, schema))
                lengths[n].append(run.tokens_per_row)  # type: ignore[attr-defined]
                if host:
                    prof[n].append(host.take())
        p = statistics.median(plain)
        for n in schemas:
            c = statistics.median(shaped[n])
            row = f"| {n} | {b} | {p:.0f} | {c:.0f} | {100 * (p - c) / p:.1f}% | {statistics.median(lengths[n]):.0f} |"
            if host:
                row += f" {statistics.median(x[0] for x in prof[n]):.2f} | {statistics.median(x[1] for x in prof[n]):.2f} |"
            print(row, flush=True)


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
