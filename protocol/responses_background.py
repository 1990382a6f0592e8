"""``background: true`` responses: what the job holds, how it runs and resumes, and how a stored
job's events become the Response object so far.

The job record keeps what any replica needs to go on: the body, the sampling parameters, the
prompt's token ids, the conversation and the ids the events carry. Each text delta event is
stored with its token ids, so a replica that takes over continues from the prompt plus every
token already sent: the session restores the KV blocks the first runner stored as it went and
prefills only the unfinished last block. Greedy output is therefore the same text, split into the
same deltas, with the same sequence numbers, as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from model.engine import RequestStream
from model.types import SamplingParams, Usage
from protocol import responses as rs
from protocol import responses_events as rev
from protocol import responses_tools as rtools
from session import responses as stored
from session.background import JobRun
from session.errors import StoreUnavailable
from session.request import GenerateRequest

log = logging.getLogger("kvbento.protocol")

KIND = "responses"
TERMINAL = ("completed", "incomplete", "failed", "cancelled")


def job_record(call: Any, framer: rev.ResponseObject, started: stored.Started,
               items: list[dict[str, Any]]) -> dict[str, Any]:
    """What a replica needs to run or resume the response."""
    s = started.stream
    return {
        "kind": KIND, "model": framer.model, "body": call.body.model_dump(mode="json"),
        "params": {f.name: getattr(framer.params, f.name) for f in dataclasses.fields(framer.params)
                   if f.name not in ("constraint", "grammar")},  # the body's constraint, compiled anew
        "created_at": framer.created_at,
        "item_id": framer.item_id, "messages": started.messages, "input_items": items,
        "prompt_ids": list(s.base_token_ids), "cached_tokens": s.usage.cached_tokens,
    }


def framer_of(run: JobRun) -> rev.ResponseObject:
    job = run.job
    body = rs.ResponsesBody.model_validate(job["body"])
    params = SamplingParams(**job["params"])
    params.constraint = body.constraint
    framer = rev.ResponseObject(run.job_id, job["model"], body, params)
    framer.created_at, framer.item_id = job["created_at"], job["item_id"]
    framer.sequence_number = run.num_events
    return framer


def so_far(items: list[dict[str, Any]]) -> tuple[str, list[int]]:
    """The message text (its deltas) and every generated token id among ``items``."""
    text, ids = [], []
    for it in items:
        e = it.get("e") or {}
        if e.get("type") == "response.output_text.delta":
            text.append(e["delta"])
        ids += it.get("ids") or []
    return "".join(text), ids


def output_of(framer: rev.ResponseObject) -> "rev.TextOutput | rtools.Output":
    """The output driver of a response: one text message, or items that may be function calls."""
    return rtools.Output(framer) if framer.body.calls_tools else rev.TextOutput(framer)


def _regenerates(framer: rev.ResponseObject) -> bool:
    """A constrained or tool answer is taken over by generating it again from its prompt: the
    constraint's state and the call items cannot be rebuilt from the middle yet."""
    return framer.body.constraint is not None or framer.body.calls_tools


