"""GET /health, as vLLM, TGI, SGLang and llama.cpp serve it: benchmark tools probe it before a run."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from model.types import EngineClosed
from server.http import error_response

router = APIRouter()


@router.get("/health", responses={
    200: {"description": "The engine is ready",
          "content": {"application/json": {"example": {"status": "ok", "model": "kvbento-tiny",
                                                       "num_requests_running": 0,
                                                       "num_requests_waiting": 0,
                                                       "device": "cpu", "dtype": "bfloat16",
                                                       "dtype_reason": "amx_bf16",
                                                       "kernels": {"linears": "amx",
                                                                   "attention": "native",
                                                                   "decode_step": "lean",
                                                                   "batch_invariant": "yes"}}}}},
    503: {"description": "Loading or shutting down",
          "content": {"application/json": {"example": {"error": {
              "type": "unavailable_error", "message": "the model is loading"}}}}},
})
async def health(request: Request):
    """200 when the engine takes requests; 503 with the JSON error shape while loading or shutting down."""
    rt = getattr(request.app.state, "runtime", None)
    if rt is None:
        return error_response(EngineClosed("the model is loading"))
    if rt.is_closing:
        return error_response(EngineClosed("the server is shutting down"))
    m = rt.model
    return JSONResponse({"status": "ok", "model": rt.settings.served_model_name,
                         "num_requests_running": rt.engine.num_running,
                         "num_requests_waiting": rt.engine.num_waiting,
                         # What the engine runs in and why (model.precision): auto follows the CPU's flags.
                         "device": m.device.type, "dtype": str(m.dtype).removeprefix("torch."),
                         "dtype_reason": m.dtype_reason, "kernels": m.kernels})
