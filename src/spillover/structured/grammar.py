"""Grammar-constrained decoding with llguidance: a constraint in `SamplingParams` becomes a token mask.

A request's constraint (`json_schema`, `regex`, `choice` or a Lark `grammar`) is compiled into one
`llguidance.LLMatcher` per sequence. Before each step that samples the sequence, the runner asks the matcher
for the tokens allowed next (a bitmask, one bit per vocabulary id: `fill_bitmask`), the sampler sets every
other logit to -inf (`engine.sampler.apply_token_bitmask`), and the engine feeds the drawn token back
(`Constraint.advance`). EOS is allowed only where the grammar is complete, and is the only token allowed
once nothing else can follow.

Why llguidance (measured on SmolLM2's 49152-token vocabulary, `python benchmarks/grammar_engines.py`):
it needs nothing but its own abi3 wheel (one wheel for every Python >= 3.9), compiles a JSON schema in
about a millisecond (lazy Earley parser + derivative lexer, no index over the vocabulary up front), and
computes a mask in tens of microseconds. xgrammar masks faster (a few microseconds) but depends on torch,
transformers and triton at run time; outlines-core builds a regex index over the whole vocabulary per
schema (tens of ms for a small schema, ~10 s for "any JSON object", which a regex can only approximate).

Per step, the masks of all constrained rows are filled in one call into one [rows, ceil(V / 32)] int32
tensor by llguidance's thread pool (`LLExecutor`: Rust threads, the GIL released, one per usable CPU), in
pinned memory on a GPU (a truly asynchronous copy). The host's cores must be free meanwhile: a CPU
torch op over more than 32k elements (e.g. `torch.full` of 32 mask rows) leaves torch's OpenMP threads
spinning for milliseconds, which took the cores from the mask threads (`benchmarks/structured.py
--mask-check`; notes in benchmarks/RESULTS-structured.md). Every request gets its own `LLMatcher`: a matcher's
`deep_copy()` shares the lexer, and its lock, with the original, so copies of one compiled matcher compute
their masks one at a time. What is cached (the last 64 grammar texts) is the validation.

JSON is generated compactly with the usual separators (", " and ": ", as `json.dumps` writes them) and no
other whitespace: small models otherwise fill the room between tokens with newlines until max_tokens.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from spillover.errors import GrammarError

log = logging.getLogger(__name__)

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llg() -> Any:
    import llguidance

    return llguidance


def json_schema_grammar(schema: dict[str, Any] | str | bool) -> str:
    """llguidance grammar text for a JSON schema (a dict, its JSON text, or True for any JSON value)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError(f"json_schema is not valid JSON: {e}") from None
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError(f"json_schema must be a JSON object (a dict), got {type(schema).__name__}")
    try:
        return _llg().LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except Exception as e:  # llguidance raises ValueError, TypeError, ...: all mean the schema is unusable
        raise GrammarError(f"json_schema cannot be used: {e}") from None


def grammar_text(params: Any) -> str | None:
    """The llguidance grammar of a request's constraint (None when unconstrained). Not yet validated."""
    llg = _llg()
    if params.json_schema is not None:
        return json_schema_grammar(params.json_schema)
    if params.regex is not None:
        return llg.LLMatcher.grammar_from_regex(params.regex)
    if params.choice is not None:
        alts = " | ".join(json.dumps(c) for c in params.choice)  # JSON string literals are Lark literals
        return llg.LLMatcher.grammar_from_lark(f"start: {alts}\n")
    if params.grammar is not None:
        return llg.LLMatcher.grammar_from_lark(params.grammar)
    return None


class Constraint:
    """One sequence's grammar state."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.ahead = 0  # tokens taken early (by the runner, from a step still in flight) not yet applied

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):  # the mask makes this unreachable; keep the reason
            log.warning("a constrained sequence left its grammar: %s", self.matcher.get_error())

    def take_early(self, token: int, eos: bool) -> None:
        """The runner takes a token of the step still in flight, to compute the next step's mask now."""
        if not eos:
            self.advance(token)
        self.ahead += 1

    def apply(self, token: int, eos: bool) -> None:
        """The engine applies a drawn token: the grammar takes it unless the runner already did."""
        if self.ahead:
            self.ahead -= 1
        elif not eos:
            self.advance(token)

    @property
    def done(self) -> bool:
        """Only EOS may follow (the grammar is complete and admits nothing more)."""
        return self.matcher.is_stopped()


