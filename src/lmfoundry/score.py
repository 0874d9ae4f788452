"""Scoring primitives shared by evaluation and serving.

    token_logprobs(model, sequences)        log p(token_t | tokens_<t) for every token after the first
    loglikelihood(model, requests)          (sum of continuation log-probs, would greedy produce it)
    loglikelihood_shared(model, requests)   the same numbers, each shared context run once (KV reuse)
    loglikelihood_direct(model, requests)   the same numbers, feeding context + continuation[:-1]
    rolling_loglikelihood(model, tokens, prefix_token)   a whole document in disjoint windows

Sequences are sorted by length and right-padded into batches. With right padding a causal
model needs no mask (padding only ever follows real tokens), so a sequence's scores do not
depend on what it is batched with beyond floating-point summation order.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import GenerationError
from .generate import prefill


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


# ---------------------------------------------------------------------------------------------
# Shared-prefix scoring (multiple choice with KV-cache reuse) and direct window scoring.
#
#     loglikelihood_shared(model, requests, groups=None)   same results as loglikelihood, but
#         each group of requests (by default: requests with the same context) runs its common
#         prefix through the model once; the KV cache is then copied across the group's rows and
#         only the remainders (the continuations, plus whatever context tokens differ) are run,
#         right-padded. Logits are only computed where a continuation token is predicted.
#     loglikelihood_direct(model, requests)   ctx + cont[:-1] is fed (so len(ctx) + len(cont) may
#         reach max_seq_len + 1, as lm-eval's windows do); no prefix sharing.
#     rolling_loglikelihood(model, tokens, prefix_token)   a whole document in disjoint windows,
#         every token predicted once (lm-eval's loglikelihood_rolling); returns (sum, n_tokens).
# ---------------------------------------------------------------------------------------------

def _check_requests(model, requests, what="request"):
    limit, V = model.config.max_seq_len, model.config.vocab_size
    for i, (ctx, cont) in enumerate(requests):
        if len(ctx) == 0 or len(cont) == 0:
            raise GenerationError(f"{what} {i}: context and continuation must both be non-empty")
        n = len(ctx) + len(cont) - 1
        if n > limit:
            raise GenerationError(f"{what} {i}: context + continuation feed {n} tokens; the model's context is "
                                  f"{limit} (truncate the context first)")
        lo, hi = min(min(ctx), min(cont)), max(max(ctx), max(cont))
        if lo < 0 or hi >= V:
            raise GenerationError(f"{what} {i}: token ids outside [0, {V})")


def _common_prefix(seqs) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def _sum_and_greedy(logp: torch.Tensor, targets: torch.Tensor) -> tuple[float, bool]:
    """logp [n, V] fp32 log-probs at the positions predicting `targets` [n]."""
    picked = logp.gather(-1, targets[:, None])[:, 0]
    return float(picked.double().sum()), bool((logp.argmax(-1) == targets).all())


@torch.inference_mode()
def loglikelihood_direct(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 16,
                         on_batch: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum of continuation log-probs, greedy?) for each (context, continuation), feeding
    context + continuation[:-1] right-padded, longest first (batch-invariant like token_logprobs)."""
    requests = [(list(c), list(x)) for c, x in requests]
    _check_requests(model, requests)
    was_training = model.training
    model.eval()
    out: list = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    try:
        for b in range(0, len(order), batch_size):
            rows = order[b:b + batch_size]
            fed = [requests[i][0] + requests[i][1][:-1] for i in rows]
            T = max(map(len, fed))
            batch = torch.zeros(len(rows), T, dtype=torch.long)
            for r, s in enumerate(fed):
                batch[r, :len(s)] = torch.tensor(s)
            logits = model(batch.to(model.device))
            for r, i in enumerate(rows):
                ctx, cont = requests[i]
                end = len(fed[r])
                logp = F.log_softmax(logits[r, end - len(cont):end].float(), dim=-1)
                out[i] = _sum_and_greedy(logp, torch.tensor(cont, device=logp.device))
            if on_batch is not None:
                on_batch(len(rows))
    finally:
        model.train(was_training)
    return out


