"""Batched autoregressive generation with a static KV cache.

    from lmfoundry.generate import generate, SamplingParams
    outs = generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=32, temperature=0)
    outs[0].tokens, outs[0].finish_reason          # [...], "stop" or "length"

Prompts of different lengths are left-padded into one batch, prefilled once, then decoded
one token per step for the whole batch. Logits are processed with transformers' semantics
and order (repetition penalty, temperature, top-k, top-p), so greedy and per-step
distributions can be compared with `transformers.generate`.
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
    """
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_ids: Iterable[int] | int | None = None
    stop_strings: Sequence[str] = ()
    seed: int | None = None

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
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationError(f"{message}; got {self!r}")


@dataclass
class Completion:
    """One prompt's result. tokens excludes the prompt and any stop id, and ends with the
    token that completed a stop string. finish_reason is "stop" (stop id or stop string;
    `stop` says which) or "length" (max_new_tokens reached)."""
    tokens: list[int]
    finish_reason: str
    stop: int | str | None = None


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


def _stop_id_tuple(stop_ids, cfg) -> tuple[int, ...]:
    ids = cfg.eos_token_id if stop_ids is None else stop_ids
    if ids is None:
        return ()
    return (int(ids),) if isinstance(ids, int) else tuple(int(i) for i in ids)


def _check(prompts, params: SamplingParams, cfg, tokenizer) -> None:
    limit, n = cfg.max_seq_len, params.max_new_tokens
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {i} is empty; generation needs at least one token")
        if len(prompt) >= limit:
            raise GenerationError(f"prompt {i} has {len(prompt)} tokens; the model's context is {limit} "
                                  f"(max_seq_len), leaving no room to generate")
        if len(prompt) + n > limit:
            raise GenerationError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={n} that exceeds "
                                  f"the model's context of {limit} (max_seq_len); lower max_new_tokens "
                                  f"to at most {limit - len(prompt)}")
    if params.stop_strings and tokenizer is None:
        raise GenerationError("stop_strings need a tokenizer (an object with decode(list[int]) -> str)")


@torch.inference_mode()
def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, *,
             on_token: Callable[[int, int], None] | None = None, tokenizer=None, **overrides) -> list[Completion]:
    """Generate a continuation of every prompt; returns one Completion per prompt, in order.

    `params` and/or keyword overrides (any SamplingParams field) say how. `on_token(row,
    token_id)` is called for each accepted token as it is produced (stop ids are not
    accepted; the token completing a stop string is). A request that does not fit the
    context raises GenerationError: every prompt must be non-empty and have
    len(prompt) + max_new_tokens <= model.config.max_seq_len (no silent clamping).
    The model runs in eval mode (its previous mode is restored afterwards).
    """
    params = dataclasses.replace(params or SamplingParams(), **overrides)
    cfg = model.config
    prompts = [list(map(int, p)) for p in prompts]
    _check(prompts, params, cfg, tokenizer)
    if not prompts or params.max_new_tokens == 0:
        return [Completion([], "length") for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        return _decode(model, prompts, params, _stop_id_tuple(params.stop_ids, cfg), on_token, tokenizer)
    finally:
        model.train(was_training)


def _decode(model, prompts, params, stop_ids, on_token, tokenizer) -> list[Completion]:
    device, V = model.device, model.config.vocab_size
    B, N, T = len(prompts), params.max_new_tokens, max(map(len, prompts))
    pad = torch.tensor([T - len(p) for p in prompts])
    tokens = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    if int(tokens.min()) < 0 or int(tokens.max()) >= V:
        raise GenerationError(f"prompt token ids must be in [0, {V}) (the vocabulary size)")
    tokens, pad = tokens.to(device), pad.to(device)
    is_pad = torch.arange(T, device=device)[None] < pad[:, None]

    seen = None   # [B, V]: tokens the repetition penalty applies to (pads go to an extra column)
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=device)
        seen = seen.scatter_(1, tokens.masked_fill(is_pad, V), True)[:, :V].contiguous()
    rng = None if params.seed is None else torch.Generator(device).manual_seed(params.seed)
    stop_t = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None

    out = torch.zeros(B, N, dtype=torch.long, device=device)   # every row's token at every step
    n_out = torch.zeros(B, dtype=torch.long, device=device)    # accepted tokens per row
    done = torch.zeros(B, dtype=torch.bool, device=device)
    host = on_token is not None or bool(params.stop_strings)
    texts: list[list[int]] = [[] for _ in range(B)]             # host copies, for stop strings
    stopped_by: dict[int, str] = {}
    window = 4 * max(map(len, params.stop_strings), default=0) + 4   # tokens decoded per check

    cache = model.new_cache(B, T + N, pad=pad)
    logits = model(tokens, cache, last_only=True)[:, -1]
    for step in range(N):
        scores = process_logits(logits.float(), params, seen)
        if params.temperature == 0:
            nxt = scores.argmax(-1)
        else:
            nxt = torch.multinomial(scores.softmax(-1), 1, generator=rng).squeeze(1)
        out[:, step] = nxt
        accept = ~done if stop_t is None else ~done & ~torch.isin(nxt, stop_t)
        n_out += accept
        done = ~accept   # rows that were done, or hit a stop id now
        if host:   # one device->host copy per step, then per-row work only where asked for
            toks, accepted = torch.stack((nxt, accept.long())).tolist()
            for i in (i for i in range(B) if accepted[i]):
                if on_token is not None:
                    on_token(i, toks[i])
                if params.stop_strings:
                    texts[i].append(toks[i])
                    text = tokenizer.decode(texts[i][-window:])
                    hit = next((s for s in params.stop_strings if s in text), None)
                    if hit is not None:
                        stopped_by[i] = hit
                        done[i] = True
        can_stop = stop_t is not None or bool(stopped_by)
        if step == N - 1 or (can_stop and bool(done.all())):   # one sync per step, if rows can stop
            break
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        logits = model(nxt[:, None], cache, last_only=True)[:, -1]   # finished rows decode a dummy

    out, n_out, done = out.tolist(), n_out.tolist(), done.tolist()
    results = []
    for i in range(B):
        toks = out[i][:n_out[i]]
        if i in stopped_by:
            results.append(Completion(toks, "stop", stopped_by[i]))
        elif done[i]:
            results.append(Completion(toks, "stop", out[i][n_out[i]]))
        else:
            results.append(Completion(toks, "length"))
    return results
