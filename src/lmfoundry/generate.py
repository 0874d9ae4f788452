"""The decode core: every token lmfoundry generates goes through here.

    prefill(model, cache, prompts)        prompts into empty (or partly filled) cache rows -> next-token logits
    decode_step(model, cache, tokens)     one token per row -> next-token logits
    compile_decoding(model)               decode_step through one compiled step over a static cache
    Sampler(prompt, params, config)       one request's sampling and stopping state
    sample(samplers, logits)              the next token of every row, and log-probs where asked
    generate(model, prompts, ...)         static batches: the four above, in a loop
    generate_text(model, tokenizer, ...)  strings or chats in, strings out (evaluation, judges, quickstart)

The serving engine (serve/engine.py, continuous batching) drives the same four, so a request
gives the same tokens whoever runs it. Logits are processed with transformers' semantics and
order (repetition penalty, temperature, top-k, top-p); each sampled request draws from its own
generator, seeded per request. Precision, compilation and adapters are properties of the model
these functions are handed, so every driver gets them at once.

    from lmfoundry.generate import generate
    outs = generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=32, temperature=0)
    outs[0].tokens, outs[0].finish_reason          # [...], "stop" or "length"
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from .errors import GenerationError


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 is greedy (argmax; only the repetition penalty applies). top_k 0 and
    top_p 1.0 disable those filters. stop_ids None means the model config's eos_token_id
    (an int, a list or None); pass () to never stop on an id. stop_strings need a tokenizer
    (any object with decode(list[int]) -> str). seed None samples from torch's global RNG.
    logprobs None records no log-probabilities; 0 records each generated token's log-prob under
    the model's raw distribution, k > 0 also the k most likely tokens at each step.
    """
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_ids: Iterable[int] | int | None = None
    stop_strings: Sequence[str] = ()
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self):
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(self.stop_strings)
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0, "max_new_tokens must be an int >= 0"),
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an int >= 0 (0 = off)"),
            (0 <= self.top_p <= 1, "top_p must be in [0, 1] (1 = off)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)"),
            (all(isinstance(s, str) and s for s in self.stop_strings), "stop_strings must be non-empty strings"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
             "logprobs must be None or an int >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationError(f"{message}; got {self!r}")


@dataclass
class Completion:
    """One prompt's result. tokens excludes the prompt and any stop id, and ends with the
    token that completed a stop string. finish_reason is "stop" (stop id or stop string;
    `stop` says which) or "length" (max_new_tokens reached). With params.logprobs set,
    `logprobs[i]` is log p(tokens[i]) under the raw model distribution and `top_logprobs[i]`
    the params.logprobs most likely (id, log-prob) pairs at that step."""
    tokens: list[int]
    finish_reason: str
    stop: int | str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Scores [B, V] to sample from (or argmax, when temperature is 0), as transformers does.

    `seen` [B, V] bool marks the tokens already in each row (prompt + generated); their
    logits are multiplied (if negative) or divided (if positive) by the repetition penalty.
    Then, when sampling: divide by temperature, keep the top_k highest (ties at the k-th
    value kept), then keep the smallest set whose probability reaches top_p (at least one
    token). Removed tokens get -inf. The input is not modified.
    """
    scores = logits
    p = params.repetition_penalty
    if p != 1.0 and seen is not None:
        scores = torch.where(seen, torch.where(scores < 0, scores * p, scores / p), scores)
    if params.temperature == 0:
        return scores
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        # Ascending order: drop the low tail whose total probability is at most 1 - top_p,
        # but never the most likely token.
        ascending, order = torch.sort(scores, descending=False)
        tail = ascending.softmax(-1).cumsum(-1) <= 1 - params.top_p
        tail[..., -1] = False
        scores = scores.masked_fill(tail.scatter(-1, order, tail), float("-inf"))
    return scores


def stop_ids_of(stop_ids, config) -> tuple[int, ...]:
    """The ids that end a sequence: `stop_ids` as given, or the config's eos_token_id when None."""
    ids = config.eos_token_id if stop_ids is None else stop_ids
    if ids is None:
        return ()
    return (int(ids),) if isinstance(ids, int) else tuple(int(i) for i in ids)


class Sampler:
    """One request's sampling and stopping state: its parameters, its generator (seeded with
    `seed`; None draws from torch's global RNG), the tokens it has produced and how it ended.

    `accept(token)` applies the stop rules: a stop id ends the sequence without being emitted;
    any other token is emitted, then a stop string completed by it or reaching max_new_tokens
    ends the sequence. `finish` is None while running, else (reason, stop).
    """

    def __init__(self, prompt: Sequence[int], params: SamplingParams, config, tokenizer=None, device=None,
                 seed: int | None = None):
        self.params, self.tokenizer = params, tokenizer
        self.stop_ids = frozenset(stop_ids_of(params.stop_ids, config))
        self.window = 4 * max(map(len, params.stop_strings), default=0) + 4   # tokens decoded per check
        self.greedy = params.temperature == 0 and params.repetition_penalty == 1.0
        self.rng = None
        if params.temperature > 0 and seed is not None:
            self.rng = torch.Generator(device or "cpu").manual_seed(seed)
        self.seen = None          # [1, V]: tokens the repetition penalty applies to
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, config.vocab_size, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(list(prompt), dtype=torch.long, device=device)] = True
        self.tokens: list[int] = []
        self.logprobs: list[float] | None = [] if params.logprobs is not None else None
        self.top: list | None = [] if params.logprobs else None
        self.finish: tuple[str, int | str | None] | None = None

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token [1] from this row's fp32 logits [1, V]."""
        scores = process_logits(logits, self.params, self.seen)
        if self.params.temperature == 0:
            return scores.argmax(-1)
        return torch.multinomial(scores.softmax(-1), 1, generator=self.rng).squeeze(1)

    def accept(self, token: int, logprob=None) -> bool:
        """Take the chosen token; True when it is emitted (part of the output)."""
        if token in self.stop_ids:
            self.finish = ("stop", token)
            return False
        self.tokens.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob[0])
            if self.top is not None:
                self.top.append(logprob[1])
        if self.seen is not None:
            self.seen[0, token] = True
        if self.params.stop_strings:
            text = self.tokenizer.decode(self.tokens[-self.window:])
            hit = next((s for s in self.params.stop_strings if s in text), None)
            if hit is not None:
                self.finish = ("stop", hit)
                return True
        if len(self.tokens) >= self.params.max_new_tokens:
            self.finish = ("length", None)
        return True

    def completion(self) -> Completion:
        reason, stop = self.finish or ("length", None)
        return Completion(list(self.tokens), reason, stop, self.logprobs, self.top)


