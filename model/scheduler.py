"""Admission, ordering and the token budget of each step. Pure: no torch, no I/O, testable with
fake sequences (the block bookkeeping is ``model.blocks.BlockManager``, pure as well).

A sequence moves WAITING -> RUNNING -> FINISHED (and back to WAITING when preempted). Every step
is one forward over: one token of each running sequence that decodes (never starved), then
prefill chunks of the running sequences still prefilling, then the first chunks of waiting
sequences admitted in order, under the step's token budget (``max_batch_tokens``, less where
``StepBudget`` finds the steps slow) and while the batch has fewer than
``max_batch_size`` sequences and the pool has blocks for them. A request whose prefix blocks are
in the pool takes references to them and prefills only the rest. When a decoding sequence needs
a block and none is free, the most recently admitted sequence is preempted: its blocks go back
(full ones stay cached under their hashes) and it waits first in line to be computed again.
Requests beyond the batch wait in a FIFO bounded by ``max_queue``; past it, ``can_accept`` says
no and the server answers 429 at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from model.blocks import BlockManager


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Schedulable(Protocol):
    status: SeqStatus
    is_aborted: bool
    token_ids: list[int]
    num_computed: int  # positions whose KV is in the pool
    num_cached: int  # positions whose KV was restored from the store (loaded on admission)
    prefix_from: int  # the restored KV starts here; the positions before are expected in the pool
    block_table: list[int]
    block_hashes: list[str]  # store hashes of the full blocks known so far
    match_prefix: bool  # whether pool blocks may stand in for computed positions
    is_beam: bool


@dataclass
class Schedule:
    """One step: ``chunks`` are (sequence, start, end): positions ``[start, end)`` run through the
    forward (a decode token is a chunk of one); the forward samples where ``end`` is the
    sequence's length. ``copies`` are copy-on-write block copies to make first; ``admitted`` are
    the sequences that joined, with how many positions the pool held for them already (their
    restored KV, if any, goes into their blocks from there on)."""

    chunks: list[tuple[Schedulable, int, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    admitted: list[tuple[Schedulable, int]] = field(default_factory=list)
    beams: list[Schedulable] = field(default_factory=list)
    preempted: list[Schedulable] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(end - start for _, start, end in self.chunks)


class StepBudget:
    """Tokens a step may carry so that it takes about ``target`` seconds, from the cost per token of
    the recent steps that carried prefill chunks (a decoding row waits one whole step per token, so
    this bounds the gap a joining prompt adds, on a slow CPU as on a fast one); never more than
    ``cap``, never fewer than ``floor``. ``target`` 0: always ``cap``."""

    MIN_PREFILL = 32  # steps with fewer prefill tokens are mostly the weights' read, not a cost per token
    WEIGHT = 0.25  # of each new step in the running estimate

    def __init__(self, target: float, cap: int, floor: int) -> None:
        self.target, self.cap, self.floor = target, cap, min(floor, cap)
        self.per_token: float | None = None  # seconds

    def observe(self, sched: Schedule, seconds: float) -> None:
        tokens = sched.num_tokens
        if tokens - sum(1 for _, a, b in sched.chunks if b - a == 1) >= self.MIN_PREFILL and seconds > 0:
            rate = seconds / tokens
            self.per_token = rate if self.per_token is None else (1 - self.WEIGHT) * self.per_token + self.WEIGHT * rate

    def tokens(self) -> int:
        if not self.target or self.per_token is None:
            return self.cap
        return max(self.floor, min(self.cap, int(self.target / self.per_token)))


class Scheduler:
    def __init__(self, max_batch_size: int, max_queue: int, blocks: BlockManager,
                 max_batch_tokens: int = 256, prefill_chunk: int = 512) -> None:
        if max_batch_size < 1 or max_queue < 0 or max_batch_tokens < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_size, max_batch_tokens, prefill_chunk >= 1 and max_queue >= 0")
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_batch_tokens = max(max_batch_tokens, max_batch_size)  # a full batch's decode tokens
        self.step_tokens = self.max_batch_tokens  # this step's budget (``StepBudget``), at most the above
        self.prefill_chunk = prefill_chunk
        self.blocks = blocks
        self.waiting: deque[Schedulable] = deque()
        self.running: list[Schedulable] = []

    # -- counts ----------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def can_accept(self, num_in_flight: int) -> bool:
        """Whether one more request fits: a batch slot or a queue place is free.

        ``num_in_flight`` counts every accepted, unfinished request (it is tracked by the caller,
        because requests are accepted on another thread before they reach the scheduler).
        """
        return num_in_flight < self.max_batch_size + self.max_queue

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- transitions -----------------------------------------------------------------------
    def add(self, seq: Schedulable, first: bool = False) -> None:
        """Queue ``seq``; ``first``: ahead of the others (a request admitted earlier goes on)."""
        seq.status = SeqStatus.WAITING
        if first:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def start_running(self, seq: Schedulable) -> None:
        """``seq`` (holding its blocks already: a forked choice) joins the running batch."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Schedulable) -> None:
        """Remove ``seq`` from wherever it is and give back its blocks."""
        if seq.status is SeqStatus.RUNNING:
            if seq in self.running:  # a beam search runs outside the batch
                self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self._free(seq)
        seq.status = SeqStatus.FINISHED

    def _free(self, seq: Schedulable) -> None:
        self.blocks.release(seq.block_table)
        seq.block_table = []

    def preempt(self, seq: Schedulable) -> None:
        """Take ``seq`` out of the batch; it waits first in line and is computed again."""
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed = 0
        seq.num_cached = 0  # its restored KV is in the pool's cached blocks now, or gone
        self.add(seq, first=True)

    # -- the step --------------------------------------------------------------------------
    def schedule(self) -> Schedule:
        """The next step's chunks (see ``Schedule``)."""
        out = self._schedule()
        while not out.chunks and not out.beams and len(self.running) > 1:
            # Prefills holding blocks, none able to go on: the latest gives its blocks back.
            victim = self.running[-1]
            self.preempt(victim)
            again = self._schedule()
            again.preempted[:0] = [*out.preempted, victim]
            again.copies[:0], again.admitted[:0] = out.copies, out.admitted
            out = again
        return out

    def _schedule(self) -> Schedule:
        out = Schedule()
        budget = max(min(self.step_tokens, self.max_batch_tokens), self.max_batch_size)
        for seq in self._decoding(out):
            out.chunks.append((seq, seq.num_computed, seq.num_computed + 1))
            budget -= 1
        for seq in self.running:
            n, total = seq.num_computed, len(seq.token_ids)
            k = min(total - n, budget, self.prefill_chunk)
            if total - n > 1 and k > 0 and self.blocks.may_append(seq.block_table, n, n + k):
                out.copies += self.blocks.append(seq.block_table, n, n + k)
                out.chunks.append((seq, n, n + k))
                budget -= k
        while self.waiting and self.waiting[0].is_aborted:
            self.waiting.popleft().status = SeqStatus.FINISHED
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if seq.is_aborted:
                self.waiting.popleft().status = SeqStatus.FINISHED
                continue
            if seq.is_beam:  # runs outside the batch, at once
                out.beams.append(self.waiting.popleft())
                seq.status = SeqStatus.RUNNING
                continue
            k = self._admit(seq, budget, out)
            if not k:
                break
            self.waiting.popleft()
            self.running.append(seq)
            seq.status = SeqStatus.RUNNING
            budget -= k
        return out

    def _decoding(self, out: Schedule) -> list[Schedulable]:
        """The running sequences that decode this step, each given a block for its next position:
        where the pool has none, the latest admitted sequence is preempted until it does."""
        decoding = []
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or len(seq.token_ids) - seq.num_computed != 1:
                continue
            n = seq.num_computed
            while not self.blocks.may_append(seq.block_table, n, n + 1) and self.running[-1] is not seq:
                victim = self.running[-1]
                self.preempt(victim)
                out.preempted.append(victim)
                if victim in decoding:
                    decoding.remove(victim)
            if not self.blocks.may_append(seq.block_table, n, n + 1):
                self.preempt(seq)  # alone and still no block: it waits for one
                out.preempted.append(seq)
                continue
            out.copies += self.blocks.append(seq.block_table, n, n + 1)
            decoding.append(seq)
        return decoding

    def _admit(self, seq: Schedulable, budget: int, out: Schedule) -> int:
        """Give waiting ``seq`` its blocks and first chunk; 0 when the pool cannot hold it yet."""
        total = len(seq.token_ids)
        if seq.block_table:  # a forked choice: it holds the prompt's blocks already
            ready = seq.num_computed
        else:
            b = self.blocks.block_size
            matched = self.blocks.match(seq.block_hashes[: (total - 1) // b]) if seq.match_prefix else []
            seq.block_table = self.blocks.take(matched)
            if seq.prefix_from > len(matched) * b:
                seq.num_cached = 0  # the pool lost blocks before the restored KV: compute them
            ready = max(len(matched) * b, seq.num_cached)
            out.admitted.append((seq, len(matched) * b))
        k = min(total - ready, budget, self.prefill_chunk)
        if not self.blocks.may_append(seq.block_table, ready, ready + k):
            if not seq.num_computed:  # not a fork: give the matched blocks back for now
                self._free(seq)
                out.admitted.pop()
            return 0
        seq.num_computed = ready
        out.copies += self.blocks.append(seq.block_table, ready, ready + k)
        out.chunks.append((seq, ready, ready + k))
        return k
