"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn, the `serve` extra).

    lmfoundry serve CHECKPOINT [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch 16] [--max-queue 64]

    GET  /v1/models, /v1/models/{id}
    POST /v1/chat/completions    messages through the checkpoint's chat template
    POST /v1/completions         prompt: text, texts, token ids; echo + logprobs scores the prompt
    GET  /health, /metrics       liveness; Prometheus text
    GET  /                       the chat page (serve/static/chat.html: one file, no CDN, no build step)

Streams are server-sent events ending in `data: [DONE]`. Errors are OpenAI's error object with
400 (bad request), 401 (API key), 403 (Host or Origin refused), 404 (model or route), 415 (body
not application/json), 429 (queue full), 503 (shutting down) and 500 (our bug; the traceback goes
to the server log, never to the client).

A browser must not be turned against the server (BrowserGuard): any page the user visits can send
requests to 127.0.0.1, and DNS rebinding can make them same-origin. So the Host header must name
this server (an IP address, localhost, the bound host or an --allowed-host), a request that carries
an Origin must come from the server's own origin or a --cors-origin, POST bodies must be
application/json (which a cross-site form or text/plain fetch cannot send without a preflight),
and CORS headers go only to --cors-origin origins. --api-key guards the page (a browser login
prompt: any user name, the key as password) and every /v1 route and /metrics. Sampling
defaults are OpenAI's (temperature 1, top_p 1), not the checkpoint's generation_config.json.
"""
# no `from __future__ import annotations`: FastAPI reads the route annotations (Request) at run time

import asyncio
import base64
import hmac
import ipaddress
import json
import logging
import os
import signal
import time
import uuid
from contextlib import asynccontextmanager

from ..errors import GenerationError, LMFoundryError
from ..generate import SamplingParams, row_seed, stop_ids_of
from .engine import Engine, EngineStopped, FinishEvent, QueueFull, TokenEvent
from .protocol import APIError, GenRequest, bad, parse_chat, parse_completion, parse_json

log = logging.getLogger("lmfoundry.serve")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def require_serving():
    """FastAPI and uvicorn, or one clear error saying how to get them."""
    try:
        import fastapi
        import uvicorn
    except ImportError as e:
        raise LMFoundryError(f"serving needs the optional 'serve' extra ({e.name} is not installed): "
                             "pip install 'lmfoundry[serve]'") from None
    return fastapi, uvicorn


class Metrics:
    """Counters and histograms rendered in the Prometheus text format (no client library)."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.hist = {name: {} for name in ("request_duration_seconds", "time_to_first_token_seconds")}

    def observe(self, endpoint: str, status: int, latency: float, ttft: float | None) -> None:
        self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1
        self._add("request_duration_seconds", endpoint, latency)
        if ttft is not None:
            self._add("time_to_first_token_seconds", endpoint, ttft)

    def _add(self, name, endpoint, value):
        h = self.hist[name].setdefault(endpoint, [[0] * (len(LATENCY_BUCKETS) + 1), 0.0, 0])
        for i, b in enumerate(LATENCY_BUCKETS):
            if value <= b:
                h[0][i] += 1
        h[0][-1] += 1
        h[1] += value
        h[2] += 1

    def render(self, engine: Engine, model: str) -> str:
        st, snap = engine.stats, engine.snapshot()
        m = f'model="{model}"'
        lines = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP lmfoundry_{name} {help_}")
            lines.append(f"# TYPE lmfoundry_{name} {kind}")
            for labels, value in samples:
                lines.append(f"lmfoundry_{name}{{{labels}}} {value}")

        metric("http_requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
               [(f'{m},endpoint="{e}",status="{s}"', v) for (e, s), v in sorted(self.requests.items())])
        metric("sequences_total", "counter", "Generated sequences (choices) finished, by finish reason.",
               [(f'{m},reason="{r}"', v) for r, v in sorted(st.finished.items())])
        metric("queue_full_rejections_total", "counter", "Requests refused with 429 because the queue was full.",
               [(m, st.rejected_queue_full)])
        metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [(m, st.prompt_tokens)])
        metric("generation_tokens_total", "counter", "Tokens generated.", [(m, st.generated_tokens)])
        metric("decode_steps_total", "counter", "Batched decode steps run.", [(m, st.steps)])
        metric("decode_rows_total", "counter", "Sum over decode steps of the sequences decoded "
               "(divide by decode_steps_total for the mean batch size).", [(m, st.decode_rows)])
        metric("scoring_jobs_total", "counter", "Prompt-scoring jobs (echo + logprobs) run.", [(m, st.jobs)])
        metric("prefill_seconds_total", "counter", "Time spent in prefill forwards.",
               [(m, f"{st.prefill_seconds:.6f}")])
        metric("decode_seconds_total", "counter", "Time spent in decode steps.", [(m, f"{st.decode_seconds:.6f}")])
        metric("queue_depth", "gauge", "Sequences waiting for a batch row.", [(m, snap["waiting"])])
        metric("running_sequences", "gauge", "Sequences holding a batch row.", [(m, snap["running"])])
        metric("batch_capacity", "gauge", "Batch rows (--max-batch).", [(m, snap["max_batch"])])
        metric("batch_occupancy_ratio", "gauge", "Running sequences / batch rows.",
               [(m, f"{snap['running'] / snap['max_batch']:.4f}")])
        metric("kv_cache_reserved_tokens", "gauge", "KV-cache tokens reserved by running sequences.",
               [(m, snap["kv_reserved"])])
        metric("kv_cache_used_tokens", "gauge", "KV-cache tokens written by running sequences.",
               [(m, snap["kv_used"])])
        metric("kv_cache_budget_tokens", "gauge", "KV-cache tokens that running sequences may reserve.",
               [(m, snap["kv_budget"])])
        for name, help_ in (("request_duration_seconds", "Latency of completed requests."),
                            ("time_to_first_token_seconds", "Time from request to first generated token.")):
            lines.append(f"# HELP lmfoundry_{name} {help_}")
            lines.append(f"# TYPE lmfoundry_{name} histogram")
            for endpoint, (counts, total, n) in sorted(self.hist[name].items()):
                lab = f'{m},endpoint="{endpoint}"'
                for b, c in zip(LATENCY_BUCKETS, counts):
                    lines.append(f'lmfoundry_{name}_bucket{{{lab},le="{b}"}} {c}')
                lines.append(f'lmfoundry_{name}_bucket{{{lab},le="+Inf"}} {counts[-1]}')
                lines.append(f"lmfoundry_{name}_sum{{{lab}}} {total:.6f}")
                lines.append(f"lmfoundry_{name}_count{{{lab}}} {n}")
        return "\n".join(lines) + "\n"


