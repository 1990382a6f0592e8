"""Contender 3: the naive server of simple serving examples — ``model.generate`` once per request.

Every generate runs on ONE dedicated thread (requests queue behind each other), tokens stream out
through a ``TextIteratorStreamer``. Run: ``python -m bench.naive_server MODEL_DIR PORT [DTYPE]``
(DTYPE: float32, bfloat16; default: from_pretrained's own, float32).
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer


def build(model_dir: str, dtype: str = "auto") -> FastAPI:
    """The app: POST /generate {prompt, max_new_tokens} streams the generated text."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    worker = ThreadPoolExecutor(max_workers=1)  # one generate at a time, like the examples
    app = FastAPI()

    @app.post("/generate")
    async def generate(request: Request) -> StreamingResponse:
        body = await request.json()
        ids = tok(body["prompt"], return_tensors="pt").input_ids
        n = int(body.get("max_new_tokens", 64))
        streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=600)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                      min_new_tokens=n, do_sample=False, streamer=streamer)
        worker.submit(torch.inference_mode()(model.generate), **kwargs)
        return StreamingResponse((t.encode() for t in streamer if t), media_type="text/plain")

    @app.get("/health")
    def health() -> dict:
        return {"ok": threading.active_count() > 0}

    return app


if __name__ == "__main__":
    uvicorn.run(build(sys.argv[1], sys.argv[3] if len(sys.argv) > 3 else "auto"), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
