"""Serving: a continuous-batching engine (engine.py) behind an OpenAI-compatible HTTP API
(api.py, on the optional FastAPI + uvicorn extra; protocol.py checks the requests).

    from lmfoundry.serve import Engine
    engine = Engine(model, tokenizer, max_batch=16).start()
    engine.submit(prompt_ids, SamplingParams(max_new_tokens=32, temperature=0)).result()

    lmfoundry serve CHECKPOINT --port 8000        # then any OpenAI client at http://127.0.0.1:8000/v1
"""
from .engine import Engine, EngineStopped, FinishEvent, QueueFull, Sequence, TokenEvent

__all__ = ["Engine", "EngineStopped", "FinishEvent", "QueueFull", "Sequence", "TokenEvent", "serve"]


def serve(*args, **kwargs):
    """lmfoundry.serve.api.serve, imported on first use (FastAPI and uvicorn are optional)."""
    from .api import serve as _serve
    return _serve(*args, **kwargs)
