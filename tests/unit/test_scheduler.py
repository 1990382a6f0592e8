import pytest

from model.scheduler import Scheduler, SeqStatus


class FakeSeq:
    def __init__(self, name):
        self.name = name
        self.status = None
        self.is_aborted = False


def test_one_prefill_at_a_time_and_batch_bound():
    s = Scheduler(max_batch_size=2, max_queue=1)
    a, b, c = FakeSeq("a"), FakeSeq("b"), FakeSeq("c")
    for x in (a, b, c):
        s.add(x)
    assert s.schedule() is a and a.status is SeqStatus.PREFILLING
    assert s.schedule() is a  # still prefilling: no second prefill
    s.start_running(a)
    assert s.schedule() is b
    s.start_running(b)
    assert s.schedule() is None  # batch full, c waits
    assert s.num_waiting == 1 and s.num_running == 2
    s.finish(a)
    assert s.schedule() is c


def test_fifo_order_and_aborted_waiters_skipped():
    s = Scheduler(4, 4)
    a, b = FakeSeq("a"), FakeSeq("b")
    s.add(a)
    s.add(b)
    a.is_aborted = True
    assert s.schedule() is b
    assert a.status is SeqStatus.FINISHED


def test_can_accept_counts_batch_plus_queue():
    s = Scheduler(max_batch_size=2, max_queue=2)
    assert s.can_accept(3) and not s.can_accept(4)


def test_finish_from_any_state():
    s = Scheduler(2, 2)
    a, b = FakeSeq("a"), FakeSeq("b")
    s.add(a)
    s.add(b)
    s.finish(b)  # waiting
    assert s.num_waiting == 1 and b.status is SeqStatus.FINISHED
    s.schedule()
    s.finish(a)  # prefilling
    assert not s.has_work()


def test_invalid_limits_refused():
    with pytest.raises(ValueError):
        Scheduler(0, 1)


def test_add_first_goes_ahead_of_the_queue():
    s = Scheduler(1, 4)
    a, b, c = FakeSeq("a"), FakeSeq("b"), FakeSeq("c")
    s.add(a)
    s.add(b)
    s.add(c, first=True)  # a choice whose prompt was prefilled already: it was admitted earlier
    assert [x.name for x in s.waiting] == ["c", "a", "b"] and c.status is SeqStatus.WAITING