def sample(samplers: Sequence[Sampler | None], logits: torch.Tensor) -> tuple[list[int], dict]:
    """The next token of every row of logits [R, V] (rows without a running sampler get the
    argmax and are ignored), and {row: (logprob, top)} for the rows whose params ask for
    log-probs, both under the raw model distribution. One host copy of the tokens."""
    logits = logits.float()
    nxt = logits.argmax(-1)
    running = [i for i, s in enumerate(samplers) if s is not None and s.finish is None]
    shared: dict[tuple, list[int]] = {}
    for i in running:   # each sampled row has its own parameters and generator
        s = samplers[i]
        if s.params.temperature > 0 and s.seen is None:
            shared.setdefault((s.params.temperature, s.params.top_k, s.params.top_p), []).append(i)
        elif not s.greedy:
            nxt[i] = s.choose(logits[i:i + 1])[0]
    for rows in shared.values():
        # Rows with the same filters: one pass over their logits, then a draw from each row's own
        # generator. torch.multinomial draws one sample as argmax(p / q), q ~ Exp(1) (aten's
        # Distributions.cpp), so these are exactly the tokens choose() draws, with fewer calls.
        idx = torch.tensor(rows, device=logits.device)
        probs = process_logits(logits[idx], samplers[rows[0]].params).softmax(-1)
        noise = torch.stack([torch.empty_like(probs[0]).exponential_(generator=samplers[i].rng) for i in rows])
        nxt[idx] = (probs / noise).argmax(-1)
    want = [i for i in running if samplers[i].params.logprobs is not None]
    if not want:
        return nxt.tolist(), {}
    idx = torch.tensor(want, device=logits.device)
    logp = torch.log_softmax(logits[idx], dim=-1)
    chosen = logp.gather(1, nxt[idx][:, None])[:, 0].tolist()
    k = max(samplers[i].params.logprobs for i in want)
    top = logp.topk(k, dim=-1) if k else None
    top_ids, top_lps = (top.indices.tolist(), top.values.tolist()) if top is not None else (None, None)
    out = {}
    for j, i in enumerate(want):
        kk = samplers[i].params.logprobs
        out[i] = (chosen[j], list(zip(top_ids[j][:kk], top_lps[j][:kk])) if kk else [])
    return nxt.tolist(), out


