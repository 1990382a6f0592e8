"""The continuous-batching engine: an asyncio face over one model thread.

``engine.reserve()`` admits a request (or raises ``QueueFull``); ``engine.submit(request)`` starts
an ``EngineRequest`` (token ids plus the KV of a prefix of them) and returns a ``RequestStream``
(async iterator of ``Delta``). The model thread loops over three verbs: ``schedule`` (pick the next
prefill chunk, admit finished prefills into the batch), run the model (one chunk of prefill, one
decode step for the whole batch), ``postprocess`` (sample, detokenize, stop checks, emit, retire).
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
from transformers import DynamicCache

from model import kernels
from model.kv import BatchKV
from model.loader import LoadedModel
from model.sampling import sample, with_request_extras
from model.scheduler import Scheduler, SeqStatus
from model.sequence import Sequence
from model.types import Delta, EngineClosed, EngineRequest, Finished, InvalidRequest, QueueFull, Usage

log = logging.getLogger("kvbento.engine")


class EngineObserver:
    """Hooks for metrics; the default does nothing. Called on the event loop thread."""

    def on_rejected(self) -> None: ...
    def on_cache(self, status: str, seconds: float, nbytes: int) -> None: ...
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

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 0 or self.prefill_chunk < 1:
            raise ValueError("max_batch_size >= 1, max_queue >= 0, prefill_chunk >= 1")


class RequestStream:
    """The answer to one accepted request: metadata now, deltas as they come.

    Iterating yields ``Delta`` objects until one carries ``finish_reason``. A consumer that stops
    early (client disconnect) aborts the sequence; the record then keeps only delivered tokens.
    """

    def __init__(self, engine: "Engine", seq: Sequence, prompt_text: str) -> None:
        self._engine = engine
        self._seq = seq
        self.request_id = seq.request_id
        self.cache_status = None  # the session's CacheStatus of this request
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
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None,
                 observer: EngineObserver | None = None) -> None:
        self.m = loaded
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

    def check(self, params) -> None:
        """Raise InvalidRequest naming a sampling parameter out of range."""
        params.validate(min(self.config.max_new_tokens_limit, self.m.max_context))

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
        token_ids = list(req.token_ids) or [self.m.tokenizer.bos_token_id or self.pad_id]
        if len(token_ids) >= self.m.max_context:
            raise InvalidRequest(
                f"the sequence is {len(token_ids)} tokens, the model's context is {self.m.max_context}",
                param="prompt")
        seq = Sequence(
            request_id=req.request_id, token_ids=token_ids, num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached, params=req.params, prefix=req.prefix, kv_from=req.kv_from,
            on_finish=req.on_finish, tokenizer=self.m.tokenizer, eos_token_ids=self.m.eos_token_ids,
            max_context=self.m.max_context, loop=asyncio.get_running_loop(), queue=asyncio.Queue(),
        )
        stream = RequestStream(self, seq, self.decode(token_ids[: req.num_prompt_tokens]))
        if arrival is not None:
            stream.arrival = arrival
        self._post(("add", seq))
        return stream

    def abort(self, seq: Sequence, num_delivered: int) -> None:
        """Stop ``seq`` at its next step; its record keeps the ``num_delivered`` generated tokens."""
        self._post(("abort", seq, num_delivered))

    def _post(self, msg: tuple) -> None:
        with self._cond:
            self._inbox.append(msg)
            self._cond.notify()

    async def _finalize(self, seq: Sequence, finished: Finished, final: Delta) -> None:
        """Hand the retired sequence to its ``on_finish`` (the session stores it and frees the
        lease), then send the final delta: a client that got the end of its answer can go on at once."""
        try:
            if seq.on_finish is not None:
                await seq.on_finish(finished)
        except Exception:  # never lose the answer because storing failed
            log.exception("finishing the request failed")
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
        if seq.prefix and seq.num_cached_tokens == len(seq.token_ids) - 1:
            # Everything but the last token is restored: the chunks go straight into the row.
            chunks, seq.prefix = seq.prefix, []
            seq.row = self.kv.insert_chunks(chunks)
            self.scheduler.start_running(seq)
            return
        keys, values = self._prefill_chunk(seq)
        if keys is None:
            return  # more chunks to go
        seq.row = self.kv.insert(keys, values)
        self.scheduler.start_running(seq)

    def _restored_cache(self, seq: Sequence) -> DynamicCache:
        """A DynamicCache holding the restored prefix (the chunked prefill goes on from there)."""
        cache = DynamicCache()
        chunks, seq.prefix = seq.prefix, []
        if chunks:
            dev = self.m.device
            for i in range(len(chunks[0][0])):
                k = torch.cat([c[0][i] for c in chunks], dim=1) if len(chunks) > 1 else chunks[0][0][i]
                v = torch.cat([c[1][i] for c in chunks], dim=1) if len(chunks) > 1 else chunks[0][1][i]
                cache.update(k.to(dev).unsqueeze(0), v.to(dev).unsqueeze(0), i)
        seq.num_computed = seq.num_cached_tokens
        return cache

    def _prefill_chunk(self, seq: Sequence):
        todo = len(seq.token_ids) - 1
        if seq.prefill_cache is None and seq.num_computed == 0 and seq.num_cached_tokens:
            seq.prefill_cache = self._restored_cache(seq)
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
        past = self._restored_cache(seq) if seq.num_cached_tokens else None
        if past is not None:
            past.batch_repeat_interleave(p.num_beams)  # generate expands the inputs, not a given cache
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
        # Recompute the KV of the chosen beam (beam search keeps all beams' caches) for the store.
        seq.num_computed = 0
        seq.num_cached_tokens_for_beam = seq.num_cached_tokens
        seq.num_cached_tokens = 0
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
        if seq.on_finish is not None:
            while keys is None:
                keys, values = self._prefill_chunk(seq)
        seq.num_cached_tokens = seq.num_cached_tokens_for_beam
        self._finish(seq, finish, last=delta, kv=(keys, values) if keys is not None else None)

    # -- retirement ----------------------------------------------------------------------
    def _finish(self, seq: Sequence, reason: str, *, last: Delta | None = None, error: str | None = None,
                kv: tuple | None = None) -> None:
        keep = seq.num_tokens_to_keep
        finished = Finished(seq.token_ids[:keep], keep - seq.num_base_tokens if keep > seq.num_base_tokens else 0,
                            reason, error=error)
        lo, hi = seq.kv_from, keep - 1
        if seq.on_finish is not None and error is None and hi >= lo:
            if kv is not None and kv[0]:
                keys, values = kv
                finished.keys = [k[:, lo:hi].cpu() for k in keys]
                finished.values = [v[:, lo:hi].cpu() for v in values]
            elif seq.row is not None:
                if last is not None and (last.text or last.token_ids):
                    seq.emit(last)  # the client's token does not wait for the copy-out
                    last = None
                finished.keys, finished.values = self.kv.extract(seq.row, hi, lo)
            elif hi == lo:  # nothing new to store (a one-token sequence)
                layers, heads, dim = self._kv_geometry
                finished.keys = [torch.empty(heads, 0, dim, dtype=self.m.dtype) for _ in range(layers)]
                finished.values = [torch.empty(heads, 0, dim, dtype=self.m.dtype) for _ in range(layers)]
        if seq.row is not None:
            self.kv.remove(seq.row)
            seq.row = None
        self.scheduler.finish(seq)
        seq.prefill_cache = None
        seq.prefix = []
        if last is not None and (last.text or last.token_ids):
            seq.emit(last)
        final = Delta(finish_reason=reason, error=error)
        seq.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._finalize(seq, finished, final)))

    def _abort(self, seq: Sequence, num_delivered: int) -> None:
        if seq.status is SeqStatus.FINISHED:
            return
        seq.is_aborted = True
        seq.num_delivered = num_delivered
        self._finish(seq, "abort")

    def _fail_all(self, message: str) -> None:
        seqs = list(self.scheduler.waiting) + list(self.scheduler.running)
        if self.scheduler.prefilling is not None:
            seqs.append(self.scheduler.prefilling)
        for seq in seqs:
            seq.row = None
            self._finish(seq, "error", error=message)
        self.kv = self._new_kv()
