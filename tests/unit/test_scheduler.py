"""The pure scheduler (model/scheduler.py) with fake sequences over a real block manager."""

import pytest

from model.blocks import BlockManager
from model.scheduler import Schedule, Scheduler, SeqStatus, StepBudget


class FakeSeq:
    def __init__(self, name, length=3, hashes=(), cached=0, beam=False):
        self.name = name
        self.status = None
        self.is_aborted = False
        self.token_ids = list(range(length))
        self.num_computed = 0
        self.num_cached = cached
        self.prefix_from = 0
        self.block_table = []
        self.block_hashes = list(hashes)
        self.match_prefix = True
        self.is_beam = beam

    def run(self, end):  # what the engine does after a step: computed, then a token sampled
        self.num_computed = end
        if end == len(self.token_ids):
            self.token_ids.append(0)


def sched(batch=4, queue=4, blocks=64, size=4, tokens=32, chunk=16):
    return Scheduler(batch, queue, BlockManager(blocks, size), tokens, chunk)


def names(out):
    return [(s.name, a, b) for s, a, b in out.chunks]


def step(s):
    out = s.schedule()
    for seq, _, end in out.chunks:
        seq.run(end)
    return out


def test_short_prompts_prefill_together_and_decode_rides_with_a_long_one():
    s = sched(tokens=20, chunk=16)
    a, b, c = FakeSeq("a", 3), FakeSeq("b", 5), FakeSeq("c", 40)
    for x in (a, b, c):
        s.add(x)
    assert names(step(s)) == [("a", 0, 3), ("b", 0, 5), ("c", 0, 12)]  # one forward, budget 20
    assert names(step(s)) == [("a", 3, 4), ("b", 5, 6), ("c", 12, 28)]  # decode tokens first
    assert names(step(s)) == [("a", 4, 5), ("b", 6, 7), ("c", 28, 40)]
    assert all(x.status is SeqStatus.RUNNING for x in (a, b, c))


def two_decoding_then_a_long_prompt(s, budget=None):
    """Rows a and b decode after one step; a 40-token prompt c then waits (the step budget set first)."""
    for x in (FakeSeq("a", 1), FakeSeq("b", 1)):
        s.add(x)
    step(s)
    if budget is not None:
        s.step_tokens = budget
    s.add(FakeSeq("c", 40))


def test_decode_is_never_starved_by_a_long_prefill():
    s = sched(batch=4, tokens=4, chunk=16)
    two_decoding_then_a_long_prompt(s)
    for i in range(3):
        assert names(step(s)) == [("a", 1 + i, 2 + i), ("b", 1 + i, 2 + i), ("c", 2 * i, 2 * i + 2)]


def test_the_budget_is_at_least_one_token_per_batch_slot():
    assert sched(batch=8, tokens=2).max_batch_tokens == 8


def test_a_slow_step_budget_gives_the_next_steps_fewer_prefill_tokens_and_decode_keeps_its_slots():
    s = sched(batch=4, tokens=40, chunk=64)
    two_decoding_then_a_long_prompt(s, budget=10)  # what StepBudget said after slow steps
    assert names(step(s)) == [("a", 1, 2), ("b", 1, 2), ("c", 0, 8)]
    s.step_tokens = 1  # never below one token per batch slot: decode rows keep theirs
    assert names(step(s)) == [("a", 2, 3), ("b", 2, 3), ("c", 8, 10)]


def chunks(decode: int, prefill: int) -> Schedule:
    rows = [(object(), i, i + 1) for i in range(decode)]
    return Schedule(chunks=rows + ([(object(), 0, prefill)] if prefill else []))


def test_step_budget_follows_the_cost_per_token_of_steps_that_prefill():
    budget = StepBudget(target=0.150, cap=256, floor=48)
    assert budget.tokens() == 256  # nothing measured yet
    budget.observe(chunks(16, 0), 0.050)  # decode only: the weights' read, says nothing per token
    budget.observe(chunks(16, 8), 0.060)  # too little prefill to tell
    assert budget.tokens() == 256
    budget.observe(chunks(16, 112), 0.160)  # 1.25 ms a token
    assert budget.tokens() == 120
    for _ in range(30):  # a CPU four times as fast: the cap
        budget.observe(chunks(16, 240), 0.080)
    assert budget.tokens() == 256
    for _ in range(30):  # very slow steps: never below the floor
        budget.observe(chunks(16, 112), 2.0)
    assert budget.tokens() == 48
    off = StepBudget(target=0, cap=256, floor=48)
    off.observe(chunks(16, 112), 2.0)
    assert off.tokens() == 256