def prefill(model, cache, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Append prompts[r] to row r of `cache` (rows of any length; the batch is right-padded)
    and return the logits [R, V] that follow each row's last token."""
    lengths = [len(p) for p in prompts]
    T = max(lengths)
    tokens = torch.zeros(len(prompts), T, dtype=torch.long)
    for r, p in enumerate(prompts):
        tokens[r, :len(p)] = torch.as_tensor(p, dtype=torch.long)
    before = cache.lengths.clone()
    last = torch.tensor(lengths) - 1
    logits = model(tokens.to(model.device), cache, logits_at=last)[:, -1]
    cache.lengths.copy_(before + torch.tensor(lengths))   # the padding's keys are beyond each row's end
    return logits


def decode_step(model, cache, tokens: torch.Tensor) -> torch.Tensor:
    """Append one token per row (LongTensor [R]) and return the logits [R, V] that follow; through
    the model's compiled step when compile_decoding() gave it one and the cache is static."""
    step = getattr(model, "compiled_decode", None)
    if step is None or not cache.static:
        return model(tokens.to(model.device)[:, None], cache, last_only=True)[:, -1]
    write = cache.plan(1, model.device)
    try:
        logits = step(tokens.to(model.device), cache, write)
    except Exception as e:   # the compiler is missing or failed: say so once, then decode eagerly
        import warnings
        warnings.warn(f"compiled decoding failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "decoding without compilation", stacklevel=2)
        model.compiled_decode = None
        logits = model.decode(tokens.to(model.device), cache, write)
    cache.lengths += 1
    return logits.clone()        # (CUDA graphs reuse their output buffer)


def compile_decoding(model, mode: str | None = None):
    """Give `model` one compiled decode step over a static KV cache (torch.compile of
    Transformer.decode, fixed shapes: one graph per batch size and cache length; on GPU with
    CUDA graphs, mode "reduce-overhead"); decode_step and every driver then use it. The cache
    becomes static (model.new_cache), so rows of different lengths still decode together.
    Compilation happens at the first step; if the compiler is unavailable or fails there, a
    warning says so and decoding continues uncompiled. Returns the model."""
    if mode is None:
        mode = "reduce-overhead" if model.device.type == "cuda" else "default"
    model.compiled_decode = torch.compile(model.decode, mode=mode, dynamic=False)
    return model


def check_prompts(prompts, params: Sequence[SamplingParams], config, tokenizer) -> None:
    """Raise GenerationError for any request that cannot run: an empty prompt, ids outside the
    vocabulary, no room in the context (no silent clamping), stop strings without a tokenizer."""
    limit, V = config.max_seq_len, config.vocab_size
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        n = p.max_new_tokens
        if len(prompt) == 0:
            raise GenerationError(f"prompt {i} is empty; generation needs at least one token")
        if min(prompt) < 0 or max(prompt) >= V:
            raise GenerationError(f"prompt token ids must be in [0, {V}) (the vocabulary size)")
        if len(prompt) >= limit:
            raise GenerationError(f"prompt {i} has {len(prompt)} tokens; the model's context is {limit} "
                                  f"(max_seq_len), leaving no room to generate")
        if len(prompt) + n > limit:
            raise GenerationError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={n} that exceeds "
                                  f"the model's context of {limit} (max_seq_len); lower max_new_tokens "
                                  f"to at most {limit - len(prompt)}")
        if p.stop_strings and tokenizer is None:
            raise GenerationError("stop_strings need a tokenizer (an object with decode(list[int]) -> str)")


def row_seed(seed: int | None, row: int) -> int | None:
    """Row r of a batch given one seed samples with seed + r (as the server's n > 1 does)."""
    return None if seed is None else seed + row


@torch.inference_mode()
def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
             *, on_token: Callable[[int, int], None] | None = None, tokenizer=None, **overrides) -> list[Completion]:
    """Generate a continuation of every prompt; returns one Completion per prompt, in order.

    `params` (one for all prompts, or one per prompt) and/or keyword overrides (any
    SamplingParams field) say how. Every sampled row draws from its own generator: with one
    params for all, row r is seeded with seed + r; with one per prompt, each with its own seed.
    So a row gives exactly what it gives alone with that seed (and what the serving engine
    gives for the same request). `on_token(row, token_id)` is called for each emitted
    token as it is produced. A request that does not fit the context raises GenerationError:
    every prompt must be non-empty and have len(prompt) + max_new_tokens <= max_seq_len. The
    model runs in eval mode (its previous mode is restored afterwards).
    """
    prompts = [[int(t) for t in p] for p in prompts]
    shared = params is None or isinstance(params, SamplingParams)
    if shared:
        params = [dataclasses.replace(params or SamplingParams(), **overrides)] * len(prompts)
    else:
        params = [dataclasses.replace(p, **overrides) for p in params]
    check_prompts(prompts, params, model.config, tokenizer)
    if not prompts:
        return []
    device = model.device
    samplers = [Sampler(pr, p, model.config, tokenizer, device, row_seed(p.seed, r) if shared else p.seed)
                for r, (pr, p) in enumerate(zip(prompts, params))]
    for s in samplers:
        if s.params.max_new_tokens == 0:
            s.finish = ("length", None)
    if all(s.finish for s in samplers):
        return [s.completion() for s in samplers]
    was_training = model.training
    model.eval()
    try:
        # finished rows keep decoding dummy tokens until every row is done
        cache = model.new_cache(len(prompts), max(map(len, prompts)) + max(p.max_new_tokens for p in params))
        logits = prefill(model, cache, prompts)
        while True:
            tokens, lps = sample(samplers, logits)
            for r, s in enumerate(samplers):
                if s.finish is None and s.accept(tokens[r], lps.get(r)) and on_token is not None:
                    on_token(r, tokens[r])
            if all(s.finish for s in samplers):
                return [s.completion() for s in samplers]
            logits = decode_step(model, cache, torch.tensor(tokens))   # finished rows decode a dummy
    finally:
        model.train(was_training)


