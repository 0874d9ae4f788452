"""Scoring primitives shared by evaluation and serving.

    token_logprobs(model, sequences)        log p(token_t | tokens_<t) for every token after the first
    loglikelihood(model, requests)          (sum of continuation log-probs, would greedy produce it)

Sequences are sorted by length and right-padded into batches. With right padding a causal
model needs no mask (padding only ever follows real tokens), so a sequence's scores do not
depend on what it is batched with beyond floating-point summation order.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import GenerationError


@torch.inference_mode()
def token_logprobs(model, sequences: Sequence[Sequence[int]], batch_size: int = 16,
                   top_k: int = 0) -> list[dict]:
    """For each sequence: {"logprobs": [T-1] log-probs of tokens 1..T-1, "greedy": [T-1] bool
    whether each token was the argmax, and with top_k > 0 "top": ([T-1, k] ids, [T-1, k] logprobs)}.
    Computed in fp32 from the model's logits; the model runs in eval mode."""
    limit, V = model.config.max_seq_len, model.config.vocab_size
    for i, s in enumerate(sequences):
        if len(s) < 2:
            raise GenerationError(f"sequence {i} needs at least 2 tokens to score, has {len(s)}")
        if len(s) > limit:
            raise GenerationError(f"sequence {i} has {len(s)} tokens; the model's context is {limit}")
        if min(s) < 0 or max(s) >= V:
            raise GenerationError(f"sequence {i} has token ids outside [0, {V})")
    was_training = model.training
    model.eval()
    results: list[dict | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    try:
        for b in range(0, len(order), batch_size):
            rows = order[b:b + batch_size]
            T = len(sequences[rows[0]])
            batch = torch.zeros(len(rows), T, dtype=torch.long)
            for r, i in enumerate(rows):
                batch[r, :len(sequences[i])] = torch.tensor(sequences[i])
            logp = F.log_softmax(model(batch.to(model.device))[:, :-1].float(), dim=-1)
            target = batch[:, 1:].to(logp.device)
            picked = logp.gather(-1, target[..., None])[..., 0]
            greedy = logp.argmax(-1) == target
            top = logp.topk(top_k, dim=-1) if top_k else None
            for r, i in enumerate(rows):
                n = len(sequences[i]) - 1
                results[i] = {"logprobs": picked[r, :n].cpu(), "greedy": greedy[r, :n].cpu()}
                if top is not None:
                    results[i]["top"] = (top.indices[r, :n].cpu(), top.values[r, :n].cpu())
    finally:
        model.train(was_training)
    return results


def loglikelihood(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                  batch_size: int = 16) -> list[tuple[float, bool]]:
    """For each (context, continuation) pair of token lists: the summed log-probability of the
    continuation given the context, and whether greedy decoding would produce it exactly."""
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise GenerationError(f"request {i}: context and continuation must both be non-empty")
    scored = token_logprobs(model, [list(c) + list(x) for c, x in requests], batch_size)
    out = []
    for (ctx, cont), s in zip(requests, scored):
        n = len(cont)
        out.append((float(s["logprobs"][-n:].double().sum()), bool(s["greedy"][-n:].all())))
    return out
