"""The continuous-batching engine: an asyncio face over one model thread.

``await engine.generate(request)`` validates, takes the request_id's lease, loads its KV record,
and returns a ``RequestStream`` (async iterator of ``Delta``) whose cache status is known before the
first token. The model thread loops over three verbs: ``schedule`` (pick the next prefill chunk,
admit finished prefills into the batch), run the model (one chunk of prefill, one decode step for
the whole batch), ``postprocess`` (sample, detokenize, stop checks, emit, retire). Finished
sequences leave the batch at once; their KV is copied out and stored off the model thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from cache.codec import KVRecord
from cache.store import CacheStatus, KVStore
from model import kernels
from model.kv import BatchKV
from model.loader import LoadedModel
from model.sampling import sample, with_request_extras
from model.scheduler import Scheduler, SeqStatus
from model.sequence import Sequence
from model.types import (
    Delta, EngineClosed, GenerateRequest, InvalidRequest, QueueFull, RequestBusy, Usage,
)

log = logging.getLogger("kvbento.engine")


class EngineObserver:
    """Hooks for metrics; the default does nothing. Called on the event loop thread."""

    def on_rejected(self) -> None: ...
    def on_cache(self, status: CacheStatus, seconds: float, nbytes: int) -> None: ...
    def on_store_write(self, seconds: float, nbytes: int, ok: bool) -> None: ...
    def on_finished(self, stream: "RequestStream") -> None: ...
    def on_delta(self, stream: "RequestStream", delta: Delta, now: float) -> None: ...
    # KV reused for a request: source "local" (this process's memory) or "store" (read back).
    def on_reuse(self, source: str, tokens: int) -> None: ...


@dataclass
class EngineConfig:
    max_batch_size: int = 16
    max_queue: int = 64
    prefill_chunk: int = 512
    max_new_tokens_limit: int = 4096
    lease_wait_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 0 or self.prefill_chunk < 1:
            raise ValueError("max_batch_size >= 1, max_queue >= 0, prefill_chunk >= 1")


class RequestStream:
    """The answer to one accepted request: metadata now, deltas as they come.

    Iterating yields ``Delta`` objects until one carries ``finish_reason``. A consumer that stops
    early (client disconnect) aborts the sequence; the record then keeps only delivered tokens.
    """

    def __init__(self, engine: "Engine", seq: Sequence, cache_status: CacheStatus, prompt_text: str) -> None:
        self._engine = engine
        self._seq = seq
        self.request_id = seq.request_id
        self.cache_status = cache_status
        self.prompt_text = prompt_text
        self.num_delivered = 0
        self.base_token_ids = list(seq.token_ids)  # snapshot: the engine thread appends to seq.token_ids
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.text = ""
        self.arrival = time.perf_counter()  # Engine.generate sets the true arrival (for TTFT)

    @property
    def usage(self) -> Usage:
        s = self._seq
        return Usage(prompt_tokens=s.num_base_tokens, completion_tokens=s.num_generated,
                     cached_tokens=s.num_cached_tokens)

    @property
    def sequence(self) -> Sequence:
        return self._seq

    @property
    def token_ids(self) -> list[int]:
        return self._seq.token_ids

    async def __aiter__(self):
        try:
            while self.finish_reason is None:
                delta = await self._seq.queue.get()
                if delta.finish_reason:
                    self.finish_reason = delta.finish_reason
                    self.error = delta.error
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

    async def collect(self) -> str:
        """Drain the stream; return all generated text."""
        async for _ in self:
            pass
        return self.text


class Engine:
    def __init__(self, loaded: LoadedModel, store: KVStore | None, config: EngineConfig | None = None,
                 observer: EngineObserver | None = None) -> None:
        self.m = loaded
        self.store = store
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        self.scheduler = Scheduler(self.config.max_batch_size, self.config.max_queue)
        cfg = loaded.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self._kv_geometry = (loaded.num_layers, kv_heads, head_dim)
        self.kv = self._new_kv()
        # model.kernels.attention reads each row's first live column from the forward's kwargs.
        self._native_attention = getattr(cfg, "_attn_implementation", None) == kernels.ATTENTION_NAME
        self.pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        self._cond = threading.Condition()
        self._inbox: list[tuple] = []
        self._num_in_flight = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="kvbento-engine", daemon=True)
        self._thread.start()
        self.num_steps = 0

    def _new_kv(self) -> BatchKV:
        layers, heads, dim = self._kv_geometry
        kv = BatchKV(layers, heads, dim, self.m.dtype, self.m.device, self.config.max_batch_size)
        # Rows for a full batch and two column chunks, touched now rather than by the first burst.
        kv.reserve(self.config.max_batch_size, 2 * kv.chunk)
        return kv

    # ====================================================================== event-loop side
    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    def tokenize(self, text: str) -> list[int]:
        return self.m.tokenizer(text).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.m.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    async def generate(self, req: GenerateRequest) -> RequestStream:
        """Accept a request and start it.

        Raises:
            InvalidRequest: bad parameters, or the prompt / cached sequence fills the context.
            QueueFull: the waiting queue is full (answer 429).
            RequestBusy: the request_id stayed busy with another request past the lease wait.
            EngineClosed: the engine is shutting down.
        """
        arrival = time.perf_counter()
        if self._closed:
            raise EngineClosed("the engine is shutting down")
        params = req.params
        params.validate(min(self.config.max_new_tokens_limit, self.m.max_context))
        if not self.scheduler.can_accept(self._num_in_flight):
            self.observer.on_rejected()
            raise QueueFull(
                f"server busy: {self.config.max_batch_size} running and {self.config.max_queue} waiting",
                retry_after=1,
            )
        use_cache = req.use_cache and self.store is not None
        lease = None
        status = CacheStatus.MISS
        record = None
        self._num_in_flight += 1  # reserve the place now: the awaits below must not let others overbook
        try:
            if use_cache:
                lease, status = await self._acquire(req.tenant, req.request_id)
                if status is CacheStatus.UNAVAILABLE:
                    use_cache = False
                else:
                    loaded = await self.store.load(req.tenant, req.request_id)
                    self.observer.on_cache(loaded.status, loaded.seconds, loaded.nbytes)
                    status, record = loaded.status, loaded.record
                    if status is CacheStatus.UNAVAILABLE:
                        use_cache = False
            if record is not None:
                token_ids = list(record.token_ids)
                num_prompt = record.num_prompt_tokens
                num_cached = record.num_cached
                if len(token_ids) >= self.m.max_context:
                    raise InvalidRequest(
                        f"request_id {req.request_id!r} already holds {len(token_ids)} tokens, the model's "
                        f"context is {self.m.max_context}: start a new request_id", param="request_id")
            else:
                token_ids = list(req.prompt_ids) if req.prompt_ids is not None else self.tokenize(req.prompt or "")
                if not token_ids:
                    token_ids = [self.m.tokenizer.bos_token_id or self.pad_id]
                if len(token_ids) >= self.m.max_context:
                    raise InvalidRequest(
                        f"prompt is {len(token_ids)} tokens, the model's context is {self.m.max_context}",
                        param="prompt")
                num_prompt = len(token_ids)
                num_cached = 0
            loop = asyncio.get_running_loop()
            seq = Sequence(
                request_id=req.request_id, tenant=req.tenant, token_ids=token_ids,
                num_prompt_tokens=num_prompt, num_cached_tokens=num_cached, params=params,
                record=record, use_cache=use_cache, tokenizer=self.m.tokenizer,
                eos_token_ids=self.m.eos_token_ids, max_context=self.m.max_context, loop=loop,
                queue=asyncio.Queue(), lease=lease,
            )
        except BaseException:
            self._num_in_flight -= 1
            if lease is not None:
                await self.store.release(req.tenant, req.request_id, lease)
            raise
        prompt_text = self.decode(token_ids[:num_prompt])
        self._post(("add", seq))
        stream = RequestStream(self, seq, status, prompt_text)
        stream.arrival = arrival
        return stream

    async def _acquire(self, tenant: str, request_id: str) -> tuple[str | None, CacheStatus]:
        from cache.base import BackendUnavailable

        deadline = time.monotonic() + self.config.lease_wait_seconds
        delay = 0.005
        while True:
            try:
                token = await self.store.acquire(tenant, request_id)
            except BackendUnavailable:
                self.observer.on_cache(CacheStatus.UNAVAILABLE, 0.0, 0)
                return None, CacheStatus.UNAVAILABLE
            if token is not None:
                return token, CacheStatus.MISS
            if time.monotonic() >= deadline:
                raise RequestBusy(f"request_id {request_id!r} is busy with another request", param="request_id")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    def abort(self, seq: Sequence, num_delivered: int) -> None:
        """Stop ``seq`` at its next step; its record keeps the ``num_delivered`` generated tokens."""
        self._post(("abort", seq, num_delivered))

    def _post(self, msg: tuple) -> None:
        with self._cond:
            self._inbox.append(msg)
            self._cond.notify()

    async def _finalize(self, seq: Sequence, record: KVRecord | None, final: Delta) -> None:
        """Store the record and free the lease, then send the final delta (so a client that got the
        end of its answer can continue the request_id at once)."""
        try:
            if record is not None and self.store is not None:
                start = time.perf_counter()
                ok = await self.store.save(seq.tenant, seq.request_id, record)
                self.observer.on_store_write(time.perf_counter() - start, record.nbytes, ok)
            if seq.lease is not None and self.store is not None:
                await self.store.release(seq.tenant, seq.request_id, seq.lease)
        except Exception:  # never lose the answer because the store failed
            log.exception("storing the KV record failed")
        finally:
            self._num_in_flight -= 1
            seq.queue.put_nowait(final)

    def close(self) -> None:
        """Stop the model thread (pending requests end with an error delta)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # ====================================================================== model thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._inbox and not self.scheduler.has_work() and not self._closed:
                    self._cond.wait()
                if self._closed:
                    msgs, self._inbox = self._inbox, []
                    break
                msgs, self._inbox = self._inbox, []
            try:
                # Slab tensors are inference tensors: freeing a row in place needs the mode too.
                with torch.inference_mode():
                    for msg in msgs:
                        if msg[0] == "add":
                            self.scheduler.add(msg[1])
                        else:
                            self._abort(msg[1], msg[2])
                    self._step()
            except Exception as exc:  # a failed step fails its sequences, never the server
                log.exception("engine step failed")
                self._fail_all(f"{type(exc).__name__}: {exc}")
        for msg in msgs:
            if msg[0] == "add":
                self.scheduler.add(msg[1])
        self._fail_all("the engine is shutting down")

    def _step(self) -> None:
        seq = self.scheduler.next_prefill()
        if seq is not None:
            if seq.params.num_beams > 1:
                self._run_beam(seq)
            else:
                self._prefill(seq)
        if self.scheduler.running:
            self._decode()

    # -- prefill -------------------------------------------------------------------------
    def _prefill(self, seq: Sequence) -> None:
        if seq.record is not None:
            keys = [k.to(self.m.device) for k in seq.record.keys]
            values = [v.to(self.m.device) for v in seq.record.values]
            seq.record = None
        else:
            keys, values = self._prefill_chunk(seq)
            if keys is None:
                return  # more chunks to go
        seq.row = self.kv.insert(keys, values)
        self.scheduler.start_running(seq)

    def _prefill_chunk(self, seq: Sequence):
        todo = len(seq.token_ids) - 1
        lo, hi = seq.num_computed, min(todo, seq.num_computed + self.config.prefill_chunk)
        if hi > lo:
            if seq.prefill_cache is None:
                seq.prefill_cache = DynamicCache()
            dev = self.m.device
            ids = torch.tensor([seq.token_ids[lo:hi]], dtype=torch.long, device=dev)
            pos = torch.arange(lo, hi, dtype=torch.long, device=dev).unsqueeze(0)
            self.m.model(input_ids=ids, position_ids=pos, past_key_values=seq.prefill_cache,
                         use_cache=True, logits_to_keep=1)
            seq.num_computed = hi
        if seq.num_computed < todo:
            return None, None
        if seq.prefill_cache is None:
            return [], []
        layers = seq.prefill_cache.layers
        keys = [layer.keys[0] for layer in layers]
        values = [layer.values[0] for layer in layers]
        seq.prefill_cache = None
        return keys, values

    # -- decode --------------------------------------------------------------------------
    def _decode(self) -> None:
        running = list(self.scheduler.running)
        cache, mask, rows, lo = self.kv.prepare_step()
        ids = [self.pad_id] * rows
        pos = [0] * rows
        for seq in running:
            ids[seq.row] = seq.token_ids[-1]
            pos[seq.row] = self.kv.row_len[seq.row]
        dev = self.m.device
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(pos, dtype=torch.long, device=dev)
        if self.m.decode_step is not None:
            logits = self.m.decode_step(ids_t, pos_t, self.kv, lo, mask)
        else:
            extra = {"kvbento_lo": lo} if self._native_attention else {}
            out = self.m.model(input_ids=ids_t.unsqueeze(1), position_ids=pos_t.unsqueeze(1), attention_mask=mask,
                               past_key_values=cache, use_cache=True, **extra)
            logits = out.logits[:, -1, :]
        self.kv.finish_step()
        self.num_steps += 1
        order = [s.row for s in running]
        if order != list(range(rows)):
            logits = logits.index_select(0, torch.tensor(order, device=logits.device))
        specs = [with_request_extras(s.row_spec(), s.params, s.token_ids, s.num_base_tokens) for s in running]
        logprobs: list = []
        tokens = sample(logits.cpu() if logits.device.type != "cpu" else logits, specs, logprobs)
        for seq, token, logprob in zip(running, tokens, logprobs):
            delta, finish = seq.append(token, logprob)
            if delta is not None and not finish:
                seq.emit(delta)
            if finish:
                self._finish(seq, finish, last=delta)

    # -- beam search (outside the continuous batch) --------------------------------------
    def _run_beam(self, seq: Sequence) -> None:
        p = seq.params
        dev = self.m.device
        past = None
        if seq.record is not None:
            past = DynamicCache()
            for i, (k, v) in enumerate(zip(seq.record.keys, seq.record.values)):
                past.update(k.to(dev).unsqueeze(0), v.to(dev).unsqueeze(0), i)
            seq.record = None
        ids = torch.tensor([seq.token_ids], dtype=torch.long, device=dev)
        budget = min(p.max_new_tokens, self.m.max_context - len(seq.token_ids))
        out = self.m.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=past,
            num_beams=p.num_beams, length_penalty=p.length_penalty, max_new_tokens=budget,
            min_new_tokens=min(p.min_new_tokens, budget), repetition_penalty=p.repetition_penalty,
            do_sample=False, early_stopping=True, eos_token_id=self.m.eos_token_ids,
            pad_token_id=self.pad_id,
        )
        new = out[0, ids.shape[1]:].tolist()
        while new and new[-1] == self.pad_id and self.pad_id not in self.m.eos_token_ids:
            new.pop()
        # Recompute the KV of the chosen beam (beam search keeps all beams' caches) for the record.
        seq.num_computed = 0
        seq.prefill_cache = None
        delta, finish = None, None
        for token in new:
            d, finish = seq.append(token)
            if d is not None:
                delta = d if delta is None else Delta(delta.text + d.text, delta.token_ids + d.token_ids)
            if finish:
                break
        finish = finish or "length"
        keys = values = None
        if seq.use_cache:
            while keys is None:
                keys, values = self._prefill_chunk(seq)
        self._finish(seq, finish, last=delta, kv=(keys, values) if keys is not None else None)

    # -- retirement ----------------------------------------------------------------------
    def _finish(self, seq: Sequence, reason: str, *, last: Delta | None = None, error: str | None = None,
                kv: tuple | None = None) -> None:
        record = None
        keep = seq.num_tokens_to_keep
        changed = keep > seq.num_base_tokens or seq.num_cached_tokens == 0
        if seq.use_cache and error is None and changed and keep >= 1:
            if kv is not None:
                keys, values = kv
                n = keep - 1
                keys = [k[:, :n].cpu() for k in keys] if keys else []
                values = [v[:, :n].cpu() for v in values] if values else []
            elif seq.row is not None:
                if last is not None and (last.text or last.token_ids):
                    seq.emit(last)  # the client's token does not wait for the copy-out
                    last = None
                keys, values = self.kv.extract(seq.row, keep - 1)
            else:
                keys = None
            if keys is not None:
                if not keys:  # a one-token sequence: zero-length tensors per layer
                    layers, heads, dim = self._kv_geometry
                    keys = [torch.empty(heads, 0, dim, dtype=self.m.dtype) for _ in range(layers)]
                    values = [torch.empty(heads, 0, dim, dtype=self.m.dtype) for _ in range(layers)]
                record = KVRecord(seq.token_ids[:keep], seq.num_prompt_tokens, self.m.fingerprint, keys, values)
        if seq.row is not None:
            self.kv.remove(seq.row)
            seq.row = None
        self.scheduler.finish(seq)
        seq.prefill_cache = None
        if last is not None and (last.text or last.token_ids):
            seq.emit(last)
        final = Delta(finish_reason=reason, error=error)
        seq.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._finalize(seq, record, final)))

    def _abort(self, seq: Sequence, num_delivered: int) -> None:
        if seq.status is SeqStatus.FINISHED:
            return
        seq.is_aborted = True
        seq.num_delivered = num_delivered
        if seq.status is SeqStatus.WAITING:
            seq.use_cache = seq.use_cache and False  # nothing computed: keep the stored record as is
        self._finish(seq, "abort")

    def _fail_all(self, message: str) -> None:
        seqs = list(self.scheduler.waiting) + list(self.scheduler.running)
        if self.scheduler.prefilling is not None:
            seqs.append(self.scheduler.prefilling)
        for seq in seqs:
            seq.use_cache = False
            seq.row = None
            self._finish(seq, "error", error=message)
        self.kv = self._new_kv()
