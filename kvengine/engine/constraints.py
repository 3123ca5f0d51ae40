"""What a request's next token may be, beyond sampling: `min_tokens` and grammars (structured output).

`constrain` masks a step's logits before sampling: a sequence with fewer
than `min_tokens` output tokens cannot end (its EOS tokens are masked), and
a sequence with a grammar can only take tokens its grammar allows. Grammars
are JSON schemas (OpenAI's `response_format`), compiled and matched by
llguidance (an optional dependency, in the `server` extra): `Grammars`
converts the model's tokenizer once, and gives each sequence its own
`GrammarMatcher`, which the engine advances with every token the sequence
takes. Log-probabilities stay the model's own: they are read from the
unmasked logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from kvengine.errors import InvalidRequestError


@dataclass(frozen=True)
class Grammar:
    """A JSON schema that every output must match; `json_schema` is its JSON text.

    `Grammar.json_object()` is OpenAI's `{"type": "json_object"}`: any JSON object.
    """

    json_schema: str

    def __post_init__(self) -> None:
        try:
            schema = json.loads(self.json_schema)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise InvalidRequestError("a JSON schema must be a JSON object")

    @classmethod
    def from_schema(cls, schema: dict[str, Any]) -> Grammar:
        return cls(json.dumps(schema, sort_keys=True))

    @classmethod
    def json_object(cls) -> Grammar:
        return cls.from_schema({"type": "object"})


class GrammarMatcher:
    """One sequence's place in its grammar: the tokens allowed next, advanced token by token."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        import llguidance.torch as llt

        self._llt = llt
        self.matcher = matcher
        self.bitmask = llt.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits `(V,)` of tokens the grammar does not allow next to -inf, in place."""
        self._llt.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        # Bit j of word i allows token 32 * i + j. Unpacked here rather than with llguidance's own
        # apply function, which is torch.compile'd (a compiler run on first use, on a CPU too).
        bits = (self.bitmask[0, :, None] >> _BIT_SHIFTS) & 1
        allowed = bits.flatten()[: logits.shape[-1]].bool()
        logits.masked_fill_(~allowed.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        """Advance past `token` (one the mask allowed; an EOS token ends the grammar)."""
        self.matcher.consume_token(token)

    @property
    def is_done(self) -> bool:
        """True once no token can follow: the output is complete."""
        return bool(self.matcher.is_stopped())


_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)


# One layout for every output, so that a model cannot pad it with whitespace until max_tokens
# (a schema's own "x-guidance" options override it).
_JSON_STYLE: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Grammars:
    """Compiles grammars for one model's tokenizer (converted once, on first use)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lltok: Any = None

    def matcher(self, grammar: Grammar) -> GrammarMatcher:
        """A fresh matcher at the start of `grammar`; InvalidRequestError if it cannot be used."""
        try:
            import llguidance
            import llguidance.hf
        except ImportError:
            raise InvalidRequestError(
                "structured output needs llguidance: pip install 'kvengine[server]'", param="grammar"
            ) from None
        if self.tokenizer is None:
            raise InvalidRequestError("structured output needs a model with a tokenizer")
        if self._lltok is None:
            try:
                self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
            except Exception as exc:
                raise InvalidRequestError(
                    f"structured output needs a Hugging Face fast tokenizer: {exc}", param="grammar"
                ) from None
        try:
            spec = llguidance.LLMatcher.grammar_from_json_schema(
                json.loads(grammar.json_schema), defaults=_JSON_STYLE
            )
            error = llguidance.LLMatcher.validate_grammar(spec, self._lltok)
        except Exception as exc:  # the compiler's own refusals of odd schemas
            error = str(exc) or type(exc).__name__
        if error:
            raise InvalidRequestError(f"the JSON schema cannot be used: {error}", param="grammar")
        return GrammarMatcher(llguidance.LLMatcher(self._lltok, spec), self.vocab_size)


def constrain(
    logits: torch.Tensor, rows: list[tuple[bool, GrammarMatcher | None]], eos_token_ids: tuple[int, ...]
) -> torch.Tensor:
    """`logits` `(N, V)` with what each row may not take next masked (a copy, if anything is).

    `rows[i]` is row i's (EOS held back: fewer outputs than `min_tokens`, its grammar's matcher or None).
    """
    out = logits
    for row, (hold_eos, matcher) in enumerate(rows):
        if not (hold_eos and eos_token_ids) and matcher is None:
            continue
        if out is logits:
            out = logits.clone()
        if matcher is not None:
            matcher.mask(out[row])
        if hold_eos and eos_token_ids:
            out[row, list(eos_token_ids)] = float("-inf")
    return out
