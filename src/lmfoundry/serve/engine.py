"""Continuous batching: many sequences share one model and one per-row KV cache.

    engine = Engine(model, tokenizer, max_batch=16).start()   # a background thread owns the model
    seq = engine.submit(prompt_ids, SamplingParams(max_new_tokens=32, temperature=0))
    seq.result()                                              # Completion, as generate() returns it
    engine.shutdown()

Each step (a token boundary):
1. cancelled sequences leave (their rows are free for this very step), queued jobs run
   (prompt scoring for /v1/completions echo+logprobs);
2. waiting sequences are admitted in arrival order while a row is free and the KV budget
   (prompt + max_new_tokens tokens reserved per running sequence) allows;
3. admitted sequences are prefilled alone into their row, in fixed chunks of `prefill_chunk`
   tokens (a one-row shared-length view of the cache); the last chunk samples the first token;
4. every decoding row advances one token in a single [rows, 1] forward: the cache's per-row
   `lengths` put each row's key at its own position, with its own RoPE position and mask.

A sequence's tokens depend only on its own prompt and parameters: the batch changes which
rows share a matmul, never what a row attends to. Prefill, decode steps, sampling (each
request's own seeded generator), stop rules and log-probs are generate.py's decode core, the
same functions `generate()` drives, so a request gives the same tokens here and there.

Results reach consumers as lists of events per step: a thread-safe queue.Queue by default,
or an asyncio queue on a given event loop (one call_soon_threadsafe per loop per step).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import logging
import queue
import dataclasses
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence as Seq

import torch

from ..errors import EngineStopped, GenerationError, QueueFull
from ..generate import Completion, Sampler, SamplingParams, decode_step, prefill, sample

log = logging.getLogger("lmfoundry.serve")


@dataclass
class TokenEvent:
    token: int
    logprob: float | None = None                    # log p(token) under the raw model distribution
    top: list[tuple[int, float]] | None = None     # the `logprobs` most likely (id, logprob)


@dataclass
class FinishEvent:
    reason: str                 # "stop", "length", "abort" (cancelled or shutdown) or "error"
    stop: int | str | None = None
    error: str | None = None


@dataclass
class EngineStats:
    submitted: int = 0
    finished: dict = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0, "error": 0})
    rejected_queue_full: int = 0
    prompt_tokens: int = 0          # prefilled
    generated_tokens: int = 0
    steps: int = 0                  # decode steps
    decode_rows: int = 0            # sum over decode steps of the rows decoded (occupancy)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    jobs: int = 0


class Sequence:
    """One generation request inside the engine. `cancel()` is safe from any thread."""

    _ids = itertools.count()

    def __init__(self, engine: "Engine", prompt: list[int], params: SamplingParams, logprobs: int | None,
                 loop: asyncio.AbstractEventLoop | None, sink, tag):
        self.id = next(Sequence._ids)
        if logprobs is not None:
            params = dataclasses.replace(params, logprobs=logprobs)
        self.engine, self.prompt, self.params = engine, prompt, params
        self.loop, self.tag = loop, tag
        self.queue = sink if sink is not None else (queue.Queue() if loop is None else asyncio.Queue())
        self.sampler: Sampler | None = None     # made when its prefill starts (it owns the tokens)
        self.finish: FinishEvent | None = None
        self.state = "waiting"          # waiting -> prefill -> decode -> done
        self.row: int | None = None
        self.prefilled = 0
        self.reserved = len(prompt) + params.max_new_tokens
        self.cancelled = False
        self.pending: list = []         # events produced this step, delivered at its end
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_end: float | None = None

    def cancel(self) -> None:
        if self.finish is None and not self.cancelled:
            self.cancelled = True
            self.engine._wake()

    # ---- synchronous consumption (sequences submitted without an event loop) ----
    def events(self, timeout: float | None = None):
        """Yield events until the FinishEvent (inclusive)."""
        while True:
            _, batch = self.queue.get(timeout=timeout)
            for event in batch:
                yield event
                if isinstance(event, FinishEvent):
                    return

    def result(self, timeout: float | None = None) -> Completion:
        for event in self.events(timeout):
            if isinstance(event, FinishEvent):
                if event.reason == "error":
                    raise GenerationError(event.error or "generation failed")
        return self.completion()

    @property
    def tokens(self) -> list[int]:
        return self.sampler.tokens if self.sampler is not None else []

    def completion(self) -> Completion:
        f = self.finish
        return Completion(list(self.tokens), f.reason if f else "length", f.stop if f else None)


class Engine:
    """A model, a per-row KV cache of `max_batch` rows and the scheduler around them.

    max_queue: sequences allowed to wait beyond the max_batch that can run (more -> QueueFull).
    max_len: tokens per sequence (prompt + generated) and per cache row; default the model's
      context (max_seq_len). The cache holds max_batch x max_len tokens, allocated up front.
    kv_budget: KV-cache tokens the running sequences may reserve together (each reserves
      prompt + max_new_tokens when admitted); default max_batch * max_len, i.e. rows decide.
    prefill_chunk: prompts are prefilled in chunks of this many tokens, at most about one
      chunk per step, so a long prompt cannot stall the decoding rows for long.
    logprob_memory: bytes the fp32 [tokens, vocab] log-probabilities of a prompt-scoring
      batch may take (the batch size follows from it).
    """

    def __init__(self, model, tokenizer=None, *, max_batch: int = 16, max_queue: int = 64,
                 max_len: int | None = None, kv_budget: int | None = None, prefill_chunk: int = 512,
                 logprob_memory: int = 512 << 20):
        cfg = model.config
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise GenerationError("max_batch and prefill_chunk must be >= 1, max_queue >= 0")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.context = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        self.kv_budget = kv_budget or max_batch * self.context
        if self.kv_budget < 2:
            raise GenerationError(f"kv_budget must hold at least 2 tokens, got {self.kv_budget}")
        self.logprob_memory = logprob_memory
        self.device, V = model.device, cfg.vocab_size
        self.cache = model.new_cache(max_batch, self.context)
        self.cache_bytes = sum(t.numel() * t.element_size() for t in self.cache.k + self.cache.v)
        self._next = torch.zeros(max_batch, dtype=torch.long)     # input token per row
        self._idle = torch.ones(max_batch, dtype=torch.long)      # 1 = not decoding (the cache's lengths live on the host)
        self._rows: list[Sequence | None] = [None] * max_batch
        self._free = list(range(max_batch))                 # heap: lowest free row first (keeps rows dense)
        self._prefilling: deque[Sequence] = deque()
        self._waiting: deque[Sequence] = deque()
        self._jobs: deque[tuple[concurrent.futures.Future, Callable]] = deque()
        self._reserved = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._touched: list[Sequence] = []     # sequences with events to deliver at the end of the step
        self.stats = EngineStats()
        self._vocab = V

    # ------------------------------------------------------------------ public API

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmfoundry-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, prompt: Seq[int], params: SamplingParams | None = None, *, logprobs: int | None = None,
               loop: asyncio.AbstractEventLoop | None = None, sink=None, tag=None) -> Sequence:
        return self.submit_many([(prompt, params or SamplingParams(), logprobs, tag)], loop=loop, sink=sink)[0]

    def submit_many(self, items, *, loop: asyncio.AbstractEventLoop | None = None, sink=None) -> list[Sequence]:
        """Submit (prompt, params, logprobs, tag) tuples all together, or none of them.

        Events go to `sink` (one queue shared by all of them, items are (tag, [events])) or to
        each sequence's own queue; with `loop`, queues are asyncio queues fed on that loop.
        Raises GenerationError for a request that can never run, QueueFull, EngineStopped.
        """
        seqs = []
        for prompt, params, logprobs, tag in items:
            prompt = [int(t) for t in prompt]
            self.check(prompt, params)
            seqs.append(Sequence(self, prompt, params, logprobs, loop, sink, tag))
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            live = [s for s in seqs if s.params.max_new_tokens > 0]
            occupied = len(self._waiting) + self.max_batch - len(self._free)
            if occupied + len(live) > self.max_batch + self.max_queue:
                self.stats.rejected_queue_full += 1
                raise QueueFull(f"the server is at capacity ({self.max_batch} running, {len(self._waiting)} "
                                f"waiting, queue limit {self.max_queue}); retry later")
            self.stats.submitted += len(seqs)
            self._waiting.extend(live)
            self._cond.notify()
            done = [s for s in seqs if s.params.max_new_tokens == 0]
            for s in done:   # nothing to generate (e.g. echo-only scoring): finished already
                s.finish, s.state, s.t_end = FinishEvent("length"), "done", time.perf_counter()
                s.pending.append(s.finish)
                self.stats.finished["length"] += 1
        self._deliver(done)
        return seqs

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise GenerationError if this request could never be served."""
        n, limit = params.max_new_tokens, self.context
        if not prompt:
            raise GenerationError("the prompt is empty; generation needs at least one token")
        if min(prompt) < 0 or max(prompt) >= self._vocab:
            raise GenerationError(f"prompt token ids must be in [0, {self._vocab}) (the vocabulary size)")
        if len(prompt) + n > limit or (n > 0 and len(prompt) >= limit):
            raise GenerationError(f"this model's maximum context length is {limit} tokens; the request has "
                                  f"{len(prompt)} prompt tokens and asks for {n} more ({len(prompt) + n} in all)")
        if len(prompt) + n > self.kv_budget:
            raise GenerationError(f"the request needs {len(prompt) + n} KV-cache tokens; the server's budget "
                                  f"is {self.kv_budget}")
        if params.stop_strings and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer")

    def call(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Run fn(*args) on the engine thread between two steps (it owns the model)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._jobs) >= self.max_batch + self.max_queue:
                self.stats.rejected_queue_full += 1
                raise QueueFull(f"{len(self._jobs)} jobs are waiting already; retry later")
            self._jobs.append((fut, lambda: fn(*args)))
            self._cond.notify()
        return fut

    def score(self, sequences: list[list[int]], top_k: int = 0) -> concurrent.futures.Future:
        """score.token_logprobs on the engine thread, batched within the logprob memory budget."""
        from ..score import token_logprobs
        longest = max(len(s) for s in sequences)
        batch = max(1, min(16, self.logprob_memory // max(1, 4 * longest * self._vocab)))
        return self.call(token_logprobs, self.model, sequences, batch, top_k)

    def snapshot(self) -> dict:
        """Gauges for /metrics and logs."""
        with self._cond:
            running = self.max_batch - len(self._free)
            return {"waiting": len(self._waiting), "running": running, "max_batch": self.max_batch,
                    "kv_reserved": self._reserved, "kv_budget": self.kv_budget,
                    "kv_used": sum(len(s.prompt) + len(s.tokens) for s in self._rows if s is not None)}

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop taking work, abort what is left (its consumers get FinishEvent("abort")), join."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._thread is None:
            self._abort_all("the server is shutting down")

    # ------------------------------------------------------------------ the loop

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _has_work(self) -> bool:
        return bool(self._waiting or self._jobs or self._prefilling or len(self._free) < self.max_batch)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._has_work():
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception:   # a bug, not bad input: fail the running sequences, keep serving
                log.exception("engine step failed; aborting the running requests")
                self._fail_running("internal error while generating")
        self._abort_all("the server is shutting down")

    @torch.inference_mode()
    def step(self) -> None:
        """One token boundary: reap, run jobs, admit, prefill, decode, deliver."""
        with self._cond:
            jobs = list(self._jobs)
            self._jobs.clear()
            for s in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(s)
                self._finish(s, FinishEvent("abort"))
            for s in self._rows:
                if s is not None and s.cancelled:   # a client that left frees its row for this step
                    self._finish(s, FinishEvent("abort"))
            self._admit()
        for fut, fn in jobs:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:   # delivered to the waiting handler
                    fut.set_exception(e)
            self.stats.jobs += 1
        try:
            self._prefill()
            self._decode()
        finally:
            self._deliver(self._take_touched())

    def _take_touched(self) -> list[Sequence]:
        touched, self._touched = self._touched, []
        return touched

    def _emit(self, s: Sequence, event) -> None:
        if not s.pending:
            self._touched.append(s)
        s.pending.append(event)

    def _admit(self) -> None:
        """FIFO: admit while a row is free and the head of the queue fits the KV budget."""
        while self._waiting and self._free:
            s = self._waiting[0]
            if self._reserved + s.reserved > self.kv_budget:
                break
            self._waiting.popleft()
            s.row = heapq.heappop(self._free)
            s.state = "prefill"
            self._rows[s.row] = s
            self._reserved += s.reserved
            self._prefilling.append(s)

    def _prefill(self) -> None:
        """Prefill admitted sequences, about one chunk's worth of tokens per step (at least one chunk)."""
        t0, budget = time.perf_counter(), self.prefill_chunk
        while self._prefilling and budget > 0:
            s = self._prefilling[0]
            if s.finish is not None:
                self._prefilling.popleft()
                continue
            if s.sampler is None:
                seed = s.params.seed if s.params.seed is not None else secrets.randbits(63)
                s.sampler = Sampler(s.prompt, s.params, self.model.config, self.tokenizer, self.device, seed)
            lo = s.prefilled
            hi = min(len(s.prompt), lo + self.prefill_chunk)   # fixed boundaries: load never changes the math
            # a decode step between two chunks writes a dummy key at `lo`, which this chunk overwrites
            logits = prefill(self.model, self.cache.row(s.row), [s.prompt[lo:hi]])
            s.prefilled, budget = hi, budget - (hi - lo)
            self.stats.prompt_tokens += hi - lo
            if hi < len(s.prompt):
                continue
            self._prefilling.popleft()
            s.state = "decode"
            s.t_first = time.perf_counter()
            (tok,), lps = sample([s.sampler], logits)
            self._next[s.row] = tok
            self._idle[s.row] = 0
            self._accept(s, tok, lps.get(0))
        self.stats.prefill_seconds += time.perf_counter() - t0

    def _decode(self) -> None:
        """One token for every decoding row, in one forward over rows [0, hi) (free or
        prefilling rows in that range compute a dummy token that is thrown away)."""
        seqs = [s if s is not None and s.state == "decode" else None for s in self._rows]
        hi = max((r + 1 for r, s in enumerate(seqs) if s is not None), default=0)
        if hi == 0:
            return
        t0 = time.perf_counter()
        seqs = seqs[:hi]
        logits = decode_step(self.model, self.cache.rows(0, hi), self._next[:hi])
        self.cache.lengths[:hi] -= self._idle[:hi]   # rows not decoding keep their length
        toks, lps = sample([s.sampler if s is not None else None for s in seqs], logits)
        self._next[:hi] = torch.tensor(toks)
        rows = 0
        for r, s in enumerate(seqs):
            if s is not None:
                rows += 1
                self._accept(s, toks[r], lps.get(r))
        self.stats.steps += 1
        self.stats.decode_rows += rows
        self.stats.decode_seconds += time.perf_counter() - t0

    def _accept(self, s: Sequence, tok: int, lp) -> None:
        """The decode core's stop rules decide; the engine turns them into events."""
        if s.sampler.accept(tok, lp):
            self.stats.generated_tokens += 1
            self._emit(s, TokenEvent(tok, *(lp if lp is not None else (None, None))))
        if s.sampler.finish is not None:
            self._finish(s, FinishEvent(*s.sampler.finish))

    def _finish(self, s: Sequence, event: FinishEvent) -> None:
        """End a sequence (any state) and free its row. Call with the lock held or on the engine thread."""
        if s.finish is not None:
            return
        s.finish, s.state, s.t_end = event, "done", time.perf_counter()
        self._emit(s, event)
        self.stats.finished[event.reason] = self.stats.finished.get(event.reason, 0) + 1
        if s.row is not None:
            r = s.row
            self._rows[r] = None
            self.cache.lengths[r] = 0
            self._idle[r] = 1
            heapq.heappush(self._free, r)
            self._reserved -= s.reserved
            if s in self._prefilling:
                self._prefilling.remove(s)

    def _deliver(self, seqs: list[Sequence]) -> None:
        """Hand each sequence's events of this step to its consumer; one wake-up per event loop."""
        by_loop: dict = {}
        for s in seqs:
            if not s.pending:
                continue
            events, s.pending = s.pending, []
            if s.loop is None:
                s.queue.put((s.tag, events))
            else:
                by_loop.setdefault(s.loop, []).append((s.queue, s.tag, events))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:    # the loop is closed: nobody is listening any more
                pass

    def _fail_running(self, message: str) -> None:
        with self._cond:
            for s in list(self._rows) + list(self._prefilling):
                if s is not None:
                    self._finish(s, FinishEvent("error", error=message))
            self.cache.lengths.zero_()
            self._idle.fill_(1)
            touched = self._take_touched()
        self._deliver(touched)

    def _abort_all(self, message: str) -> None:
        with self._cond:
            self._stopping = True
            for s in list(self._rows) + list(self._waiting) + list(self._prefilling):
                if s is not None:
                    self._finish(s, FinishEvent("abort", error=message))
            self._waiting.clear()
            for fut, _ in self._jobs:
                fut.set_exception(EngineStopped(message))
            self._jobs.clear()
            touched = self._take_touched()
        self._deliver(touched)


def _put_all(items) -> None:
    for q, tag, events in items:
        q.put_nowait((tag, events))
