"""Postprocess: from a step's logits to what the client sees, and a sequence's retirement.

``postprocess`` samples one token per running sequence, detokenizes it, checks EOS, stop strings
and lengths, and emits the delta; a finished sequence is retired by ``finish``: it leaves the
batch, its new KV is copied out for ``on_finish`` (after its last token is emitted, so the client
does not wait for the copy) and the final delta is handed over with it. Owned by the model thread;
deltas leave through the two callables the engine gives it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from model.runner import KV, ModelRunner
from model.constraint import GrammarCompiler, fill_masks
from model.sampling import RowSpec, TokenLogprob, sample, with_request_extras
from model.scheduler import Scheduler, SeqStatus
from model.sequence import Sequence
from model.types import Delta, Finished

# emit(seq, delta): hand a delta to the request's consumer (thread-safe).
Emit = Callable[[Sequence, Delta], None]
# retire(seq, finished, final): give the retired sequence to its on_finish, then send ``final``.
Retire = Callable[[Sequence, Finished, Delta], None]
log = logging.getLogger("kvbento.engine")


def row_spec(seq: Sequence) -> RowSpec:
    """What the sampler needs for ``seq``'s next token."""
    p = seq.params
    seen = None
    if p.repetition_penalty != 1.0:
        if seq.seen_tensor is None or seq.seen_tensor.numel() != len(seq.seen_ids):
            seq.seen_tensor = torch.tensor(sorted(seq.seen_ids), dtype=torch.long)
        seen = seq.seen_tensor
    block = None
    done = seq.constraint is not None and seq.constraint.is_done  # only EOS is left: it must stay
    if seq.eos_tensor is not None and (p.ignore_eos or seq.num_generated < p.min_new_tokens) and not done:
        block = seq.eos_tensor
    spec = RowSpec(p.do_sample, p.temperature, p.top_k, p.top_p, p.repetition_penalty, seen, block,
                   seq.generator)
    return with_request_extras(spec, p, seq.token_ids, seq.num_base_tokens)


def append_token(seq: Sequence, token: int,
                 logprob: TokenLogprob | None = None) -> tuple[Delta | None, str | None]:
    """Record a generated token (and its logprob, when asked): detokenize, check stops.

    Returns:
        (the delta to emit or None, the finish reason or None).
    """
    p = seq.params
    seq.token_ids.append(token)
    seq.num_generated += 1
    if p.repetition_penalty != 1.0:
        seq.seen_ids.add(token)
    seq.pending_ids.append(token)
    if logprob is not None:  # rides with the token ids of the same delta
        seq.pending_logprobs = [*(seq.pending_logprobs or []), logprob]
    finish = None
    done = seq.constraint is not None and seq.constraint.is_done
    if token in seq.eos_ids and (not p.ignore_eos or done):
        finish = "stop"
    text = seq.detok.push(token)
    if seq.constraint is not None and not seq.constraint.accept(token, text):
        log.warning("request %s: the constraint refused token %d", seq.request_id, token)
    if seq.num_generated < p.min_new_tokens:  # vLLM's min_tokens: no stop string ends it before
        text, hit_stop = seq.held_text + text, False
        seq.held_text = ""
    else:
        text, hit_stop = _apply_stop(seq, text)
    if hit_stop:
        finish = "stop"
    elif finish is None and (seq.num_generated >= p.max_new_tokens or len(seq.token_ids) >= seq.max_context):
        finish = "length"
    if finish and not hit_stop:
        tail, _ = _apply_stop(seq, seq.detok.flush(), final=True)
        text += tail
    if not text and not finish:
        return None, None
    delta = Delta(text=text, token_ids=seq.pending_ids, logprobs=seq.pending_logprobs)
    seq.pending_ids = []
    seq.pending_logprobs = None
    return delta, finish


