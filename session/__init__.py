"""Per-request conversation logic between the dialects and the engine: leases, prefix restore, saves."""

from session.errors import Conflict, NotFound, RequestBusy, StoreUnavailable
from session.observer import SessionObserver
from session.request import GenerateRequest
from session.session import Session, SessionStream

__all__ = ["Conflict", "GenerateRequest", "NotFound", "RequestBusy", "Session", "SessionObserver", "SessionStream", "StoreUnavailable"]
