"""The continuous-batching engine: an asyncio face over one model thread.

``engine.reserve()`` admits a request (or raises ``QueueFull``); ``engine.submit(request)`` starts
an ``EngineRequest`` (token ids plus the KV of a prefix of them) and returns a ``RequestStream``
(async iterator of ``Delta``); ``submit_choices`` starts n choices of one prompt, prefilled once.
The model thread loops over three verbs: ``schedule`` (the pure scheduler picks, under a token
budget, the decode token of every running sequence and prefill chunks of any number of others),
run the model (``model.runner``: one forward over all of them, K/V into the paged pool) and
``postprocess`` (``model.postprocess``: sample, detokenize, stop checks, emit, retire).
KV lives in one pool of blocks (``model.kv``, ``model.blocks``): full blocks are named by the
store's block hashes the session passes in, so requests sharing a prefix share its blocks.
Finished sequences leave the batch at once; their new KV is copied out and handed to the request's
``on_finish`` (the session stores it) before the final delta. Nothing here knows the store.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import torch

from model.blocks import BlockManager
from model.constraint import GrammarCompiler
from model.kv import KVPool, pool_blocks
from model.loader import LoadedModel
from model.postprocess import Postprocessor
from model.runner import ModelRunner
from model.scheduler import Scheduler, SeqStatus, StepBudget
from model.sequence import Sequence
from model.types import Delta, EngineClosed, EngineRequest, Finished, InvalidRequest, QueueFull, Usage

log = logging.getLogger("kvbento.engine")


class EngineObserver:
    """Hooks for the engine's events (metrics); the default does nothing. Called on the event loop
    thread. The store's events go to the session's observer (session/observer.py)."""

    def on_rejected(self) -> None: ...
    # Every delta a consumer reads; the first with tokens is the request's first token.
    def on_delta(self, stream: "RequestStream", delta: Delta, now: float) -> None: ...
    def on_finished(self, stream: "RequestStream") -> None: ...


@dataclass
class EngineConfig:
    max_batch_size: int = 16
    max_queue: int = 64
    prefill_chunk: int = 512  # prompt positions of one sequence per step
    max_new_tokens_limit: int = 4096
    grammar_compile_timeout: float = 10.0  # seconds an output constraint may take to compile
    max_batch_tokens: int = 256  # positions of all sequences per step (decode tokens first)
    step_target_ms: float = 0.0  # fewer positions where steps carrying prefill take longer (0: off)
    block_tokens: int = 64  # positions per KV block: the store's block
    kv_cache_bytes: int = 0  # the pool's size; 0 = kv_cache_share of available memory
    kv_cache_share: float = 0.25

    def __post_init__(self) -> None:
        if (self.max_batch_size < 1 or self.max_queue < 0 or self.prefill_chunk < 1
                or self.max_batch_tokens < 1 or self.block_tokens < 1):
            raise ValueError("max_batch_size, prefill_chunk, max_batch_tokens, block_tokens >= 1, max_queue >= 0")


class _Sink:
    """The model thread's end of one request's delta queue, which lives on the request's event loop."""

    __slots__ = ("loop", "queue")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()


def _run_all(calls: list[tuple]) -> None:
    for fn, *args in calls:
        fn(*args)


