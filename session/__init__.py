"""Per-request conversation logic between the dialects and the engine: leases, prefix restore, saves."""

from session.session import Session

__all__ = ["Session"]
