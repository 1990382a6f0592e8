"""Stored Responses-API objects and how a new response continues one.

A stored response is two things under its id: the session's head (the token sequence and its KV,
written by the session when generation ends) and a small JSON record next to it (the Response
object, the conversation's messages through its answer, its own input items). The record is what
makes a response continuable: a child re-renders the whole conversation from its messages and the
session matches that text against the parent's head, so only the new input is prefilled. When the
parent's KV was evicted but its record is still stored, the child is computed from the text.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cache.base import BackendUnavailable
from cache.store import KVStore
from model.types import InvalidRequest, SamplingParams
from session.errors import NotFound, StoreUnavailable
from session.request import GenerateRequest
from session.session import Session, SessionStream

log = logging.getLogger("kvbento.session")

RECORD_VERSION = 1


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the Response object as it was answered
    messages: list[dict[str, str]]  # the conversation through this answer, without instructions
    input_items: list[dict[str, Any]]  # this request's own input, as input_items lists it
    token_ids: list[int]  # the whole sequence through this answer, as generated


class ResponseStore:
    """Response records in the KV store's backend, with the store's TTL (and so its budget)."""

    def __init__(self, store: KVStore) -> None:
        self.store = store

    async def load(self, tenant: str, response_id: str) -> StoredResponse | None:
        """The stored record, or None (never stored, deleted, expired, evicted or unreadable).

        Raises:
            StoreUnavailable: the store cannot answer.
        """
        try:
            data = await self.store.load_response(tenant, response_id)
        except BackendUnavailable:
            raise StoreUnavailable() from None
        if data is None:
            return None
        try:
            rec = json.loads(data)
            if rec.get("v") != RECORD_VERSION:
                return None
            # Token ids of another model (the server now serves a different one) mean nothing here:
            # such a record is continued from its text alone.
            same_model = rec.get("fingerprint") == self.store.fingerprint
            ids = [int(t) for t in rec["token_ids"]] if same_model else []
            return StoredResponse(rec["response"], rec["messages"], rec["input_items"], ids)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("stored response %r is unreadable; treating it as absent", response_id)
            return None

    async def save(self, tenant: str, response_id: str, rec: StoredResponse) -> None:
        """Write the record. Raises StoreUnavailable when the store cannot answer."""
        data = json.dumps({"v": RECORD_VERSION, "response": rec.response, "messages": rec.messages,
                           "input_items": rec.input_items, "token_ids": rec.token_ids,
                           "fingerprint": self.store.fingerprint}, ensure_ascii=False, separators=(",", ":"))
        try:
            await self.store.save_response(tenant, response_id, data.encode())
        except BackendUnavailable:
            raise StoreUnavailable() from None

    async def delete(self, tenant: str, response_id: str) -> bool:
        """Remove the record and the head of ``response_id``; False when there was no record.

        Raises:
            StoreUnavailable: the store cannot answer.
        """
        try:
            existed = await self.store.delete_response(tenant, response_id)
            await self.store.delete(tenant, response_id)
        except BackendUnavailable:
            raise StoreUnavailable() from None
        return existed


@dataclass
class Started:
    stream: SessionStream
    messages: list[dict[str, str]]  # the conversation the answer follows (parent's + new input)


async def start(session: Session, responses: ResponseStore, *, tenant: str, response_id: str,
                previous_response_id: str | None, instructions: str | None,
                new_messages: list[dict[str, str]], render: Callable[[list[dict[str, str]]], str],
                params: SamplingParams, store: bool, save_blocks_early: bool = False) -> Started:
    """Start a response: the parent's conversation plus the new input, rendered, through the session.

    Args:
        render: the model's chat template (generation prompt added) over ``{"role", "content"}``.
        store: keep the response (a named head under ``response_id``); False = anonymous.
        save_blocks_early: store each KV block as soon as it is computed (a background response).
    Raises:
        NotFound: ``previous_response_id`` has no stored record (param ``previous_response_id``).
        InvalidRequest: the template rejects the messages, or the conversation is past the context.
        StoreUnavailable: the parent's record could not be read.
        And the session's errors (RequestBusy) and the engine's (QueueFull, EngineClosed).
    """
    history: list[dict[str, str]] = []
    parent = None
    if previous_response_id is not None:
        parent = await responses.load(tenant, previous_response_id)
        if parent is None:
            raise NotFound(f"no stored response {previous_response_id!r}", param="previous_response_id")
        history = parent.messages
    messages = history + new_messages
    # Instructions are this request's system message only; a parent's are not carried over.
    system = [{"role": "system", "content": instructions}] if instructions else []
    rendered = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in system + messages]
    try:
        text = render(rendered)
    except Exception as exc:  # noqa: BLE001 (jinja / tokenizer errors are the caller's, not a crash)
        raise InvalidRequest(f"input: the chat template failed: {exc}", param="input") from None
    req = GenerateRequest(request_id=response_id, prompt=text, special_tokens=False, named=store,
                          parent_request_id=previous_response_id, params=params, tenant=tenant,
                          save_blocks_early=save_blocks_early)
    try:
        stream = await session.generate(req)
    except NotFound as exc:
        if exc.param != "parent_request_id" or parent is None:
            raise
        # The parent's record is stored but its head is gone (evicted, or the store blinked):
        # recompute from the record, on the parent's own token ids (a re-tokenization of its
        # answer's text may differ, and so would what follows).
        ids, _ = session.align(text, parent.token_ids) if parent.token_ids else (None, 0)
        stream = await session.generate(dataclasses.replace(
            req, prompt=None if ids else text, prompt_ids=ids or None, parent_request_id=None))
    return Started(stream, messages)


__all__ = ["ResponseStore", "Started", "StoredResponse", "start"]
