"""Background jobs: work that runs without a client, survives its connection and its replica.

A job (a Responses-API ``background: true`` response) is a registry record in the store, a lease
and a list of events (``cache.jobs``). The replica holding the lease runs it; its events go to the
store in batches every ``poll_seconds``, one store call per tick for all of the replica's jobs
(the list's index is the event's sequence number), so any replica can replay them from any point
and follow the live ones (a follower on the running replica is woken by each write and takes the
written events from memory; elsewhere it reads the store every ``poll_seconds``). The lease is
renewed every third of its life; every replica scans the registry as often, and takes a job whose lease lapsed (its
runner died) and resumes it from the events and the KV stored so far (the job kind's ``resume``).
Cancelling marks the job in the store; its runner stops at once when the cancel reaches its own
replica, else when it looks for the marks (one store call for all of its jobs every ten ticks).

Each list ends with an ``{"end": status}`` item, which followers stop at. The kinds' own code
(what a job runs, how its events look) comes from above: this layer only moves events.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cache.base import BackendUnavailable
from cache.jobs import JobStore
from session.errors import StoreUnavailable

log = logging.getLogger("kvbento.background")


class BackgroundObserver:
    """Metrics hooks; ``event`` is queued, running, taken_over, cancelled or done."""

    def on_background(self, event: str) -> None: ...


@dataclass
class JobRun:
    """One runner's hold on a job: what it resumes from, and the events it adds."""

    tenant: str
    job_id: str
    job: dict[str, Any]
    history: list[dict[str, Any]]  # items already stored: {"e": event, "ids": token ids}
    token: str
    taken_over: bool = False
    is_cancelled: bool = False
    is_abandoned: bool = False  # lost the lease or the server is closing: write nothing more
    stop: Callable[[], None] | None = None  # set by the kind: end generation, keeping its tokens
    _pending: list[dict[str, Any]] = field(default_factory=list)
    # Set after each write, so followers on this replica read the store when there is news
    # rather than on a timer.
    written: asyncio.Event = field(default_factory=asyncio.Event)
    # Held while its events are written: never two writes at once (each is fenced on the last).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def num_events(self) -> int:
        """Events so far: the next one's sequence number."""
        return len(self.history) + len(self._pending)

    def emit(self, event: dict[str, Any], token_ids: list[int] | None = None) -> None:
        item = {"e": event, "ids": token_ids} if token_ids else {"e": event}
        self._pending.append(item)


Kind = Callable[[JobRun], Awaitable[str]]  # runs or resumes a job; returns its final status


