"""Planning one request: which stored sequence it extends, its token ids, and (session/restore.py)
the longest stored prefix of them to restore."""

from __future__ import annotations

from cache.base import BackendUnavailable
from cache.entries import CacheStatus, Head
from cache.store import KVStore
from model.types import InvalidRequest
from session.alignment import Aligner
from session.errors import Conflict, NotFound
from session.request import GenerateRequest
from session.restore import Pooled, restore_prefix


class Plan:
    """What one request will run: its tokens, the restored prefix and where it came from."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.num_prompt_tokens = 0
        self.head: Head | None = None  # the stored sequence this request extends, if any
        self.created_at: float | None = None
        self.num_cached = 0
        self.chunks: list = []
        self.known_blocks: list[str] = []
        self.status = CacheStatus.MISS
        self.read_bytes = 0
        self.read_seconds = 0.0
        self.local_tokens = 0
        self.found_by = "blocks"  # head, anchor or blocks: where the restored prefix was found
        self.prefix_from = 0  # positions before are in the engine's pool: not read


class Planner:
    """Builds a request's ``Plan`` from what the store holds."""

    def __init__(self, store: KVStore | None, aligner: Aligner, *, empty_id: int, max_context: int,
                 pooled: Pooled | None = None) -> None:
        self.store = store
        self.pooled = pooled
        self.aligner = aligner
        self.empty_id = empty_id  # the one token of an empty prompt
        self.max_context = max_context

    async def plan(self, req: GenerateRequest, available: bool) -> Plan:
        """The tokens ``req`` runs and, when the store is ``available``, the prefix restored.

        Raises:
            InvalidRequest: the sequence fills the model's context.
            NotFound / Conflict: a fork whose parent is missing or whose request_id has a record.
        """
        plan = Plan()
        own, parent, available = await self._stored_heads(req, plan, available)
        _check_fork(req, available, own, parent)
        text = self._choose_tokens(req, plan, own, parent or own)
        self._check_context(req, plan, parent or own)
        if available and req.params.prompt_logprobs is None:  # those need every position's logits
            try:
                await restore_prefix(self.store, self.aligner, req, plan, text, self.pooled)
            except BackendUnavailable:
                plan.num_cached, plan.chunks, plan.known_blocks, plan.prefix_from = 0, [], [], 0
        return plan

    async def _stored_heads(self, req: GenerateRequest, plan: Plan,
                            available: bool) -> tuple[Head | None, Head | None, bool]:
        """The request_id's own head and its fork parent's (None where not stored), and whether the
        store could answer."""
        own = parent = None
        if not available:
            return None, None, False
        try:
            if req.named:
                own = await self._load_head(req.tenant, req.request_id, plan)
            if req.parent_request_id is not None:
                parent = await self._load_head(req.tenant, req.parent_request_id, plan)
        except BackendUnavailable:
            return own, parent, False
        return own, parent, True

    async def _load_head(self, tenant: str, request_id: str, plan: Plan) -> Head | None:
        got = await self.store.load_head(tenant, request_id)
        plan.read_bytes += got.nbytes
        plan.read_seconds += got.seconds
        if got.status is CacheStatus.UNAVAILABLE:
            raise BackendUnavailable("store unavailable")
        return got.head

    def _choose_tokens(self, req: GenerateRequest, plan: Plan, own: Head | None, base: Head | None) -> str | None:
        """Set the plan's token ids; return the prompt text they were matched from, if any."""
        text = None
        if req.continue_stored and base is not None:
            extra = self.aligner.tokenize(req.append, special_tokens=False) if req.append else []
            plan.token_ids = list(base.token_ids) + extra
            plan.num_prompt_tokens = base.num_prompt_tokens
            plan.head = base
            plan.created_at = base.created_at if base is own else None
        elif req.continue_stored:
            plan.token_ids = self.aligner.tokenize((req.prompt or "") + (req.append or ""), req.special_tokens)
            plan.num_prompt_tokens = len(plan.token_ids)
        else:
            if req.prompt_ids is not None:
                plan.token_ids = list(req.prompt_ids)
            elif base is not None:
                text = req.prompt or ""
                plan.token_ids, _ = self.aligner.align(text, base.token_ids, req.special_tokens)
            else:
                text = req.prompt or ""
                plan.token_ids = self.aligner.tokenize(text, req.special_tokens)
            plan.head = base
            plan.created_at = own.created_at if own is not None else None
            plan.num_prompt_tokens = len(plan.token_ids)
        if not plan.token_ids:
            plan.token_ids = [self.empty_id]
            plan.num_prompt_tokens = 1
        return text

    def _check_context(self, req: GenerateRequest, plan: Plan, base: Head | None) -> None:
        n, ctx = len(plan.token_ids), self.max_context
        if n < ctx:
            return
        if req.continue_stored and base is not None and not req.append:
            raise InvalidRequest(f"request_id {req.request_id!r} already holds {n} tokens, the model's "
                                 f"context is {ctx}: start a new request_id", param="request_id")
        field = "append" if req.append else "prompt"
        raise InvalidRequest(f"{field} makes the sequence {n} tokens, the model's context is {ctx}", param=field)


def _check_fork(req: GenerateRequest, available: bool, own: Head | None, parent: Head | None) -> None:
    if req.parent_request_id is None:
        return
    if not available:
        raise NotFound("the KV store is unavailable: parent_request_id cannot be read", param="parent_request_id")
    if parent is None:
        raise NotFound(f"no stored sequence for parent_request_id {req.parent_request_id!r}",
                       param="parent_request_id")
    if own is not None:
        raise Conflict(f"request_id {req.request_id!r} already has a stored sequence: "
                       "fork onto a new request_id", param="parent_request_id")
