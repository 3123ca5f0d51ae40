"""After a forward pass: advance each sequence, compress while decoding, sample, finish what stops.

`Postprocess` is the engine's last stage of a step (engine.py). It changes
sequences through the scheduler (`on_computed`, `finish`) and their own
fields (output tokens, log-probabilities, grammar matchers), and counts the
prefill tokens and compressions for the engine's stats. It never schedules
nor runs the model; it knows nothing of requests that are not in the step.
"""

from __future__ import annotations

import time

import torch

from kvengine.cache.paged import PagedKVCache
from kvengine.engine.constraints import constrain
from kvengine.engine.logprobs import Logprob, token_logprobs
from kvengine.engine.request import Sequence, TokenEvent
from kvengine.engine.runner import ModelRunner, StepInput
from kvengine.engine.sampler import sample
from kvengine.engine.scheduler import Scheduler
from kvengine.engine.step import stop_reason
from kvengine.errors import KVEngineError, StepError
from kvengine.models import LoadedModel
from kvengine.press.base import with_budget


class Postprocess:
    """Turns a step's logits into tokens and finished sequences, and counts what the step computed."""

    def __init__(
        self, model: LoadedModel, cache: PagedKVCache, runner: ModelRunner, scheduler: Scheduler
    ) -> None:
        self.model = model
        self.cache = cache
        self.runner = runner
        self.scheduler = scheduler
        self.num_prefill_tokens = 0  # prompt tokens computed by forward passes
        self.num_compressions = 0  # contexts a press compressed (kept contexts reused are not counted)
        self.num_compressed_bytes_saved = 0  # uncompressed minus held bytes, summed over compressions
        self.num_decode_compressions = 0

    def stats(self) -> dict[str, float]:
        return {
            "prefill_tokens_total": self.num_prefill_tokens,
            "compressions_total": self.num_compressions,
            "compression_bytes_saved_total": self.num_compressed_bytes_saved,
            "decode_compressions_total": self.num_decode_compressions,
        }

    def process(
        self,
        batch: list[tuple[Sequence, int]],
        inputs: list[StepInput],
        logits: torch.Tensor,
        errors: dict[int, KVEngineError],
    ) -> list[TokenEvent]:
        """Advance each sequence past its new tokens, then give a token to those ready for one.

        A sequence that fails here (non-finite logits) is finished, with its error in `errors`.
        """
        for (seq, n), item in zip(batch, inputs, strict=True):
            self._advance(seq, n, item)
        # Ready for a new token: every known token computed (a recomputed sequence
        # after preemption has its earlier outputs to compute again first).
        rows = [
            i for i, (seq, _) in enumerate(batch) if seq.num_computed == seq.num_tokens and not seq.is_context
        ]
        rows = self._drop_non_finite(batch, rows, logits, errors)
        scored = [batch[i][0] for i in rows if batch[i][0].params.max_tokens == 0]  # the prompt only
        rows = [i for i in rows if batch[i][0].params.max_tokens > 0]
        ready = [batch[i][0] for i in rows]
        for seq in ready:
            self._compress_while_decoding(seq)
        ready_logits = logits[rows]
        held = [(len(s.output_ids) < s.params.min_tokens, s.matcher) for s in ready]
        tokens = sample(
            constrain(ready_logits, held, self.model.eos_token_ids),
            [seq.params for seq in ready],
            [seq.generator for seq in ready],
            [(seq.prompt_ids, seq.output_ids) for seq in ready],
        )
        return self._end_scored(scored) + self._append_tokens(ready, tokens, ready_logits)

    def _drop_non_finite(
        self,
        batch: list[tuple[Sequence, int]],
        rows: list[int],
        logits: torch.Tensor,
        errors: dict[int, KVEngineError],
    ) -> list[int]:
        """`rows` whose logits are all finite; the sequences of the others fail (and only they)."""
        finite = torch.isfinite(logits[rows]).all(dim=-1).tolist()  # one host sync per step
        for i, ok in zip(rows, finite, strict=True):
            if not ok:
                seq = batch[i][0]
                self.scheduler.finish(seq, "error")
                errors[seq.seq_id] = StepError("the model produced non-finite logits (NaN or inf)")
        return [i for i, ok in zip(rows, finite, strict=True) if ok]

    def _advance(self, seq: Sequence, num_tokens: int, item: StepInput) -> None:
        """After a step: the scheduler advances `seq` (see `on_computed`); keep its queries, count a press."""
        self.num_prefill_tokens += min(num_tokens, max(0, len(seq.prompt_ids) - seq.num_computed))
        self.scheduler.on_computed(seq, num_tokens)
        seq.store_queries(item.queries)
        if item.logits is not None:
            seq.add_prompt_logprobs(item.start_pos, item.logits)
        if item.press is not None:  # the runner compressed its context after this forward
            assert seq.kv is not None
            self.num_compressions += 1
            uncompressed = self.cache.blocks_for_tokens(seq.context_len) * self.cache.pool.bytes_per_block
            self.num_compressed_bytes_saved += max(0, uncompressed - self.cache.bytes_held(seq.kv))

    def _compress_while_decoding(self, seq: Sequence) -> None:
        """Cut every head back to the decode budget once it has grown a block past it."""
        if seq.decode_press is None or seq.kv is None:
            return
        num_tokens = seq.kv.max_len
        if num_tokens <= seq.decode_budget + self.cache.block_size:
            return
        press = with_budget(seq.decode_press, num_tokens, seq.decode_budget)
        self.runner.compress(seq.kv, seq.queries, press, end_pos=seq.num_computed)
        self.num_decode_compressions += 1

    def _append_tokens(
        self, seqs: list[Sequence], tokens: list[int], logits: torch.Tensor
    ) -> list[TokenEvent]:
        """Give each sequence its sampled token (row i of `logits` gave seqs[i]'s); finish those that stop."""
        now = time.perf_counter()
        events = []
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            seq.output_ids.append(token)
            if seq.matcher is not None:
                seq.matcher.accept(token)
            seq.first_token_time = seq.first_token_time or now
            logprob = None
            if seq.params.logprobs is not None:
                logprob = token_logprobs(logits[i : i + 1], [token], seq.params.logprobs)[0]
                seq.output_logprobs.append(logprob)
            reason = stop_reason(seq, token, self.model)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            prompt = _prompt_logprobs(seq) if len(seq.output_ids) == 1 else None
            events.append(TokenEvent(seq.seq_id, token, reason is not None, reason, logprob, prompt))
        return events

    def _end_scored(self, seqs: list[Sequence]) -> list[TokenEvent]:
        """Finish requests that only score their prompt (`max_tokens=0`), now that it is computed."""
        for seq in seqs:
            self.scheduler.finish(seq, "length")
        return [TokenEvent(s.seq_id, None, True, "length", prompt_logprobs=_prompt_logprobs(s)) for s in seqs]


def _prompt_logprobs(seq: Sequence) -> list[Logprob | None] | None:
    return list(seq.prompt_logprobs) if seq.params.prompt_logprobs is not None else None