class RequestStream:
    """The answer to one accepted request: metadata now, deltas as they come.

    Iterating yields ``Delta`` objects until one carries ``finish_reason``. A consumer that stops
    early (client disconnect) aborts the sequence; the record then keeps only delivered tokens.
    """

    def __init__(self, engine: "Engine", seq: Sequence, sink: _Sink, prompt_text: str) -> None:
        self._engine = engine
        self._seq = seq
        self._sink = sink
        self.request_id = seq.request_id
        self.prompt_text = prompt_text
        self.num_delivered = 0
        self.base_token_ids = list(seq.token_ids)  # snapshot: the engine thread appends to seq.token_ids
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.text = ""
        self.arrival = time.perf_counter()  # Engine.submit sets the true arrival (for TTFT)
        self.prompt_logprobs: list | None = None  # when asked: one entry per prompt token

    @property
    def usage(self) -> Usage:
        s = self._seq
        return Usage(prompt_tokens=s.num_base_tokens, completion_tokens=s.num_generated,
                     cached_tokens=s.num_cached_tokens)

    @property
    def token_ids(self) -> list[int]:
        return self._seq.token_ids

    async def __aiter__(self):
        try:
            while self.finish_reason is None:
                delta = await self._sink.queue.get()
                if delta.finish_reason:
                    self.finish_reason = delta.finish_reason
                    self.error = delta.error
                if delta.prompt_logprobs is not None:
                    self.prompt_logprobs = delta.prompt_logprobs
                self.text += delta.text
                self._engine.observer.on_delta(self, delta, time.perf_counter())
                yield delta
                self.num_delivered += len(delta.token_ids)
        finally:
            if self.finish_reason is None:
                self._engine.abort(self._seq, self.num_delivered)
            else:
                self._engine.observer.on_finished(self)

    def cancel(self) -> None:
        """Abort a stream that will not be consumed (e.g. a sibling in a failed batch)."""
        if self.finish_reason is None:
            self._engine.abort(self._seq, self.num_delivered)

    def stop(self) -> None:
        """End generation at the next step, keeping every token generated so far: the consumer
        reads on to the stream's end (finish reason "abort") and the record holds what it read."""
        if self.finish_reason is None:
            self._engine.abort(self._seq, None)

    async def collect(self) -> str:
        """Drain the stream; return all generated text."""
        async for _ in self:
            pass
        return self.text


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None,
                 observer: EngineObserver | None = None) -> None:
        self.m = loaded
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        c = self.config
        per_block = KVPool.bytes_per_block(*ModelRunner.geometry(loaded), loaded.dtype, c.block_tokens)
        num_blocks = pool_blocks(per_block, loaded.device, -(-loaded.max_context // c.block_tokens) + 1,
                                 c.max_batch_size, c.kv_cache_bytes, c.kv_cache_share)
        self.blocks = BlockManager(num_blocks, c.block_tokens)
        self.scheduler = Scheduler(c.max_batch_size, c.max_queue, self.blocks, c.max_batch_tokens, c.prefill_chunk)
        self.budget = StepBudget(c.step_target_ms / 1000, self.scheduler.max_batch_tokens, c.max_batch_size + 32)
        self.runner = ModelRunner(loaded, self.blocks.num_blocks, c.block_tokens)
        self.grammars = GrammarCompiler(loaded.tokenizer, loaded.model.config.vocab_size, loaded.eos_token_ids,
                                        c.grammar_compile_timeout)
        self.postprocessor = Postprocessor(self.runner, self.scheduler, self._emit, self._retire, self.grammars)
        self.pad_id = self.runner.pad_id
        self._sinks: dict[Sequence, _Sink] = {}  # the model thread's only
        # A step's hand-offs per event loop, sent in one call_soon_threadsafe (one wake-up of the
        # loop per step, not one per token of every row).
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple]] = {}
        self._cond = threading.Condition()
        self._inbox: list[tuple] = []
        self._num_in_flight = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="kvbento-engine", daemon=True)
        self._thread.start()

    # ====================================================================== event-loop side
    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def tokenizer(self):
        return self.m.tokenizer

    @property
    def max_context(self) -> int:
        return self.m.max_context

    @property
    def block_tokens(self) -> int:
        return self.config.block_tokens

    def kv_blocks(self) -> dict[str, int]:
        """Blocks of the KV pool by state: used (held by a sequence), cached (a prefix kept under
        its hash, reusable, evicted when needed) and free."""
        b = self.blocks
        return {"used": b.num_used, "cached": b.num_cached, "free": b.num_free}

    @property
    def kv_pool_bytes(self) -> int:
        return self.blocks.num_blocks * self.runner.pool.block_bytes

    def cached_blocks(self, block_hashes: list[str]) -> int:
        """How many of the leading ``block_hashes`` the pool holds now (advisory: a block may be
        evicted before the request runs; the engine then computes it)."""
        return self.blocks.count_cached(block_hashes)

    def decode(self, ids: list[int]) -> str:
        return self.m.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def check(self, params) -> None:
        """Raise InvalidRequest naming a sampling parameter out of range."""
        params.validate(min(self.config.max_new_tokens_limit, self.m.max_context))

    async def prepare(self, params) -> None:
        """Compile ``params``' output constraint, if it has one, off the model thread (cached).

        Raises:
            GrammarError: the constraint is malformed, unsupported or too slow to compile.
        """
        if params.constraint is not None and params.grammar is None:
            params.grammar = await self.grammars.compile(params.constraint)

    def reserve(self) -> None:
        """Count one more request in flight (the place is held across the session's awaits).

        Raises:
            QueueFull: the waiting queue is full (answer 429).
            EngineClosed: the engine is shutting down.
        """
        if self._closed:
            raise EngineClosed("the engine is shutting down")
        if not self.scheduler.can_accept(self._num_in_flight):
            self.observer.on_rejected()
            raise QueueFull(
                f"server busy: {self.config.max_batch_size} running and {self.config.max_queue} waiting",
                retry_after=1,
            )
        self._num_in_flight += 1

    def unreserve(self) -> None:
        """Give back a place taken by ``reserve`` for a request that was not submitted."""
        self._num_in_flight -= 1

    def submit(self, req: EngineRequest, arrival: float | None = None) -> RequestStream:
        """Start a reserved request on the model thread.

        Raises:
            InvalidRequest: the sequence fills the model's context.
        """
        return self.submit_choices([req], arrival)[0]

    def submit_choices(self, reqs: list[EngineRequest], arrival: float | None = None) -> list[RequestStream]:
        """Start reserved requests of the same tokens (n choices of one prompt, each with its own
        sampling parameters, seed and ``on_finish``). The first one prefills; the others take a
        share of its blocks and never prefill: at once where a batch slot is free, else first in line.

        Raises:
            InvalidRequest: the sequence fills the model's context.
        """
        token_ids = list(reqs[0].token_ids) or [self.m.tokenizer.bos_token_id or self.pad_id]
        if len(token_ids) >= self.m.max_context:
            raise InvalidRequest(
                f"the sequence is {len(token_ids)} tokens, the model's context is {self.m.max_context}",
                param="prompt")
        prompt_text = self.decode(token_ids[: reqs[0].num_prompt_tokens])
        added, streams = [], []
        for req in reqs:
            seq = Sequence(
                request_id=req.request_id, token_ids=list(token_ids), num_cached_tokens=req.num_cached,
                params=req.params, prefix=req.prefix, kv_from=req.kv_from, on_finish=req.on_finish,
                prefix_from=req.prefix_from, block_hashes=req.block_hashes, hasher=req.hasher,
                tokenizer=self.m.tokenizer, eos_token_ids=self.m.eos_token_ids,
                max_context=self.m.max_context, on_block=req.on_block, block_tokens=req.block_tokens,
            )
            sink = _Sink()
            stream = RequestStream(self, seq, sink, prompt_text)
            if arrival is not None:
                stream.arrival = arrival
            added.append((seq, sink))
            streams.append(stream)
        added[0][0].siblings = [seq for seq, _ in added[1:]]
        self._post(("add", added))
        return streams

    def abort(self, seq: Sequence, num_delivered: int | None) -> None:
        """Stop ``seq`` at its next step; its record keeps the ``num_delivered`` generated tokens
        (None: every token generated, all of which still reach the stream's consumer)."""
        self._post(("abort", seq, num_delivered))

    def _post(self, msg: tuple) -> None:
        with self._cond:
            self._inbox.append(msg)
            self._cond.notify()

    async def _finalize(self, seq: Sequence, sink: _Sink, finished: Finished, final: Delta) -> None:
        """Hand the retired sequence to its ``on_finish`` (the session stores it and frees the
        lease), then send the final delta: a client that got the end of its answer can go on at once."""
        try:
            if seq.on_finish is not None:
                await seq.on_finish(finished)
        except Exception:  # never lose the answer because storing failed
            log.exception("finishing the request failed")
        finally:
            self._num_in_flight -= 1
            sink.queue.put_nowait(final)

    def close(self) -> None:
        """Stop the model thread (pending requests end with an error delta)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)
        self.grammars.close()

    # ====================================================================== model thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._inbox and not self.scheduler.has_work() and not self._closed:
                    self._cond.wait()
                msgs, self._inbox = self._inbox, []
                if self._closed:
                    break
            try:
                with torch.inference_mode():
                    for msg in msgs:
                        if msg[0] == "add":
                            self._add(msg[1])
                        else:
                            self.postprocessor.abort(msg[1], msg[2])
                    self._step()
            except Exception as exc:  # a failed step fails its sequences, never the server
                log.exception("engine step failed")
                self.postprocessor.fail_all(f"{type(exc).__name__}: {exc}")
            self._flush()
        for msg in msgs:
            if msg[0] == "add":
                self._add(msg[1])
        self.postprocessor.fail_all("the engine is shutting down")
        self._flush()

    def _flush(self) -> None:
        """Send the step's deltas and retirements, in order, to their event loops."""
        outbox, self._outbox = self._outbox, {}
        for loop, calls in outbox.items():
            try:
                loop.call_soon_threadsafe(_run_all, calls)
            except RuntimeError:  # that loop is closed: nobody is left to read its streams
                pass

    def _add(self, added: list[tuple[Sequence, _Sink]]) -> None:
        """Queue the first sequence; its siblings wait on it (``Sequence.siblings``)."""
        for seq, sink in added:
            self._sinks[seq] = sink
        self.scheduler.add(added[0][0])

    def _step(self) -> None:
        """One iteration: schedule, run the model, postprocess."""
        sched = self.scheduler.schedule()
        self.runner.pool.prefault_ahead(self.blocks.high_water)
        for seq in sched.beams:
            self._run_beams(seq)
        started = time.perf_counter()
        done, logits = self.runner.step(sched)
        self.budget.observe(sched, time.perf_counter() - started)
        self.scheduler.step_tokens = self.budget.tokens()
        for seq, _, _ in sched.chunks:
            self._register(seq)
        if not done:
            return
        rows = list(range(len(done)))
        for i, seq in enumerate(list(done)):
            if seq.num_generated == 0 and seq.status is SeqStatus.RUNNING:
                for sib in self._joined(seq):  # choices sharing this prefill sample the same logits
                    done.append(sib)
                    rows.append(i)
        if len(rows) > len(set(rows)):
            logits = logits.index_select(0, torch.tensor(rows))
        self.postprocessor.postprocess(done, logits)

    def _register(self, seq: Sequence) -> None:
        """Name ``seq``'s newly completed blocks in the pool by their store hash."""
        full = min(seq.num_computed // self.config.block_tokens, len(seq.block_table))
        if full <= seq.num_registered:
            return
        if len(seq.block_hashes) < full and seq.hasher is not None:
            seq.block_hashes = seq.hasher(seq.token_ids, full, seq.block_hashes)
        for i in range(seq.num_registered, min(full, len(seq.block_hashes))):
            self.blocks.register(seq.block_table[i], seq.block_hashes[i])
        seq.num_registered = min(full, len(seq.block_hashes))

    def _joined(self, seq: Sequence) -> list[Sequence]:
        """``seq``'s prompt is in the pool: its prompt's logprobs go out, and its sibling choices
        fork its blocks. Returns those that join the batch now (the others wait first in line,
        holding their blocks, and compute the last prompt position again)."""
        if seq.prompt_logprobs is not None:
            self._emit(seq, Delta(prompt_logprobs=seq.prompt_logprobs))
        siblings = [s for s in seq.siblings if s.status is not SeqStatus.FINISHED]
        seq.siblings = []
        joined, waiting = [], []
        for sib in siblings:
            sib.prompt_logprobs = seq.prompt_logprobs
            sib.prefix, sib.num_cached_tokens = [], seq.num_cached_tokens
            sib.block_table = self.blocks.fork(seq.block_table)
            sib.block_hashes, sib.num_registered = list(seq.block_hashes), seq.num_registered
            if self.scheduler.num_running < self.config.max_batch_size:
                sib.num_computed = seq.num_computed
                self.scheduler.start_running(sib)
                if sib.prompt_logprobs is not None:
                    self._emit(sib, Delta(prompt_logprobs=sib.prompt_logprobs))
                joined.append(sib)
            else:
                sib.num_computed = seq.num_computed - 1
                waiting.append(sib)
        for sib in reversed(waiting):  # in their order, ahead of later requests
            self.scheduler.add(sib, first=True)
        return joined

    def _run_beams(self, seq: Sequence) -> None:
        """A beam search runs outside the batch, from prefill to retirement in one go."""
        tokens = self.runner.beam_search(seq)
        last, reason = self.postprocessor.append_beam(seq, tokens)
        kv = self.runner.recompute(seq) if seq.on_finish is not None else None
        self.postprocessor.finish(seq, reason, last=last, kv=kv)

    def _emit(self, seq: Sequence, delta: Delta) -> None:
        sink = self._sinks[seq]
        self._outbox.setdefault(sink.loop, []).append((sink.queue.put_nowait, delta))

    def _retire(self, seq: Sequence, finished: Finished, final: Delta) -> None:
        sink = self._sinks.pop(seq)
        self._outbox.setdefault(sink.loop, []).append(
            (lambda: asyncio.ensure_future(self._finalize(seq, sink, finished, final)),))