class _StopText:
    """A choice's text, released as it becomes final: held back while it could still turn
    into a stop string, cut where the first stop string begins (or ends, with
    include_stop_str). The streamed pieces concatenate to exactly the non-streamed text."""

    def __init__(self, tokenizer, stops: tuple[str, ...], include_stop: bool):
        self.decoder = tokenizer.stream_decoder()
        self.stops, self.include = stops, include_stop
        self.hold = max(map(len, stops), default=1) - 1
        self.text, self.sent, self.cut = "", 0, None

    def push(self, token: int) -> str:
        self.text += self.decoder.push(token)
        return self._release(final=False)

    def finish(self) -> str:
        self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.cut is not None:
            return ""
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        if self.stops:
            start = max(0, self.sent - self.hold)
            hits = [(p, s) for s in self.stops if (p := self.text.find(s, start)) >= 0]
            if hits:
                p, s = min(hits)
                self.cut = end = p + (len(s) if self.include else 0)
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece

    @property
    def final(self) -> str:
        return self.text[:self.cut] if self.cut is not None else self.text


class _Choice:
    def __init__(self, index: int, prompt_index: int, tokenizer, req: GenRequest):
        self.index, self.prompt_index = index, prompt_index
        self.text = _StopText(tokenizer, req.stop, req.include_stop_str)
        self.tokens: list[int] = []
        self.logprobs: list[tuple] = []   # (token, logprob, [(id, logprob)], text offset)
        self.finish: FinishEvent | None = None
        self._offsets = tokenizer.stream_decoder()   # where each token's text starts
        self.offset = 0                              # (after the echoed prompt, with echo)

    def apply(self, events) -> tuple[str, list]:
        """Take one step's events; return the new text and the new logprob entries."""
        piece, entries = "", []
        for e in events:
            if isinstance(e, TokenEvent):
                self.tokens.append(e.token)
                piece += self.text.push(e.token)
                if e.logprob is not None:
                    entries.append((e.token, e.logprob, e.top or [], self.offset))
                self.offset += len(self._offsets.push(e.token))
            else:
                self.finish = e
                if e.reason in ("stop", "length"):
                    piece += self.text.finish()
        self.logprobs += entries
        return piece, entries

    @property
    def finish_reason(self) -> str | None:
        if self.finish is None:
            return None
        return "stop" if self.text.cut is not None else self.finish.reason


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable character that stands for each byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_level_alphabet()


