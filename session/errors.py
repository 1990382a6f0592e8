"""The session's errors: about request_ids, their records and leases, and the store behind them.
Each carries a kind the server maps to a status (server/http.py)."""

from __future__ import annotations

from model.types import ServingError


class NotFound(ServingError):
    """A named thing (a request_id's record, a stored response) does not exist."""

    kind = "not_found"
    type = "not_found_error"


class Conflict(ServingError):
    """The request contradicts what is stored (e.g. forking onto a request_id that has a record)."""

    kind = "conflict"
    type = "conflict_error"


class RequestBusy(ServingError):
    """Another request with the same request_id is running; requests per request_id are serial."""

    kind = "busy"
    type = "conflict_error"


class StoreUnavailable(ServingError):
    """The KV store cannot answer, and what was asked needs it (a record, a stored response, a list)."""

    kind = "unavailable"
    type = "unavailable_error"

    def __init__(self, message: str = "the KV store is unavailable", *, param: str | None = None) -> None:
        super().__init__(message, param=param)