class BackgroundRunner:
    """Runs this replica's background jobs and takes over those of dead replicas."""

    def __init__(self, jobs: JobStore, *, poll_seconds: float = 0.05,
                 observer: BackgroundObserver | None = None) -> None:
        self.jobs = jobs
        self.poll_seconds = poll_seconds
        self.observer = observer or BackgroundObserver()
        self.kinds: dict[str, Kind] = {}  # job kind -> its resume
        self._runs: dict[tuple[str, str], JobRun] = {}
        self._tasks: set[asyncio.Task] = set()
        self._watcher: asyncio.Task | None = None
        self._writer: asyncio.Task | None = None
        self._closing = False

    # -- starting --------------------------------------------------------------------------
    async def submit(self, tenant: str, job_id: str, job: dict[str, Any], work: Kind) -> JobRun:
        """Register a new job, take its lease and start ``work`` on it.

        Raises:
            StoreUnavailable: the store cannot answer (nothing runs).
        """
        self._ensure_watching()
        token = uuid.uuid4().hex
        try:
            # The lease first: a watcher that finds the registry record finds it held.
            if not await self.jobs.claim(tenant, job_id, token):
                raise StoreUnavailable("a fresh job's lease is held")  # ids are random: cannot happen
            await self.jobs.put_job(tenant, job_id, job)
        except BackendUnavailable:
            raise StoreUnavailable() from None
        run = JobRun(tenant, job_id, job, [], token)
        self.observer.on_background("queued")
        self._start(run, work)
        return run

    def _start(self, run: JobRun, work: Kind) -> None:
        self._runs[(run.tenant, run.job_id)] = run
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write_loop())
        task = asyncio.ensure_future(self._drive(run, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drive(self, run: JobRun, work: Kind) -> None:
        self.observer.on_background("running")
        keeper = asyncio.ensure_future(self._keep_lease(run))
        status = "failed"
        try:
            status = await work(run)
        except Exception:
            log.exception("background job %s failed", run.job_id)
        finally:
            keeper.cancel()
            if self._runs.get((run.tenant, run.job_id)) is run:
                del self._runs[(run.tenant, run.job_id)]
            await self._close_run(run, status)
            self.observer.on_background("cancelled" if run.is_cancelled else "done")

    async def _close_run(self, run: JobRun, status: str) -> None:
        """Write the last events and the end mark, forget the job, give the lease back."""
        try:
            if not run.is_abandoned:
                run._pending.append({"end": "cancelled" if run.is_cancelled else status})
                await self._flush(run)
                if not run.is_abandoned:
                    await self.jobs.delete_job(run.tenant, run.job_id)
            await self.jobs.release(run.tenant, run.job_id, run.token)
        except BackendUnavailable:
            log.warning("background job %s: the store is unavailable; it is resumed when it returns",
                        run.job_id)

    # -- while it runs ---------------------------------------------------------------------
    async def _flush(self, run: JobRun) -> None:
        """Write the run's pending events now (its last ones), after any write of them in flight."""
        async with run.lock:
            if run._pending and not run.is_abandoned:
                items = list(run._pending)
                self._written(run, items, await self.jobs.append_events(run.tenant, run.job_id,
                                                                        len(run.history), items))

    def _written(self, run: JobRun, items: list[dict[str, Any]], ok: bool) -> None:
        """Move written ``items`` from pending to history, or give up a run another replica took."""
        if not ok:
            log.warning("background job %s was taken over by another replica; stopping here", run.job_id)
            self._abandon(run)
            return
        run.history += items
        del run._pending[: len(items)]  # emit() went on appending while the write was in flight
        run.written.set()
        run.written = asyncio.Event()

    def _abandon(self, run: JobRun) -> None:
        run.is_abandoned = True
        if run.stop is not None:
            run.stop()

    async def _write_loop(self) -> None:
        """Every ``poll_seconds`` one store call writes the pending events of every job running
        here, and every tenth tick one more looks for their cancel marks; ends with the last job."""
        step = 0
        try:
            while self._runs and not self._closing:
                await asyncio.sleep(self.poll_seconds)
                step += 1
                try:
                    await self._flush_all()
                    if step % 10 == 0:
                        await self._look_for_cancels()
                except BackendUnavailable:
                    pass  # kept pending: written when the store answers again
                except Exception:
                    log.exception("background writer step failed")
        finally:
            self._writer = None

    async def _flush_all(self) -> None:
        # A run in its last write holds its lock: it is left to that write.
        runs = [r for r in self._runs.values() if r._pending and not r.is_abandoned and not r.lock.locked()]
        for r in runs:
            await r.lock.acquire()  # free, so taken at once
        try:
            batch = [(r, list(r._pending)) for r in runs]
            oks = await self.jobs.append_many([(r.tenant, r.job_id, len(r.history), items) for r, items in batch])
            for (r, items), ok in zip(batch, oks):
                self._written(r, items, ok)
        finally:
            for r in runs:
                r.lock.release()

    async def _look_for_cancels(self) -> None:
        runs = [r for r in self._runs.values() if not r.is_cancelled and not r.is_abandoned]
        marks = await self.jobs.cancelled_among([(r.tenant, r.job_id) for r in runs])
        for r, marked in zip(runs, marks):
            if marked:
                r.is_cancelled = True
                if r.stop is not None:
                    r.stop()

    async def _keep_lease(self, run: JobRun) -> None:
        loop = asyncio.get_running_loop()
        while True:
            last = loop.time()
            await asyncio.sleep(self.jobs.lease_seconds / 3)
            try:
                if not await self.jobs.renew(run.tenant, run.job_id, run.token):
                    log.warning("background job %s: lost its lease (%.2fs since the last renewal)",
                                run.job_id, loop.time() - last)
                    self._abandon(run)
                    return
            except BackendUnavailable:
                pass  # the lease may lapse; the fenced writes then tell who runs it

    # -- takeover --------------------------------------------------------------------------
    def _ensure_watching(self) -> None:
        if self._watcher is None and not self._closing:
            self._watcher = asyncio.ensure_future(self._watch())

    def start_watching(self) -> None:
        """Begin scanning for jobs whose runner died (call on the server's event loop)."""
        self._ensure_watching()

    async def _watch(self) -> None:
        while not self._closing:
            # Jittered, so replicas do not all scan at once.
            await asyncio.sleep(self.jobs.lease_seconds / 3 * random.uniform(0.8, 1.0))
            try:
                for tenant, job_id in await self.jobs.list_jobs():
                    if (tenant, job_id) not in self._runs and not self._closing:
                        await self._try_take(tenant, job_id)
            except BackendUnavailable:
                continue
            except Exception:
                log.exception("background watcher step failed")

    async def _try_take(self, tenant: str, job_id: str) -> None:
        token = uuid.uuid4().hex
        if not await self.jobs.claim(tenant, job_id, token):
            return  # its runner is alive
        job = await self.jobs.get_job(tenant, job_id)
        history = await self.jobs.read_all_events(tenant, job_id)
        kind = self.kinds.get((job or {}).get("kind"))
        if job is None or kind is None or (history and "end" in history[-1]):
            if job is not None and kind is not None:
                await self.jobs.delete_job(tenant, job_id)  # finished; only its registry was left
            await self.jobs.release(tenant, job_id, token)
            return
        log.info("taking over background job %s after %d events", job_id, len(history))
        self.observer.on_background("taken_over")
        run = JobRun(tenant, job_id, job, history, token, taken_over=True)
        run.is_cancelled = await self.jobs.is_cancelled(tenant, job_id)  # then it only ends it
        self._start(run, kind)

    # -- clients ---------------------------------------------------------------------------
    async def follow(self, tenant: str, job_id: str, after: int) -> AsyncIterator[dict[str, Any]]:
        """The job's events after sequence number ``after``, then the live ones until its end.

        Raises:
            StoreUnavailable: the store stopped answering.
        """
        try:
            async for event in self._follow(tenant, job_id, after):
                yield event
        except BackendUnavailable:
            raise StoreUnavailable() from None

    async def _follow(self, tenant: str, job_id: str, after: int) -> AsyncIterator[dict[str, Any]]:
        at = after + 1
        idle = 0.0
        while True:
            run = self._runs.get((tenant, job_id))
            written = run.written if run is not None else None  # before the read: no write missed
            if run is not None and at <= len(run.history):
                # It runs here: what it wrote to the store is also in its memory.
                items = run.history[at:at + 1000]
            else:
                items = await self.jobs.read_events(tenant, job_id, at)
            for item in items:
                if "end" in item:
                    return
                yield item["e"]
                at += 1
            if items:
                idle = 0.0
                continue
            if written is not None:  # it runs here: wait for its next write
                try:
                    await asyncio.wait_for(written.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
                continue
            await asyncio.sleep(self.poll_seconds)
            idle += self.poll_seconds
            if idle >= 2 * self.jobs.lease_seconds + 5:
                idle = 0.0
                if await self.jobs.get_job(tenant, job_id) is None and \
                        not await self.jobs.read_events(tenant, job_id, at):
                    return  # expired or deleted under the follower: nothing more will come

    async def events_so_far(self, tenant: str, job_id: str) -> list[dict[str, Any]] | None:
        """Every stored event item of the job, or None when it has none (not a background job,
        or expired). Raises StoreUnavailable when the store cannot answer."""
        try:
            items = await self.jobs.read_all_events(tenant, job_id)
        except BackendUnavailable:
            raise StoreUnavailable() from None
        return items or None

    async def cancel(self, tenant: str, job_id: str) -> None:
        """Mark the job cancelled and wait (up to two leases and ten seconds) until its runner,
        here or on any replica, or the replica that takes it over, has ended it.

        Raises:
            StoreUnavailable: the store cannot answer.
        """
        try:
            await self._cancel(tenant, job_id)
            await self._wait_ended(tenant, job_id, 2 * self.jobs.lease_seconds + 10)
        except BackendUnavailable:
            raise StoreUnavailable() from None

    async def _cancel(self, tenant: str, job_id: str) -> None:
        await self.jobs.mark_cancelled(tenant, job_id)
        run = self._runs.get((tenant, job_id))
        if run is not None and not run.is_cancelled:
            run.is_cancelled = True
            if run.stop is not None:
                run.stop()

    async def _wait_ended(self, tenant: str, job_id: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the job's end mark; True when it is there."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            items = await self.jobs.read_all_events(tenant, job_id)
            if items and "end" in items[-1]:
                return True
            await asyncio.sleep(self.poll_seconds)
        return False

    async def close(self) -> None:
        """Stop taking jobs; the running ones are left to another replica (or this one's restart)."""
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
        for run in list(self._runs.values()):
            self._abandon(run)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
