"""``POST /api/generate/resume``: pick up a streamed /api/generate whose client went away, by its
request_id, from a character offset of the streamed text (session/resume.py keeps it)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from model.types import ServingError
from session.errors import NotFound
from protocol.request_id import ResumeBody
from server.docs import post_doc, stream_answer
from server.http import authenticate, error_response, read_body, runtime, stream

router = APIRouter()

_DOC = post_doc(ResumeBody, {"request_id": "chat-42", "offset": 4},
                stream_answer("text/plain", " ...the rest of the poem",
                              "The streamed text from offset on, then the live text to its end"),
                error_example={"error": {"type": "not_found_error", "param": "request_id",
                                         "message": "no stream or record for request_id 'chat-42'"}})


@router.post("/api/generate/resume", summary="Resume a streamed /api/generate from a character offset",
             **_DOC)
async def resume(request: Request):
    """The text of request_id's stream from ``offset`` on (characters of what was streamed, the
    head included when the call streamed the whole sequence), then the live text to its end.
    Past its grace window (or on another replica) the request_id's record answers: the text of
    the tokens it kept of its last call's output. 404: neither (or another tenant's); 400: an
    offset past the text so far."""
    rt = runtime(request)
    try:
        tenant = authenticate(request)
        body = await read_body(request, ResumeBody)
        if rt.resume is None:
            raise NotFound("no resumable streams on this server", param="request_id")
        entry = await rt.resume.find(tenant, body.request_id, body.offset)
    except ServingError as exc:
        return error_response(exc)
    text = (chunk.encode() async for chunk in entry.follow(body.offset))
    return stream(text, "text/plain; charset=utf-8", {"X-KV-Resume-Offset": str(body.offset)})