def test_batch_bound_and_fifo_with_aborted_waiters_skipped():
    s = sched(batch=2)
    a, b, c, d = (FakeSeq(n) for n in "abcd")
    for x in (a, b, c, d):
        s.add(x)
    b.is_aborted = True
    step(s)
    assert s.running == [a, c] and b.status is SeqStatus.FINISHED and s.num_waiting == 1
    s.finish(a)
    step(s)
    assert s.running == [c, d]


def test_prefix_blocks_in_the_pool_are_shared_not_computed():
    s = sched(size=4)
    a = FakeSeq("a", 10, hashes=["h0", "h1"])
    s.add(a)
    step(s)
    for blk, h in zip(a.block_table, a.block_hashes):  # the engine names full blocks
        s.blocks.register(blk, h)
    b = FakeSeq("b", 10, hashes=["h0", "h1"])
    s.add(b)
    out = step(s)
    assert ("b", 8, 10) in names(out) and b.block_table[:2] == a.block_table[:2]
    assert out.admitted == [(b, 8)]
    s.finish(a)
    s.finish(b)
    assert s.blocks.num_cached == 2 and s.blocks.num_used == 0
    c = FakeSeq("c", 8, hashes=["h0", "h1"])  # the last position is always computed
    s.add(c)
    assert names(step(s)) == [("c", 4, 8)]


def test_restored_prefix_is_loaded_not_computed():
    s = sched(size=4)
    a = FakeSeq("a", 10, cached=9)
    s.add(a)
    out = step(s)
    assert names(out) == [("a", 9, 10)] and out.admitted == [(a, 0)] and len(a.block_table) == 3


def test_a_decode_without_a_free_block_preempts_the_latest_sequence():
    s = sched(batch=4, blocks=3, size=2, tokens=32)
    a, b = FakeSeq("a", 3), FakeSeq("b", 2)
    s.add(a)
    s.add(b)
    step(s)  # a: 2 blocks (positions 0..2), b: 1 block
    assert s.blocks.num_free == 0
    step(s)  # a writes position 3 (its block 1), b position 2: no block left -> b is preempted
    assert s.running == [a] and b.status is SeqStatus.WAITING and b.block_table == [] and b.num_computed == 0
    s.finish(a)
    out = step(s)
    assert names(out) == [("b", 0, 3)]  # computed again, with the token it had generated


def test_prefills_that_cannot_go_on_give_way():
    s = sched(batch=4, blocks=6, size=2, tokens=8, chunk=4)
    a, b = FakeSeq("a", 10), FakeSeq("b", 10)
    s.add(a)
    s.add(b)
    assert names(step(s)) == [("a", 0, 4), ("b", 0, 4)]
    assert names(step(s)) == [("a", 4, 8)]  # b finds no block
    out = step(s)  # neither can go on: b, the latest, gives its blocks back
    assert names(out) == [("a", 8, 10)] and out.preempted == [b] and b.status is SeqStatus.WAITING


def test_beam_requests_leave_the_queue_to_run_outside_the_batch():
    s = sched()
    a = FakeSeq("a", beam=True)
    s.add(a)
    out = s.schedule()
    assert out.beams == [a] and out.chunks == [] and a.status is SeqStatus.RUNNING


def test_can_accept_counts_batch_plus_queue():
    s = sched(batch=2, queue=2)
    assert s.can_accept(3) and not s.can_accept(4)


def test_finish_from_any_state_gives_blocks_back():
    s = sched(batch=2)
    a, b = FakeSeq("a"), FakeSeq("b")
    s.add(a)
    s.add(b)
    s.finish(b)  # waiting
    assert s.num_waiting == 1 and b.status is SeqStatus.FINISHED
    step(s)
    assert s.blocks.num_used == 1
    s.finish(a)  # running
    assert not s.has_work() and s.blocks.num_used == 0


def test_invalid_limits_refused():
    with pytest.raises(ValueError):
        Scheduler(0, 1, BlockManager(1, 1))


def test_add_first_goes_ahead_of_the_queue():
    s = sched(batch=1)
    a, b, c = FakeSeq("a"), FakeSeq("b"), FakeSeq("c")
    s.add(a)
    s.add(b)
    s.add(c, first=True)  # a choice whose prompt was prefilled already: it was admitted earlier
    assert [x.name for x in s.waiting] == ["c", "a", "b"] and c.status is SeqStatus.WAITING