@torch.inference_mode()
def loglikelihood_shared(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 16,
                         groups: Sequence | None = None,
                         on_batch: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """Like `loglikelihood`, computing each group's shared prefix once.

    `groups[i]` is a hashable key; requests with equal keys share a prefix (the longest common
    token prefix of their context+continuation, never extending into a continuation). By default
    requests with identical context tokens form a group, which is multiple-choice scoring.
    The prefixes of a batch are prefilled right-padded into a KV cache with one length per row,
    the cache is copied across each group's rows and the remainders run right-padded after each
    row's own prefix, so every row computes what it would alone (batch-invariant to ~1e-6 in fp32).
    `batch_size` bounds the rows of every forward: up to batch_size groups are prefilled together,
    then their requests run batch_size at a time, longest remainder first.
    """
    requests = [(list(c), list(x)) for c, x in requests]
    _check_requests(model, requests)
    if groups is None:
        groups = [tuple(c) for c, _ in requests]
    if len(groups) != len(requests):
        raise GenerationError(f"groups has {len(groups)} entries for {len(requests)} requests")
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    # (prefix length, request indices); a group whose sequences share no first token is split
    units: list[tuple[int, list[int]]] = []
    for idx in members.values():
        seqs = [requests[i][0] + requests[i][1] for i in idx]
        p = min(_common_prefix(seqs), min(len(requests[i][0]) for i in idx))
        if p == 0:
            units.extend((len(requests[i][0]), [i]) for i in idx)
        else:
            units.append((p, idx))

    def remainder(i, p):   # tokens fed after the prefix: the rest of ctx + cont, without cont's last token
        ctx, cont = requests[i]
        return (ctx + cont)[p:-1]

    # Up to batch_size groups are prefilled together (longest prefixes first); their rows are then
    # sorted by remainder length and run batch_size at a time, so neither pass pads much.
    units.sort(key=lambda u: -u[0])
    was_training = model.training
    model.eval()
    out: list = [None] * len(requests)
    try:
        for b in range(0, len(units), batch_size):
            _shared_batch(model, requests, units[b:b + batch_size], remainder, out, batch_size, on_batch)
    finally:
        model.train(was_training)
    return out


def _shared_batch(model, requests, batch, remainder, out, batch_size, on_batch):
    device = model.device
    G = len(batch)
    P = max(p for p, _ in batch)
    cache = model.new_cache(G, P)
    last = prefill(model, cache, [requests[idx[0]][0][:p] for p, idx in batch])   # [G, V]: predicts token p
    rows = sorted(((g, i, remainder(i, batch[g][0])) for g, (_, idx) in enumerate(batch) for i in idx),
                  key=lambda row: -len(row[2]))
    for c in range(0, len(rows), batch_size):
        chunk = rows[c:c + batch_size]
        R = len(chunk[0][2])
        rem_logits = None
        if R > 0:
            row_map = torch.tensor([g for g, _, _ in chunk])
            sub = model.new_cache(len(chunk), P + R)
            for layer in range(len(sub.k)):
                sub.k[layer][:, :, :P] = cache.k[layer].index_select(0, row_map.to(device))
                sub.v[layer][:, :, :P] = cache.v[layer].index_select(0, row_map.to(device))
            sub.lengths.copy_(cache.lengths.index_select(0, row_map))
            rem = torch.zeros(len(chunk), R, dtype=torch.long)
            for r, (_, _, toks) in enumerate(chunk):
                if toks:
                    rem[r, :len(toks)] = torch.tensor(toks)
            rem_logits = model(rem.to(device), sub)                           # [n, R, V]
        for r, (g, i, _) in enumerate(chunk):
            p = batch[g][0]
            ctx, cont = requests[i]
            first = len(ctx) - 1          # position (in ctx + cont) whose logits predict cont[0]
            parts = []
            if first == p - 1:
                parts.append(last[g:g + 1])
                first += 1
            if first < len(ctx) + len(cont) - 1:
                parts.append(rem_logits[r, first - p:len(ctx) + len(cont) - 1 - p])
            logp = F.log_softmax(torch.cat(parts).float(), dim=-1)
            out[i] = _sum_and_greedy(logp, torch.tensor(cont, device=logp.device))
        if on_batch is not None:
            on_batch(len(chunk))


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) windows that predict every token of `tokens` exactly
    once: the first is conditioned on `prefix_token`, each later one on the max_len tokens
    before its end (lm-eval's get_rolling_token_windows + make_disjoint_window, context_len=1)."""
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        inp = tokens[max(end - max_len - 1, 0):end - 1]
        windows.append((inp[:len(inp) - (n - 1)], tokens[done:end]))
        done = end
    return windows


def rolling_loglikelihood(model, tokens: Sequence[int], prefix_token: int, batch_size: int = 16,
                          max_len: int | None = None) -> tuple[float, int]:
    """(total log-probability, number of tokens predicted) of a whole document."""
    windows = rolling_windows(tokens, prefix_token, max_len or model.config.max_seq_len)
    if not windows:
        return 0.0, 0
    scores = loglikelihood_direct(model, windows, batch_size)
    return sum(s for s, _ in scores), len(tokens)
