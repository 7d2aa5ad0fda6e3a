"""Grammar engines side by side on SmolLM2's vocabulary: schema compile time and per-token mask cost.

    python benchmarks/grammar_engines.py      # llguidance (spillover's); xgrammar and outlines-core if installed

For each engine: compile a small nested JSON schema, then for every token of a valid answer compute the
next-token mask and advance the grammar by that token (median and p90 per token). The numbers pick the
engine spillover uses (structured/grammar.py says why); they are not a speed target.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import time

import torch

from spillover.loading.source import default_model_path
from spillover.loading.tokenizer import Tokenizer
from spillover.server.tokens import TokenTexts
from spillover.structured.grammar import JSON_OPTIONS, build_ll_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
DOC = {
    "name": "Ada Lovelace",
    "age": 36,
    "tags": ["math", "poetry"],
    "address": {"city": "London", "zip": "W1"},
}


def row(name: str, build_s: float, compile_s: float, per: list[float]) -> None:
    per = sorted(per)
    print(f"| {name} | {build_s * 1e3:.0f} | {compile_s * 1e3:.1f} | {statistics.median(per) * 1e6:.1f} | "
          f"{per[int(len(per) * 0.9)] * 1e6:.1f} |")  # fmt: skip


def main() -> None:
    tok = Tokenizer.from_gguf(default_model_path())
    V, eos = tok.vocab_size, sorted(tok.eos_token_ids)
    ids = tok.encode(json.dumps(DOC), add_special_tokens=False)
    print(f"SmolLM2 vocabulary {V}, answer of {len(ids)} tokens; times per token: mask + advance\n")
    print(
        "| engine | vocabulary build ms | schema compile ms | median us | p90 us |\n| --- | --- | --- | --- | --- |"
    )

    import llguidance as llg

    t0 = time.perf_counter()
    lltok = build_ll_tokenizer(tok, V, eos)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = llg.LLMatcher(lltok, llg.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_OPTIONS))
    compile_s = time.perf_counter() - t0
    mask, per = torch.zeros((V + 31) // 32, dtype=torch.int32), []
    for t in ids:
        t0 = time.perf_counter()
        m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        assert m.consume_token(t), m.get_error()
        per.append(time.perf_counter() - t0)
    row("llguidance", build, compile_s, per)

    texts = TokenTexts(tok)
    vocab = [texts.bytes_of(i) for i in range(V)]
    if importlib.util.find_spec("xgrammar"):
        import xgrammar as xgr

        t0 = time.perf_counter()
        compiler = xgr.GrammarCompiler(
            xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=V, stop_token_ids=eos)
        )
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        g = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))
        xm = xgr.GrammarMatcher(g)
        compile_s = time.perf_counter() - t0
        bm, per = xgr.allocate_token_bitmask(1, V), []
        for t in ids:
            t0 = time.perf_counter()
            xm.fill_next_token_bitmask(bm)
            assert xm.accept_token(t)
            per.append(time.perf_counter() - t0)
        row("xgrammar", build, compile_s, per)
    if importlib.util.find_spec("outlines_core"):
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema

        t0 = time.perf_counter()
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab):
            if i not in tok.special_ids:
                by_bytes.setdefault(b, []).append(i)
        voc = oc.Vocabulary(eos[0], by_bytes)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        guide = oc.Guide(oc.Index(build_regex_from_schema(json.dumps(SCHEMA)), voc))
        compile_s = time.perf_counter() - t0
        per = []
        for t in ids:
            t0 = time.perf_counter()
            guide.write_mask_into(mask.data_ptr(), mask.numel(), 4)
            guide.advance(t, return_tokens=False)
            per.append(time.perf_counter() - t0)
        row("outlines-core", build, compile_s, per)
        t0 = time.perf_counter()
        oc.Index(build_regex_from_schema(json.dumps({"type": "object"})), voc)
        print(
            f"\noutlines-core index for any JSON object (response_format json_object): {time.perf_counter() - t0:.1f} s"
        )


if __name__ == "__main__":
    main()