def _apply_stop(seq: Sequence, text: str, final: bool = False) -> tuple[str, bool]:
    """``text`` cut at the first stop string (True), else with any tail that may start one held back."""
    stops = seq.params.stop
    if not stops:
        return text, False
    buf = seq.held_text + text
    cut = min((i for i in (buf.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        seq.held_text = ""
        return buf[:cut], True
    if final:
        seq.held_text = ""
        return buf, False
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(buf)), 0, -1):
            if buf.endswith(s[:k]):
                keep = max(keep, k)
                break
    seq.held_text = buf[len(buf) - keep:] if keep else ""
    return buf[: len(buf) - keep], False


class Postprocessor:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, emit: Emit, retire: Retire,
                 grammars: GrammarCompiler | None = None) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.emit = emit
        self.retire = retire
        self.grammars = grammars

    def postprocess(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample the next token of each of ``seqs`` from its row of ``logits``; emit, retire."""
        specs = [row_spec(s) for s in seqs]
        logprobs: list[TokenLogprob | None] = []
        tokens = sample(logits, specs, logprobs, self._masks(seqs))
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            delta, finish = append_token(seq, token, logprob)
            if delta is not None and not finish:
                self.emit(seq, delta)
            if finish:
                self.finish(seq, finish, last=delta)
            elif seq.on_block is not None:
                self.hand_out_blocks(seq)

    def hand_out_blocks(self, seq: Sequence) -> None:
        """Give ``on_block`` each full block of ``seq`` whose KV is computed (positions
        ``[0, len(token_ids) - 1)``) and that it has not had yet."""
        b = seq.block_tokens
        while seq.block_from + b <= len(seq.token_ids) - 1:
            lo = seq.block_from
            keys, values = self.runner.extract(seq, lo, lo + b)
            seq.on_block(lo, seq.token_ids[: lo + b + 1], keys, values)
            seq.block_from = lo + b

    def _masks(self, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor] | None:
        """The token bitmasks of the constrained rows (None when no row is constrained)."""
        rows = [i for i, s in enumerate(seqs) if s.constraint is not None and s.constraint.is_active]
        if not rows:
            return None
        g = self.grammars
        return rows, fill_masks([seqs[i].constraint for i in rows], g.executor, g.mask_words)

    def append_beam(self, seq: Sequence, tokens: list[int]) -> tuple[Delta | None, str]:
        """Record a beam search's tokens up to the first stop; return (their delta, finish reason)."""
        delta, finish = None, None
        for token in tokens:
            d, finish = append_token(seq, token)
            if d is not None:
                delta = d if delta is None else Delta(delta.text + d.text, delta.token_ids + d.token_ids)
            if finish:
                break
        return delta, finish or "length"

    def finish(self, seq: Sequence, reason: str, *, last: Delta | None = None, error: str | None = None,
               kv: KV | None = None) -> None:
        """Retire ``seq``: out of the batch, its new KV (``kv``, else its blocks') to ``on_finish``.

        Args:
            last: the sequence's last delta, not yet emitted.
            kv: the KV of the whole sequence when it has no blocks (a beam search).
        """
        keep = seq.num_tokens_to_keep
        finished = Finished(seq.token_ids[:keep], max(0, keep - seq.num_base_tokens), reason, error=error)
        lo, hi = seq.kv_from, keep - 1
        if seq.on_finish is not None and error is None and hi >= lo:
            if kv is not None and kv[0]:
                keys, values = kv
                finished.keys = [k[:, lo:hi].cpu() for k in keys]
                finished.values = [v[:, lo:hi].cpu() for v in values]
            elif seq.block_table and seq.num_computed >= hi:
                if last is not None and (last.text or last.token_ids):
                    self.emit(seq, last)  # the client's token does not wait for the copy-out
                    last = None
                finished.keys, finished.values = self.runner.extract(seq, lo, hi)
            elif hi == lo:  # nothing new to store (a one-token sequence)
                finished.keys, finished.values = self.runner.empty_kv()
        seq.prefix = []
        self.scheduler.finish(seq)
        heirs = [s for s in seq.siblings if s.status is not SeqStatus.FINISHED]
        seq.siblings = []
        if heirs and error is None:  # it ended before its prefill was shared: the next choice prefills
            heirs[0].siblings = heirs[1:]
            self.scheduler.add(heirs[0], first=True)
        if last is not None and (last.text or last.token_ids):
            self.emit(seq, last)
        self.retire(seq, finished, Delta(finish_reason=reason, error=error))

    def abort(self, seq: Sequence, num_delivered: int | None) -> None:
        """Stop ``seq`` now; its record keeps the ``num_delivered`` generated tokens (None: all of
        them, for a stop asked while the client reads on — the tokens held back go out first)."""
        if seq.status is SeqStatus.FINISHED:
            return
        seq.is_aborted = True
        seq.num_delivered = num_delivered
        last = None
        if num_delivered is None and seq.pending_ids:
            tail, _ = _apply_stop(seq, seq.detok.flush(), final=True)
            last = Delta(text=tail, token_ids=seq.pending_ids, logprobs=seq.pending_logprobs)
            seq.pending_ids, seq.pending_logprobs = [], None
        self.finish(seq, "abort", last=last)

    def fail_all(self, message: str) -> None:
        """End every sequence with an error delta (their blocks are not read: they are suspect)."""
        seqs = list(self.scheduler.waiting) + list(self.scheduler.running)
        seqs += [sib for seq in seqs for sib in seq.siblings]
        for seq in seqs:
            self.finish(seq, "error", error=message)
