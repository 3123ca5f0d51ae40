"""How a scheduled sequence becomes the runner's input, and when a new token ends it.

Pure functions of a sequence (and the model's limits): the engine calls them
around each forward pass; they change nothing.
"""

from __future__ import annotations

from kvengine.engine.request import Sequence
from kvengine.engine.runner import StepInput
from kvengine.models import LoadedModel


def step_input(seq: Sequence, num_tokens: int, prefix_cache: bool) -> StepInput:
    """The next `num_tokens` tokens of `seq` for the runner, with its press if they complete its context.

    Sliding-window layers release what no later query sees, unless the prefix cache takes the
    sequence's blocks (every cell's, from the first token), the context is kept for later
    presses, or a decoding-time press keeps its own per-head budget.
    """
    assert seq.kv is not None
    ids = seq.token_ids[seq.num_computed : seq.num_computed + num_tokens]
    compress = seq.awaits_compression and seq.num_computed + num_tokens == seq.context_len
    return StepInput(
        seq.kv,
        ids,
        seq.num_computed,
        seq.press if compress else None,
        keep_queries=seq.keep_queries or seq.decode_press is not None,
        seal=not seq.keep_queries,
        all_logits=seq.params.prompt_logprobs is not None and seq.is_prefilling,
        free_outside_window=not (
            seq.keep_queries or seq.decode_press is not None or (prefix_cache and seq.is_plain)
        ),
    )


def stop_reason(seq: Sequence, token: int, model: LoadedModel) -> str | None:
    """ "stop" (EOS, or its grammar complete), "length" (max_tokens or the model's context reached), or None."""
    if not seq.params.ignore_eos and token in model.eos_token_ids:
        return "stop"
    if seq.matcher is not None and seq.matcher.is_done:
        return "stop"
    if len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= model.max_context_len:
        return "length"
    return None