def progress(record: dict[str, Any], items: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The stored Response object, with the output generated so far while it runs."""
    if record.get("status") in TERMINAL or not items:
        return record
    text, _ = so_far(items)
    out = dict(record)
    out["output"] = [{"id": _item_id(items), "type": "message", "role": "assistant", "status": "in_progress",
                      "content": [rev.ResponseObject.part(text)]}]
    return out


def _item_id(items: list[dict[str, Any]]) -> str | None:
    for it in items:
        item = (it.get("e") or {}).get("item")
        if item:
            return item.get("id")
    return None


async def start(call: Any, session: Any, runner: Any, framer: rev.ResponseObject, started: stored.Started,
                responses: stored.ResponseStore) -> None:
    """Hand a started response to the background runner; the record says in_progress at once.

    Raises:
        StoreUnavailable: the job or its record could not be written (the stream is cancelled).
    """
    items = rs.input_items(call.body.messages)
    try:
        await responses.save(call.tenant, framer.id, stored.StoredResponse(
            framer.response("in_progress"), started.messages, items, []))
        job = job_record(call, framer, started, items)

        async def first(run: JobRun) -> str:
            return await _run(run, responses, framer, started.stream, output_of(framer))

        await runner.submit(call.tenant, framer.id, job, first)
    except BaseException:
        started.stream.cancel()
        raise


def resumer(session: Any, responses: stored.ResponseStore):
    """The job kind's resume: go on from the stored events and KV on this replica."""

    async def resume(run: JobRun) -> str:
        framer = framer_of(run)
        if run.is_cancelled:
            return await _finish(run, responses, framer, None)
        if _regenerates(framer):
            return await _regenerate(run, session, responses, framer)
        if any(it["e"]["type"] == "response.output_text.done" for it in run.history if "e" in it):
            return await _finish(run, responses, framer, None)  # generation was over: finish writing
        text, ids = so_far(run.history)
        p = framer.params
        left = p.max_new_tokens - len(ids)
        eos = set(session.engine.m.eos_token_ids)
        if left <= 0 or (ids and ids[-1] in eos and not p.ignore_eos):
            return await _finish(run, responses, framer, None)
        params = dataclasses.replace(p, max_new_tokens=left, min_new_tokens=max(0, p.min_new_tokens - len(ids)))
        req = GenerateRequest(request_id=run.job_id, prompt_ids=run.job["prompt_ids"] + ids, params=params,
                              tenant=run.tenant, named=True, special_tokens=False, save_blocks_early=True)
        started = time.perf_counter()
        stream = await session.generate(req)
        known = len(req.prompt_ids)
        log.info("resumed background response %s: %d tokens known, %d restored from the store, %d recomputed "
                 "(restore %.3f s)", run.job_id, known, stream.usage.cached_tokens,
                 known - stream.usage.cached_tokens, time.perf_counter() - started)
        out = rev.TextOutput(framer)
        out.text = text  # its done events carry the whole text
        return await _run(run, responses, framer, stream, out, prior=len(ids), before=text)

    return resume


async def _regenerate(run: JobRun, session: Any, responses: stored.ResponseStore,
                      framer: rev.ResponseObject) -> str:
    """Generate the answer again from its prompt (its KV restored from the store), the events
    already stored dropped; the call items keep the ids the stored events gave them."""
    framer.sequence_number = 0
    stored_calls = [it["e"]["item"] for it in run.history
                    if (it.get("e") or {}).get("type") == "response.output_item.added"
                    and it["e"]["item"].get("type") == "function_call"]
    framer._fc_ids = [c["id"] for c in stored_calls]
    req = GenerateRequest(request_id=run.job_id, prompt_ids=run.job["prompt_ids"], params=framer.params,
                          tenant=run.tenant, named=True, special_tokens=False, save_blocks_early=True)
    stream = await session.generate(req)
    log.info("regenerating background response %s (a constrained or tool answer) past %d stored events",
             run.job_id, run.num_events)
    return await _run(run, responses, framer, stream, output_of(framer),
                      call_ids=[c["call_id"] for c in stored_calls], expected=so_far(run.history)[1])


def _put(run: JobRun, events: list[dict[str, Any]], ids: list[int]) -> bool:
    """Store the events not stored yet (their sequence numbers say which), the token ids with the
    first; False when there was none."""
    fresh = [e for e in events if e["sequence_number"] >= run.num_events]
    for i, e in enumerate(fresh):
        run.emit(e, ids if i == 0 else None)
    return bool(fresh)


async def _run(run: JobRun, responses: stored.ResponseStore, framer: rev.ResponseObject,
               stream: RequestStream, out: "rev.TextOutput | rtools.Output", *, prior: int = 0, before: str = "",
               call_ids: list[str] | None = None, expected: list[int] | None = None) -> str:
    """Drive ``stream`` through the output driver ``out`` into the job's events. ``prior``/``before``:
    tokens and text generated before a takeover; ``call_ids``/``expected``: a regeneration's stored
    call ids and token ids (it stops, failed, where its tokens differ)."""
    run.stop = stream.stop
    if run.is_cancelled:
        stream.stop()
    carry: list[int] = []  # ids of a delta with no new event (held back), stored with the next one
    got: list[int] = []
    if framer.sequence_number == 0:
        _put(run, [framer.event("response.created", response=framer.response("in_progress")),
                   framer.event("response.in_progress", response=framer.response("in_progress")),
                   *out.open()], [])
    try:
        async for delta in stream:
            if run.is_abandoned:
                stream.cancel()
                return "abandoned"
            got += delta.token_ids
            if expected is not None and got[:len(expected)] != expected[:len(got)]:
                log.warning("background response %s: its regeneration differs from the stored tokens",
                            run.job_id)
                stream.cancel()
                return await _finish(run, responses, framer, None, error="the takeover could not reproduce it")
            carry += got[max(len(expected or []), len(got) - len(delta.token_ids)):]  # not stored yet
            events = out.feed(delta.text, final=delta.finish_reason is not None)
            _adopt(out, call_ids or [])
            if _put(run, events, carry):
                carry = []
    finally:
        run.stop = None
    return await _finish(run, responses, framer, stream, prior, out=out, text=before + stream.text)


def _adopt(out: Any, call_ids: list[str]) -> None:
    """Give a regenerated answer's calls the call ids its stored events announced."""
    calls = [it for it in getattr(out, "items", []) if it["type"] == "function_call"]
    for i, (item, call_id) in enumerate(zip(calls, call_ids)):
        item["call_id"] = out.reader.calls[i].id = call_id


def _status(run: JobRun, framer: rev.ResponseObject, stream: RequestStream | None,
            items: list[dict[str, Any]], ids: list[int]) -> str:
    if run.is_cancelled:
        return "cancelled"
    if stream is not None:
        if stream.error or stream.finish_reason == "error":
            return "failed"
        return "incomplete" if stream.finish_reason == "length" else "completed"
    # Resumed after the generation was over: as its events say, else by its length.
    done = [it["e"]["response"]["status"] for it in items
            if (it.get("e") or {}).get("response", {}).get("status") in TERMINAL]
    if done:
        return done[-1]
    return "incomplete" if len(ids) >= framer.params.max_new_tokens else "completed"


def _closing_events(run: JobRun, framer: rev.ResponseObject, status: str, text: str, seen: set[str]) -> None:
    """The done events of the text, its part and its item (those not stored yet)."""
    item_status = "completed" if status == "completed" else "incomplete"
    tail = [("response.output_text.done", lambda: framer.item_event("response.output_text.done", text=text,
                                                                      logprobs=[])),
            ("response.content_part.done", lambda: framer.item_event("response.content_part.done",
                                                                       part=framer.part(text))),
            ("response.output_item.done", lambda: framer.event("response.output_item.done", output_index=0,
                                                                 item=framer.message(item_status, text)))]
    for kind, make in tail:
        if kind not in seen:
            run.emit(make())


async def _finish(run: JobRun, responses: stored.ResponseStore, framer: rev.ResponseObject,
                  stream: RequestStream | None, prior: int = 0, *, out: Any = None, text: str | None = None,
                  error: str | None = None) -> str:
    """The closing events not yet stored (``out``'s, else a text message's), and the final record
    (written before the last event, so a client that continues the response as soon as it sees the
    end finds it stored). ``text``: the whole answer (calls included), else the stored message text."""
    if run.is_abandoned:
        return "abandoned"
    items = run.history + run._pending
    shown, ids = so_far(items)
    text = shown if text is None else text
    seen = {it["e"]["type"] for it in items if "e" in it}
    if out is None or error:
        framer.sequence_number = max(framer.sequence_number, run.num_events)
    status = "failed" if error else _status(run, framer, stream, items, ids)
    prompt_ids = run.job["prompt_ids"]
    if stream is not None:  # every generated token, one without text (an EOS) too
        all_ids = list(stream.token_ids)
        generated = prior + stream.usage.completion_tokens
    else:
        all_ids, generated = prompt_ids + ids, len(ids)
    u = Usage(prompt_tokens=len(prompt_ids), completion_tokens=generated, cached_tokens=run.job["cached_tokens"])
    if status == "failed":
        error = error or (stream.error if stream is not None else None) or "generation failed"
    final = framer.response(status, text, u, error=error)
    if status == "failed" and "response.failed" not in seen:
        run.emit(framer.event("error", code="server_error", message=error, param=None))
        run.emit(framer.event("response.failed", response=final))
    elif status in ("completed", "incomplete") and out is not None:
        _put(run, out.close("completed" if status == "completed" else "incomplete"), [])
    elif status in ("completed", "incomplete"):
        _closing_events(run, framer, status, text, seen)
    answer = rtools.answer_message(text) if framer.body.calls_tools else {"role": "assistant", "content": text}
    rec = stored.StoredResponse(final, run.job["messages"] + [answer], run.job["input_items"], all_ids)
    try:
        await responses.save(run.tenant, run.job_id, rec)
    except StoreUnavailable:
        log.warning("the KV store is unavailable: background response %s is not stored", run.job_id)
    if status in ("completed", "incomplete") and f"response.{status}" not in seen:
        _put(run, [framer.event(f"response.{status}", response=final)], [])
    return status