class Grammars:
    """Compiles constraints for one tokenizer. The llguidance tokenizer (the vocabulary as bytes, ~0.1 s to
    build) is made on first use. Thread-safe: the server validates request grammars on its own thread.
    `threads`: the mask fill's thread pool (default: every CPU this process may use, at most 32)."""

    CACHED = 64  # validated grammar texts kept (a service usually sends the same few schemas over and over)

    def __init__(
        self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int], threads: int | None = None
    ) -> None:
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self.threads = threads or min(32, _usable_cpus())
        self._ll: Any = None
        self._executor: Any = None
        self._valid: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll is None:
                if self.tokenizer is None:
                    raise GrammarError(
                        "constrained decoding needs the model's tokenizer; this model has none"
                    )
                self._ll = build_ll_tokenizer(self.tokenizer, self.vocab_size, self.eos_ids)
            return self._ll

    def compile(self, params: Any) -> str | None:
        """The validated grammar of `params` (None when unconstrained); raises GrammarError with the reason."""
        text = grammar_text(params)
        if text is None:
            return None
        with self._lock:
            if text in self._valid:
                self._valid.move_to_end(text)
                return text
        err = _llg().LLMatcher.validate_grammar(text, self.ll_tokenizer)
        if err:
            raise GrammarError(f"the {_kind(params)} cannot be compiled: {err.strip()}")
        with self._lock:
            self._valid[text] = None
            while len(self._valid) > self.CACHED:
                self._valid.popitem(last=False)
        return text

    def constraint(self, params: Any) -> Constraint | None:
        text = self.compile(params)
        if text is None:
            return None
        m = _llg().LLMatcher(self.ll_tokenizer, text, log_level=0)  # its own lexer: see the module doc
        if m.is_error():
            raise GrammarError(f"the {_kind(params)} cannot be compiled: {m.get_error()}")
        return Constraint(m)

    def fill_bitmask(self, constraints: Sequence[Constraint], pin: bool = False) -> torch.Tensor:
        """[len(constraints), ceil(V / 32)] int32 on the host: bit t of row i set = token t allowed. All
        rows in one call, in parallel on llguidance's threads. `pin`: in pinned memory (for a GPU's copy)."""
        shape = (len(constraints), (self.vocab_size + 31) // 32)
        # empty, not full: llguidance writes every word, and filling 32 rows (49k elements) runs on torch's
        # OpenMP threads, which then spin for milliseconds on every core the mask threads need
        mask = torch.empty(shape, dtype=torch.int32, pin_memory=pin)
        if len(constraints) == 1:
            row = mask[0]
            constraints[0].matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
        else:
            if self._executor is None:
                self._executor = _llg().LLExecutor(self.threads)
            pairs = [(c.matcher, i) for i, c in enumerate(constraints)]
            self._executor.unsafe_compute_mask_ptr(pairs, mask.data_ptr(), mask.shape[1] * 4, len(pairs))
        return mask


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity on Linux; all of them elsewhere)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def _kind(params: Any) -> str:
    for name in ("json_schema", "regex", "choice", "grammar"):
        if getattr(params, name) is not None:
            return name
    return "constraint"


def build_ll_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> Any:
    """An `llguidance.LLTokenizer` from spillover's tokenizer: every id's bytes (byte-level BPE and
    SentencePiece alike, via server.tokens.TokenTexts), the special ids (never produced by grammar text),
    and the ids that end a sequence. Ids past the tokenizer's vocabulary (padded embeddings) get no bytes."""
    from spillover.server.tokens import TokenTexts

    llg = _llg()
    texts = TokenTexts(tokenizer)
    n = tokenizer.vocab_size

    class _Vocab:  # what llguidance.TokenizerWrapper reads
        def __init__(self) -> None:
            self.eos_token_id = eos_ids[0] if eos_ids else None
            self.bos_token_id = tokenizer.bos_token_id
            self.tokens = [texts.bytes_of(i) if i < n else b"" for i in range(max(n, vocab_size))]
            self.special_token_ids = sorted(tokenizer.special_ids)

        def __call__(self, s: str) -> list[int]:
            return tokenizer.encode(s, add_special_tokens=False)

    return llg.LLTokenizer(llg.TokenizerWrapper(_Vocab()), n_vocab=vocab_size, eos_token=list(eos_ids))
