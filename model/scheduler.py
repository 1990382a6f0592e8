"""Admission and ordering of sequences. Pure: no torch, no I/O, testable with fake sequences.

A sequence moves WAITING -> PREFILLING -> RUNNING -> FINISHED. At most one sequence prefills at a
time (in chunks, between decode steps), and prefilling + running never exceed ``max_batch_size``.
Requests beyond the batch wait in a FIFO bounded by ``max_queue``; past it, ``can_accept`` says no
and the server answers 429 at once.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Protocol


class SeqStatus(Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    FINISHED = "finished"


class Schedulable(Protocol):
    status: SeqStatus
    is_aborted: bool


class Scheduler:
    def __init__(self, max_batch_size: int, max_queue: int) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.waiting: deque[Schedulable] = deque()
        self.prefilling: Schedulable | None = None
        self.running: list[Schedulable] = []

    # -- counts ----------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running) + (self.prefilling is not None)

    def can_accept(self, num_in_flight: int) -> bool:
        """Whether one more request fits: a batch slot or a queue place is free.

        ``num_in_flight`` counts every accepted, unfinished request (it is tracked by the caller,
        because requests are accepted on another thread before they reach the scheduler).
        """
        return num_in_flight < self.max_batch_size + self.max_queue

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    # -- transitions -----------------------------------------------------------------------
    def add(self, seq: Schedulable, first: bool = False) -> None:
        """Queue ``seq``; ``first``: ahead of the others (a request admitted earlier goes on)."""
        seq.status = SeqStatus.WAITING
        if first:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def schedule(self) -> Schedulable | None:
        """The sequence to run a prefill chunk of now: the one prefilling, else the oldest waiting
        if a batch slot is free (it becomes PREFILLING). The running batch is ``running``."""
        if self.prefilling is not None:
            return self.prefilling
        while self.waiting and self.waiting[0].is_aborted:
            self.waiting.popleft().status = SeqStatus.FINISHED
        if self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting.popleft()
            seq.status = SeqStatus.PREFILLING
            self.prefilling = seq
            return seq
        return None

    def start_running(self, seq: Schedulable) -> None:
        """The prefilled sequence joins the running batch."""
        if self.prefilling is seq:
            self.prefilling = None
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Schedulable) -> None:
        """Remove ``seq`` from wherever it is."""
        if self.prefilling is seq:
            self.prefilling = None
        elif seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.status = SeqStatus.FINISHED