def fit_prompt(ids: list[int], max_new_tokens: int, context: int, min_room: int | None = None) -> tuple[list[int], int]:
    """(prompt, tokens to generate) that fit `context`: the prompt keeps its last tokens so that
    room = min(max_new_tokens, min_room) tokens remain (min_room None: all of max_new_tokens, as
    lm-eval truncates), and generation gets whatever room the kept prompt leaves, up to
    max_new_tokens."""
    room = max_new_tokens if min_room is None else min(max_new_tokens, max(min_room, 1))
    if room >= context:
        raise GenerationError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                              f"context of {context} tokens; lower it")
    if len(ids) > context - room:
        ids = ids[-(context - room):]
    return ids, min(max_new_tokens, context - len(ids))


def encode_prompt(tokenizer, prompt: str | list) -> list[int]:
    """Token ids of a text (encoded with special tokens), a chat (a list of {role, content}
    messages, rendered with the generation prompt) or ids already (a list of ints)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    return [int(t) for t in prompt]


def generate_text(model, tokenizer, prompts: Sequence[str | list], params: SamplingParams | Sequence[SamplingParams],
                  *, context: int | None = None, min_room: int | None = None, batch_size: int = 16,
                  on_done: Callable[[int], None] | None = None) -> list[str]:
    """Continuations of prompts (texts, chats or token ids: see encode_prompt), decoded and cut
    before the first stop string. Prompts are left-truncated to fit `context` (default the model's) by
    `fit_prompt`; requests run `batch_size` at a time, longest first, each with its own
    parameters and seed, so a request's text does not depend on its batch. `on_done(n)` is
    called after each batch (progress bars)."""
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    context = min(context or model.config.max_seq_len, model.config.max_seq_len)
    fitted = []
    for prompt, p in zip(prompts, params):
        ids = encode_prompt(tokenizer, prompt)
        ids, n = fit_prompt(ids, p.max_new_tokens, context, min_room)
        fitted.append((ids, dataclasses.replace(p, max_new_tokens=n)))
    order = sorted(range(len(prompts)), key=lambda i: -len(fitted[i][0]))
    texts: list[str] = [""] * len(prompts)
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        outs = generate(model, [fitted[i][0] for i in rows], [fitted[i][1] for i in rows], tokenizer=tokenizer)
        for i, c in zip(rows, outs):
            text = tokenizer.decode(c.tokens)
            for s in params[i].stop_strings:
                text = text.split(s)[0]
            texts[i] = text
        if on_done is not None:
            on_done(len(rows))
    return texts
