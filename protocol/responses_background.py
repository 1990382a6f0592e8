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
from session import responses as stored
from session.background import JobRun
from session.errors import StoreUnavailable
from session.request import GenerateRequest

log = logging.getLogger("kvbento.protocol")

KIND = "responses"
TERMINAL = ("completed", "incomplete", "failed", "cancelled")


def job_record(call: Any, framer: rs.ResponseObject, started: stored.Started, items: list[dict[str, Any]]) -> dict[str, Any]:
    """What a replica needs to run or resume the response."""
    s = started.stream
    return {
        "kind": KIND, "model": framer.model, "body": call.body.model_dump(mode="json"),
        "params": dataclasses.asdict(framer.params), "created_at": framer.created_at,
        "item_id": framer.item_id, "messages": started.messages, "input_items": items,
        "prompt_ids": list(s.base_token_ids), "cached_tokens": s.usage.cached_tokens,
    }


def framer_of(run: JobRun) -> rs.ResponseObject:
    job = run.job
    body = rs.ResponsesBody.model_validate(job["body"])
    framer = rs.ResponseObject(run.job_id, job["model"], body, SamplingParams(**job["params"]))
    framer.created_at, framer.item_id = job["created_at"], job["item_id"]
    framer.sequence_number = run.num_events
    return framer


def so_far(items: list[dict[str, Any]]) -> tuple[str, list[int]]:
    """The text and token ids of the text deltas among ``items``."""
    text, ids = [], []
    for it in items:
        e = it.get("e") or {}
        if e.get("type") == "response.output_text.delta":
            text.append(e["delta"])
            ids += it.get("ids") or []
    return "".join(text), ids


def progress(record: dict[str, Any], items: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The stored Response object, with the output generated so far while it runs."""
    if record.get("status") in TERMINAL or not items:
        return record
    text, _ = so_far(items)
    out = dict(record)
    out["output"] = [{"id": _item_id(items), "type": "message", "role": "assistant", "status": "in_progress",
                      "content": [rs.ResponseObject.part(text)]}]
    return out


def _item_id(items: list[dict[str, Any]]) -> str | None:
    for it in items:
        item = (it.get("e") or {}).get("item")
        if item:
            return item.get("id")
    return None


async def start(call: Any, session: Any, runner: Any, framer: rs.ResponseObject, started: stored.Started,
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
            return await _run(run, session, responses, framer, started.stream)

        await runner.submit(call.tenant, framer.id, job, first)
    except BaseException:
        started.stream.cancel()
        raise


def resumer(session: Any, responses: stored.ResponseStore):
    """The job kind's resume: go on from the stored events and KV on this replica."""

    async def resume(run: JobRun) -> str:
        framer = framer_of(run)
        if any(it["e"]["type"] == "response.output_text.done" for it in run.history if "e" in it):
            return await _finish(run, responses, framer, None)  # generation was over: finish writing
        if run.is_cancelled:
            return await _finish(run, responses, framer, None)
        _, ids = so_far(run.history)
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
        return await _run(run, session, responses, framer, stream)

    return resume


async def _run(run: JobRun, session: Any, responses: stored.ResponseStore, framer: rs.ResponseObject,
               stream: RequestStream) -> str:
    run.stop = stream.stop
    if run.is_cancelled:
        stream.stop()
    prior = len(so_far(run.history)[1])  # tokens generated before a takeover
    carry: list[int] = []  # ids of a delta without text (held back), sent with the next text
    if not run.history:
        run.emit(framer.event("response.created", response=framer.response("in_progress")))
        run.emit(framer.event("response.in_progress", response=framer.response("in_progress")))
        run.emit(framer.event("response.output_item.added", output_index=0, item=framer.message("in_progress", None)))
        run.emit(framer.item_event("response.content_part.added", part=framer.part("")))
    try:
        async for delta in stream:
            if run.is_abandoned:
                stream.cancel()
                return "abandoned"
            carry += delta.token_ids
            if delta.text:
                run.emit(framer.item_event("response.output_text.delta", delta=delta.text, logprobs=[]), carry)
                carry = []
    finally:
        run.stop = None
    return await _finish(run, responses, framer, stream, prior)


def _status(run: JobRun, framer: rs.ResponseObject, stream: RequestStream | None,
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


def _closing_events(run: JobRun, framer: rs.ResponseObject, status: str, text: str, seen: set[str]) -> None:
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


async def _finish(run: JobRun, responses: stored.ResponseStore, framer: rs.ResponseObject,
                  stream: RequestStream | None, prior: int = 0) -> str:
    """The closing events not yet stored, and the final record (written before the last event, so
    a client that continues the response as soon as it sees the end finds it stored)."""
    if run.is_abandoned:
        return "abandoned"
    items = run.history + run._pending
    text, ids = so_far(items)
    seen = {it["e"]["type"] for it in items if "e" in it}
    status = _status(run, framer, stream, items, ids)
    prompt_ids = run.job["prompt_ids"]
    if stream is not None:  # every generated token, one without text (an EOS) too
        all_ids = list(stream.token_ids)
        generated = prior + stream.usage.completion_tokens
    else:
        all_ids, generated = prompt_ids + ids, len(ids)
    u = Usage(prompt_tokens=len(prompt_ids), completion_tokens=generated, cached_tokens=run.job["cached_tokens"])
    error = ((stream.error if stream is not None else None) or "generation failed") if status == "failed" else None
    final = framer.response(status, text, u, error=error)
    if status == "failed" and "response.failed" not in seen:
        run.emit(framer.event("error", code="server_error", message=error, param=None))
        run.emit(framer.event("response.failed", response=final))
    elif status in ("completed", "incomplete"):
        _closing_events(run, framer, status, text, seen)
    answer = {"role": "assistant", "content": text}
    rec = stored.StoredResponse(final, run.job["messages"] + [answer], run.job["input_items"], all_ids)
    try:
        await responses.save(run.tenant, run.job_id, rec)
    except StoreUnavailable:
        log.warning("the KV store is unavailable: background response %s is not stored", run.job_id)
    if status in ("completed", "incomplete") and f"response.{status}" not in seen:
        run.emit(framer.event(f"response.{status}", response=final))
    return status