class _ClientGone(Exception):
    pass


class OpenAIServer:
    """The routes' logic: parsing, submitting to the engine, formatting OpenAI responses."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, api_key: str | None = None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.api_key = api_key
        self.context = engine.context
        self.eos = stop_ids_of(None, engine.model.config)
        self.metrics = Metrics()
        self.created = int(time.time())
        self._tokstr: dict[int, str] = {}

    # ---- helpers ----
    def tokstr(self, token: int, as_id: bool = False) -> str:
        if as_id:
            return f"token_id:{token}"
        s = self._tokstr.get(token)
        if s is None:
            s = self._tokstr[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return s

    def tokbytes(self, token: int) -> list[int]:
        """The token's own bytes: byte-level BPE pieces of a multi-byte character decode to
        U+FFFD alone, so read them from the byte-level alphabet instead (GPT-2's table)."""
        s = self.tokstr(token)
        if "\ufffd" in s:
            piece = self.tokenizer.id_to_token(token) or ""
            if piece and all(ch in _BYTE_OF for ch in piece):
                return [_BYTE_OF[ch] for ch in piece]
        return list(s.encode("utf-8"))

    def check_auth(self, request) -> None:
        if self.api_key is not None and not key_matches(request.headers.get("authorization", ""), self.api_key):
            raise APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                           "invalid_request_error", None, "invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                           "invalid_request_error", "model", "model_not_found")

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "lmfoundry",
                "max_model_len": self.context}

    def log_request(self, rid, endpoint, status, prompt_tokens, completion_tokens, t0, ttft, finish) -> None:
        latency = time.perf_counter() - t0
        self.metrics.observe(endpoint, status, latency, ttft)
        log.info("%s %s status=%d prompt_tokens=%d completion_tokens=%d latency=%.3fs ttft=%s finish=%s",
                 rid, endpoint, status, prompt_tokens, completion_tokens, latency,
                 "-" if ttft is None else f"{ttft:.3f}s", finish or "-")

    # ---- generation ----
    def plan(self, req: GenRequest, chat: bool) -> list[tuple]:
        """(prompt, SamplingParams, logprobs, choice index) for every choice, after the context checks."""
        what = "messages" if chat else "prompt"
        items = []
        for i, prompt in enumerate(req.prompts):
            L = len(prompt)
            m = req.max_tokens if req.max_tokens is not None else self.context - L
            if L + m > self.context or (m > 0 and L >= self.context) or m < 0 or (chat and m < 1):
                asked = f"you requested {L + m} tokens ({L} in the {what}, {m} in the completion)" \
                    if req.max_tokens is not None else f"your {what} have {L} tokens, leaving no room to generate"
                raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, "
                               f"{asked}. Please reduce the length of the {what} or of max_tokens.",
                               "invalid_request_error", what if L >= self.context else "max_tokens",
                               "context_length_exceeded")
            stop_ids = tuple(req.stop_token_ids) if req.ignore_eos else self.eos + tuple(req.stop_token_ids)
            for j in range(req.n):
                try:
                    params = SamplingParams(max_new_tokens=m, temperature=req.temperature, top_k=req.top_k,
                                            top_p=req.top_p, repetition_penalty=req.repetition_penalty,
                                            stop_ids=stop_ids, stop_strings=req.stop,
                                            seed=row_seed(req.seed, j))
                except GenerationError as e:
                    raise bad(str(e)) from None
                items.append((prompt, params, req.logprobs, i * req.n + j))
        return items

    def submit(self, items, q):
        try:
            return self.engine.submit_many(items, loop=asyncio.get_running_loop(), sink=q)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_exceeded", None, "queue_full", {"Retry-After": "1"}) from None
        except EngineStopped as e:
            raise APIError(503, str(e), "service_unavailable", None, "shutting_down") from None
        except GenerationError as e:
            raise bad(str(e), "prompt", "invalid_prompt") from None

    async def score_prompts(self, req: GenRequest) -> list[dict | None]:
        """Prompt log-probs through lmfoundry.score.token_logprobs, on the engine thread."""
        scorable = [i for i, p in enumerate(req.prompts) if len(p) >= 2]
        out: list[dict | None] = [None] * len(req.prompts)
        if scorable:
            try:
                fut = self.engine.score([req.prompts[i] for i in scorable], req.logprobs or 0)
            except EngineStopped as e:
                raise APIError(503, str(e), "service_unavailable", None, "shutting_down") from None
            except QueueFull as e:
                raise APIError(429, str(e), "rate_limit_exceeded", None, "queue_full", {"Retry-After": "1"}) from None
            for i, r in zip(scorable, await asyncio.wrap_future(fut)):
                out[i] = r
        return out

    def completion_logprobs(self, entries, as_ids: bool = False) -> dict:
        """OpenAI's legacy logprobs object. top_logprobs maps token text to logprob; where two
        tokens share a text (e.g. byte pieces that decode to U+FFFD) the higher one is kept,
        so max(top.values()) stays right; return_tokens_as_token_ids avoids the collision."""
        tokens, lps, tops, offsets = [], [], [], []
        for tok, lp, top, offset in entries:
            s = self.tokstr(tok, as_ids)
            tokens.append(s)
            lps.append(lp)
            if lp is None:
                tops.append(None)
            else:
                d = {}
                for t, v in top:   # best first
                    d.setdefault(self.tokstr(t, as_ids), v)
                d[s] = max(d.get(s, lp), lp)
                tops.append(d)
            offsets.append(offset)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def prompt_entries(self, prompt: list[int], scored: dict | None, k: int, skip_special: bool) -> list:
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=skip_special)
        offsets = [0]
        for tok in prompt[:-1]:
            offsets.append(offsets[-1] + len(decoder.push(tok)))
        entries = [(prompt[0], None, [], 0)]
        if scored is not None:
            lps = scored["logprobs"].tolist()
            top = scored.get("top")
            ids, vals = (top[0].tolist(), top[1].tolist()) if top is not None and k else ([], [])
            for t in range(len(prompt) - 1):
                entries.append((prompt[t + 1], lps[t], list(zip(ids[t], vals[t])) if ids else [], offsets[t + 1]))
        return entries

    def chat_logprobs(self, entries, as_ids: bool = False) -> dict:
        def item(tok, lp):
            return {"token": self.tokstr(tok, as_ids), "logprob": lp, "bytes": self.tokbytes(tok)}
        return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]}
                            for t, lp, top, _ in entries]}

    async def handle(self, request, endpoint: str, rid: str, t0: float):
        chat = endpoint == "chat"
        self.check_auth(request)
        d = parse_json(await request.body())
        self.check_model(d.get("model"))
        req = parse_chat(d, self.tokenizer) if chat else parse_completion(d, self.tokenizer)
        items = self.plan(req, chat)
        q: asyncio.Queue = asyncio.Queue()
        seqs = self.submit(items, q)
        choices = [_Choice(tag, tag // req.n, self.tokenizer, req) for (_, _, _, tag) in items]
        ctx = dict(rid=rid, endpoint=endpoint, t0=t0, req=req, seqs=seqs, choices=choices, q=q,
                   created=int(time.time()), ttft=None)
        try:
            scored = await self.score_prompts(req) if (req.echo and req.logprobs is not None) else None
        except BaseException:
            for s in seqs:
                s.cancel()
            raise
        ctx["scored"] = scored
        if req.echo:
            for c in choices:
                c.offset = len(self._echo(ctx, c)[0])
        if req.stream:
            return self.stream(request, ctx)
        return await self.collect(request, ctx)

    async def _events(self, ctx):
        """Yield (choice, text piece, logprob entries) as the engine delivers steps."""
        choices, q = ctx["choices"], ctx["q"]
        remaining = sum(c.finish is None for c in choices)
        while remaining:
            tag, events = await q.get()
            c = choices[tag]
            if ctx["ttft"] is None and any(isinstance(e, TokenEvent) for e in events):
                ctx["ttft"] = time.perf_counter() - ctx["t0"]
            piece, entries = c.apply(events)
            if c.finish is not None:
                remaining -= 1
                if c.finish.reason == "error":
                    raise APIError(500, "The server had an error while generating; see its log.", "server_error")
                if c.finish.reason == "abort":
                    raise APIError(503, c.finish.error or "the request was aborted", "service_unavailable",
                                   None, "aborted")
            yield c, piece, entries

    def usage(self, ctx) -> dict:
        p = sum(len(x) for x in ctx["req"].prompts)
        c = sum(len(ch.tokens) for ch in ctx["choices"])
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _finish_log(self, ctx, status):
        u = self.usage(ctx)
        reasons = ",".join(sorted({str(c.finish_reason) for c in ctx["choices"]}))
        self.log_request(ctx["rid"], ctx["endpoint"], status, u["prompt_tokens"], u["completion_tokens"],
                         ctx["t0"], ctx["ttft"], reasons)

    def _echo(self, ctx, c: _Choice) -> tuple[str, dict | None]:
        """The echoed prompt text and its logprobs for completions with echo."""
        req = ctx["req"]
        prompt = req.prompts[c.prompt_index]
        text = req.prompt_texts[c.prompt_index]
        as_ids = text is None   # token-id prompts echo their special tokens too
        if as_ids:
            text = self.tokenizer.decode(prompt, skip_special_tokens=False)
        lp = None
        if req.logprobs is not None:
            entries = self.prompt_entries(prompt, ctx["scored"][c.prompt_index], req.logprobs, not as_ids)
            lp = self.completion_logprobs(entries, req.tokens_as_ids)
        return text, lp

    async def collect(self, request, ctx):
        chat, req = ctx["endpoint"] == "chat", ctx["req"]
        watcher = asyncio.ensure_future(_disconnected(request))
        status = 200
        try:
            events = self._events(ctx).__aiter__()
            while True:
                getter = asyncio.ensure_future(events.__anext__())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    status = 499
                    raise _ClientGone()
                try:
                    getter.result()
                except StopAsyncIteration:
                    break
        except APIError as e:
            status = e.status
            raise
        finally:
            watcher.cancel()
            for s in ctx["seqs"]:
                s.cancel()
            self._finish_log(ctx, status)
        out_choices = []
        for c in ctx["choices"]:
            if chat:
                out_choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text.final},
                                    "logprobs": self.chat_logprobs(c.logprobs, req.tokens_as_ids)
                                    if req.logprobs is not None else None,
                                    "finish_reason": c.finish_reason})
            else:
                text, lp = c.text.final, None
                if req.echo:
                    prompt_text, lp = self._echo(ctx, c)
                    text = prompt_text + text
                if req.logprobs is not None:
                    gen = self.completion_logprobs(c.logprobs, req.tokens_as_ids)
                    lp = gen if lp is None else {k: lp[k] + gen[k] for k in lp}
                out_choices.append({"index": c.index, "text": text, "logprobs": lp,
                                    "finish_reason": c.finish_reason})
        return {"id": ctx["rid"], "object": "chat.completion" if chat else "text_completion",
                "created": ctx["created"], "model": self.model_name, "choices": out_choices,
                "usage": self.usage(ctx), "system_fingerprint": None}

    def stream(self, request, ctx):
        chat, req = ctx["endpoint"] == "chat", ctx["req"]
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": ctx["rid"], "object": obj, "created": ctx["created"], "model": self.model_name}

        def sse(choice: dict) -> str:
            return f"data: {json.dumps({**head, 'choices': [choice]}, ensure_ascii=False)}\n\n"

        def chunk(c: _Choice, piece: str, entries, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": piece} if first else ({"content": piece} if piece else {})
                lp = self.chat_logprobs(entries, req.tokens_as_ids) if req.logprobs is not None and entries else None
                return sse({"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish})
            lp = None
            if req.logprobs is not None and entries:
                lp = self.completion_logprobs(entries, req.tokens_as_ids)
            return sse({"index": c.index, "text": piece, "logprobs": lp, "finish_reason": finish})

        async def body():
            status = 200
            try:
                for c in ctx["choices"]:
                    if chat:
                        yield chunk(c, "", [], None, first=True)
                    elif req.echo:
                        text, lp = self._echo(ctx, c)
                        yield sse({"index": c.index, "text": text, "logprobs": lp, "finish_reason": None})
                async for c, piece, entries in self._events(ctx):
                    if piece or entries or c.finish is not None:
                        yield chunk(c, piece, entries, c.finish_reason)
                if req.include_usage:
                    yield f"data: {json.dumps({**head, 'choices': [], 'usage': self.usage(ctx)})}\n\n"
                yield "data: [DONE]\n\n"
            except APIError as e:   # after the 200 header: the error travels as an event
                status = e.status
                yield f"data: {json.dumps(e.body())}\n\n"
            except (asyncio.CancelledError, GeneratorExit):
                status = 499       # the client went away: its rows are freed below
                raise
            except Exception:
                status = 500
                log.exception("%s: stream failed", ctx["rid"])
                yield f"data: {json.dumps(APIError(500, 'internal server error', 'server_error').body())}\n\n"
            finally:
                for s in ctx["seqs"]:
                    s.cancel()
                self._finish_log(ctx, status)

        from fastapi.responses import StreamingResponse
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": ctx["rid"]})


async def _disconnected(request) -> None:
    """Returns when the client disconnects (the request body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def key_matches(header: str, key: str) -> bool:
    """`Bearer KEY` (OpenAI clients, the chat page) or HTTP Basic with KEY as the password (the
    browser's own login prompt for the page, which it then repeats on the page's requests)."""
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode(), key.encode())


def host_name(host_header: str) -> str:
    """The name in a Host header, without the port; IPv6 literals without brackets."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else ""
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class BrowserGuard:
    """ASGI middleware refusing what a web page could make the user's browser send (module docstring).
    It never touches the body or the stream, so disconnects still reach the routes."""

    def __init__(self, app, host: str = "127.0.0.1", allowed_hosts=(), cors_origins=()):
        self.app = app
        self.hosts = {host_name(h) for h in allowed_hosts} | {host_name(host)}
        self.cors = {o.rstrip("/").lower() for o in cors_origins}

    def host_allowed(self, name: str) -> bool:
        # An IP literal is safe: rebinding needs a domain name that the attacker's DNS points here.
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name == "localhost" or name.endswith(".localhost") or name in self.hosts

    def origin_allowed(self, origin: str, host: str) -> bool:
        o = origin.rstrip("/").lower()
        return "*" in self.cors or o in self.cors or o in (f"http://{host.lower()}", f"https://{host.lower()}")

    def refusal(self, method: str, headers: dict) -> APIError | None:
        host = headers.get("host", "")
        if not self.host_allowed(host_name(host)):
            return APIError(403, f"Host {host!r} is not allowed (DNS-rebinding protection); to serve under that name "
                            f"start the server with --allowed-host {host_name(host) or 'NAME'}",
                            "invalid_request_error", None, "host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, host):
            return APIError(403, f"Origin {origin!r} is not allowed; start the server with --cors-origin {origin} "
                            "to let pages from there use it", "invalid_request_error", None, "origin_not_allowed")
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if method == "POST" and ctype != "application/json":
            return APIError(415, f"Request bodies must be 'Content-Type: application/json', got {ctype or 'none'!r}.",
                            "invalid_request_error", None, "unsupported_media_type")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        cors = []
        if origin is not None and (origin.rstrip("/").lower() in self.cors or "*" in self.cors):
            cors = [(b"access-control-allow-origin", b"*" if "*" in self.cors else origin.encode("latin-1")),
                    (b"vary", b"Origin"), (b"access-control-expose-headers", b"X-Request-Id")]
        if scope["method"] == "OPTIONS" and cors and "access-control-request-method" in headers:
            cors += [(b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                     (b"access-control-allow-headers", b"Authorization, Content-Type"),
                     (b"access-control-max-age", b"600")]
            return await _send_json(send, 204, None, cors)
        error = self.refusal(scope["method"], headers)
        if error is not None:
            log.warning("refused %s %s: %s", scope["method"], scope["path"], error.message)
            return await _send_json(send, error.status, error.body(), cors)

        async def send_with_cors(message):
            if message["type"] == "http.response.start" and cors:
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        await self.app(scope, receive, send_with_cors)


async def _send_json(send, status: int, body, headers) -> None:
    data = b"" if body is None else json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def chat_page() -> str:
    from importlib.resources import files
    return files("lmfoundry.serve").joinpath("static/chat.html").read_text(encoding="utf-8")


def error_response(server: "OpenAIServer", e: APIError, endpoint: str | None = None, t0: float | None = None,
                   rid: str = "-"):
    """An OpenAI-style JSON error (logged and counted when it ends a request to `endpoint`)."""
    from fastapi.responses import JSONResponse
    if endpoint is not None:
        server.log_request(rid, endpoint, e.status, 0, 0, t0, None, e.code or e.type)
    return JSONResponse(e.body(), status_code=e.status, headers={**e.headers, "X-Request-Id": rid})


async def guarded(server: "OpenAIServer", request, endpoint, fn):
    """Run a route; every failure becomes an OpenAI error response (500s without details)."""
    from fastapi.responses import JSONResponse
    t0 = time.perf_counter()
    rid = {"chat": "chatcmpl-", "completions": "cmpl-"}.get(endpoint, "req-") + uuid.uuid4().hex[:24]
    try:
        result = await fn(rid, t0)
    except APIError as e:
        return error_response(server, e, endpoint, t0, rid)
    except _ClientGone:
        return JSONResponse({}, status_code=499)
    except LMFoundryError as e:   # bad input found below the protocol layer
        return error_response(server, bad(str(e)), endpoint, t0, rid)
    except Exception:
        log.exception("%s: %s %s failed", rid, request.method, request.url.path)
        return error_response(server, APIError(500, "The server had an error while processing your request; see "
                                               "its log.", "server_error"), endpoint, t0, rid)
    if isinstance(result, dict):
        return JSONResponse(result, headers={"X-Request-Id": rid})
    return result


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None, host: str = "127.0.0.1",
               allowed_hosts=(), cors_origins=()):
    """The FastAPI application behind BrowserGuard. Its lifespan starts the engine thread and shuts it down."""
    require_serving()
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException as StarletteHTTPException

    server = OpenAIServer(engine, tokenizer, model_name, api_key)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            log.info("shutting down: stopping the engine")
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="lmfoundry", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(BrowserGuard, host=host, allowed_hosts=allowed_hosts, cors_origins=cors_origins)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        typ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(server, APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                               typ))

    _add_page_routes(app, server, chat_page(), api_key)
    _add_api_routes(app, server)
    return app


def _add_page_routes(app, server: "OpenAIServer", page: str, api_key: str | None):
    """/ (the chat page), /health and /metrics."""
    from fastapi import Request
    from fastapi.responses import HTMLResponse, PlainTextResponse
    engine = server.engine

    @app.get("/health")
    async def health():
        if not engine.alive:
            return error_response(server, APIError(503, "the engine is not running", "service_unavailable"))
        return {"status": "ok"}

    @app.get("/")
    async def index(request: Request):
        if api_key is not None and not key_matches(request.headers.get("authorization", ""), api_key):
            return PlainTextResponse("This server needs its API key: log in with any user name and the key as "
                                     "the password.\n", status_code=401,
                                     headers={"WWW-Authenticate": 'Basic realm="lmfoundry", charset="UTF-8"'})
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/metrics")
    async def metrics(request: Request):
        try:
            server.check_auth(request)
        except APIError as e:
            return error_response(server, e)
        return PlainTextResponse(server.metrics.render(engine, server.model_name),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")


def _add_api_routes(app, server: "OpenAIServer"):
    """The OpenAI-compatible /v1 routes."""
    from fastapi import Request

    @app.get("/v1/models")
    async def models(request: Request):
        async def fn(rid, t0):
            server.check_auth(request)
            return server.models()
        return await guarded(server, request, None, fn)

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        async def fn(rid, t0):
            server.check_auth(request)
            server.check_model(model_id)
            return server.model_card()
        return await guarded(server, request, None, fn)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await guarded(server, request, "chat", lambda rid, t0: server.handle(request, "chat", rid, t0))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await guarded(server, request, "completions",
                             lambda rid, t0: server.handle(request, "completions", rid, t0))


def serve(model_dir, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, max_queue: int = 64, kv_budget: int | None = None, max_model_len: int | None = None,
          dtype=None, device=None, quantize=None, compile=False,
          served_model_name: str | None = None, shutdown_timeout: float = 30.0, log_level: str = "info",
          allowed_hosts=(), cors_origins=(), adapter=None) -> None:
    """Load a checkpoint and serve it until SIGINT/SIGTERM (in-flight requests finish first,
    for up to `shutdown_timeout` seconds; then they are cancelled)."""
    _, uvicorn = require_serving()
    from pathlib import Path

    import torch

    from ..checkpoint import read_config
    from ..quantize import load_for_inference
    from ..tokenizer import load_tokenizer

    pkg_log = logging.getLogger("lmfoundry")
    if not pkg_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        pkg_log.addHandler(handler)
        pkg_log.propagate = False
    pkg_log.setLevel(log_level.upper())

    t0 = time.perf_counter()
    model = load_for_inference(model_dir, dtype=dtype, quantize_method=quantize, device=device, compile=compile,
                               adapter=adapter)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.chat_template is None:
        log.warning("%s has no chat template: /v1/chat/completions will answer 400", model_dir)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, max_len=max_model_len,
                    kv_budget=kv_budget)
    name = served_model_name or Path(model_dir).resolve().name
    cfg = model.config
    log.info("model %s (%s, %s, %.1fM params, %s, %s, threads %d) loaded in %.1fs",
             name, model_dir, read_config(model_dir)[1].name, cfg.num_params() / 1e6,
             str(model.dtype).removeprefix("torch."), model.device, torch.get_num_threads(), time.perf_counter() - t0)
    log.info("context %d tokens (model: %d); batch %d rows; queue %d; KV cache %.2f GiB (%d rows x %d tokens), "
             "budget %d tokens; prefill chunk %d", engine.context, cfg.max_seq_len, max_batch, max_queue,
             engine.cache_bytes / 2**30, max_batch, engine.context, engine.kv_budget, engine.prefill_chunk)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach it can use it", host)
    log.info("serving OpenAI API on http://%s:%d/v1 and the chat page on http://%s:%d/ (model id %r, API key %s)",
             host, port, host, port, name, "required" if api_key else "not required")
    if cors_origins:
        log.info("CORS allowed for %s", ", ".join(cors_origins))
    app = create_app(engine, tokenizer, name, api_key, host=host, allowed_hosts=allowed_hosts,
                     cors_origins=cors_origins)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler it
    # found; a Python handler here turns that into a normal exit (status 0).
    previous = signal.signal(signal.SIGTERM, lambda *_: log.info("stopped on SIGTERM"))
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise LMFoundryError(f"could not start the server on {host}:{port} (see the log above)")


def api_key_from_env() -> str | None:
    return os.environ.get("LMFOUNDRY_API_KEY") or None
