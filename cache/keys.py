"""Every key the store writes, in one place.

Keys carry a Redis Cluster hash tag (the ``{...}`` part): a request_id's head, its lease and a
stored response live in one slot (one tag), while blocks spread over the slots by their own hash.
Leases start with ``lease:`` so byte budgets can leave them out.
"""

from __future__ import annotations

PREFIX = "kvbento:v2"
LEASE = "lease:"


def head_key(tenant: str, request_id: str) -> str:
    """The head of a request_id: its token ids, its block hashes and the KV of its tail."""
    return f"{PREFIX}:{{{tenant}/{request_id}}}:head"


def lease_key(tenant: str, request_id: str) -> str:
    return LEASE + head_key(tenant, request_id)


def response_key(tenant: str, response_id: str) -> str:
    """A stored Responses-API object (JSON), in the same slot as the head of that id."""
    return f"{PREFIX}:{{{tenant}/{response_id}}}:response"


def block_key(tenant: str, block_hash: str) -> str:
    """An immutable, content-addressed KV block (the hash already covers tenant and model)."""
    return f"{PREFIX}:{{{tenant}/b{block_hash}}}:block"


def anchor_key(tenant: str, block_hash: str) -> str:
    """The head an anonymous sequence leaves at its prompt's last full block (found by content)."""
    return f"{PREFIX}:{{{tenant}/b{block_hash}}}:anchor"


def head_key_prefix(tenant: str) -> str:
    """What every head key of ``tenant`` starts with (then the request_id, then ``}:head``)."""
    return f"{PREFIX}:{{{tenant}/"


HEAD_SUFFIX = "}:head"


def request_id_of(tenant: str, key: str) -> str | None:
    """The request_id of a head key of ``tenant``, else None (a block, a lease, another tenant)."""
    start = head_key_prefix(tenant)
    if not key.startswith(start) or not key.endswith(HEAD_SUFFIX):
        return None
    return key[len(start):-len(HEAD_SUFFIX)]


# Background jobs (a Responses-API ``background: true`` response): one registry record per job
# under JOB_PREFIX, found by a scan from any replica, and its event list and cancel mark next to
# the response (same slot).
JOB_PREFIX = f"{PREFIX}:job:"


def job_key(tenant: str, job_id: str) -> str:
    return f"{JOB_PREFIX}{{{tenant}/{job_id}}}"


def job_of(key: str) -> tuple[str, str] | None:
    """(tenant, job id) of a job key, else None."""
    if not key.startswith(JOB_PREFIX + "{") or not key.endswith("}"):
        return None
    tenant, sep, job_id = key[len(JOB_PREFIX) + 1:-1].partition("/")
    return (tenant, job_id) if sep else None


def job_lease_key(tenant: str, job_id: str) -> str:
    return LEASE + job_key(tenant, job_id)


def events_key(tenant: str, job_id: str) -> str:
    """A background job's event list (sequence number = index)."""
    return f"{PREFIX}:{{{tenant}/{job_id}}}:events"


def cancel_key(tenant: str, job_id: str) -> str:
    return f"{PREFIX}:{{{tenant}/{job_id}}}:cancel"
