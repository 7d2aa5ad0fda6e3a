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

JSON is generated compactly with the usual separators (", " and ": ", as `json.dumps` writes them) and no
other whitespace: small models otherwise fill the room between tokens with newlines until max_tokens.
"""

from __future__ import annotations

import json
import logging
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
    build) is made on first use."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self._ll: Any = None
        self._executor: Any = None

    @property
    def ll_tokenizer(self) -> Any:
        if self._ll is None:
            if self.tokenizer is None:
                raise GrammarError("constrained decoding needs the model's tokenizer; this model has none")
            self._ll = build_ll_tokenizer(self.tokenizer, self.vocab_size, self.eos_ids)
        return self._ll

    def compile(self, params: Any) -> str | None:
        """The validated grammar of `params` (None when unconstrained); raises GrammarError with the reason."""
        text = grammar_text(params)
        if text is None:
            return None
        err = _llg().LLMatcher.validate_grammar(text, self.ll_tokenizer)
        if err:
            raise GrammarError(f"the {_kind(params)} cannot be compiled: {err.strip()}")
        return text

    def constraint(self, params: Any) -> Constraint | None:
        text = self.compile(params)
        if text is None:
            return None
        m = _llg().LLMatcher(self.ll_tokenizer, text, log_level=0)
        if m.is_error():
            raise GrammarError(f"the {_kind(params)} cannot be compiled: {m.get_error()}")
        return Constraint(m)

    def fill_bitmask(self, constraints: Sequence[Constraint]) -> torch.Tensor:
        """[len(constraints), ceil(V / 32)] int32 on the host: bit t of row i set = token t allowed."""
        mask = torch.full((len(constraints), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        if len(constraints) == 1:
            row = mask[0]
            constraints[0].matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
        else:  # llguidance's thread pool computes the rows in parallel
            if self._executor is None:
                self._executor = _llg().LLExecutor()
            pairs = [(c.matcher, i) for i, c in enumerate(constraints)]
            self._executor.unsafe_compute_mask_ptr(pairs, mask.data_ptr(), mask.shape[1] * 4, len(pairs))
        return mask


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
