"""Scoring primitives against transformers' log-softmax and across batch compositions."""
import torch

from conftest import hf_llama, random_tokens
from lmfoundry.checkpoint import load_model
from lmfoundry.score import loglikelihood, token_logprobs


def test_token_logprobs_match_transformers(tmp_path):
    ref = hf_llama()
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    seq = random_tokens(1, 30)[0].tolist()
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([seq])).logits[0, :-1].float(), -1)
    want = logp.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
    (got,) = token_logprobs(model, [seq])
    assert (got["logprobs"] - want).abs().max() <= 1e-4
    assert torch.equal(got["greedy"], logp.argmax(-1) == torch.tensor(seq[1:]))


def test_loglikelihood_is_batch_invariant(tmp_path):
    hf_llama().save_pretrained(tmp_path)
    model = load_model(tmp_path)
    reqs = [(random_tokens(1, n, seed=n)[0].tolist(), random_tokens(1, 5, seed=100 + n)[0].tolist())
            for n in (3, 17, 9, 40, 1, 25)]
    alone = [loglikelihood(model, [r], batch_size=1)[0] for r in reqs]
    together = loglikelihood(model, reqs, batch_size=4)
    for (a, ga), (b, gb) in zip(alone, together):
        assert abs(a - b) <= 1e-5 and ga == gb


def test_greedy_flag_agrees_with_generation(tmp_path):
    from lmfoundry.generate import generate
    hf_llama().save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ctx = random_tokens(1, 8)[0].tolist()
    (c,) = generate(model, [ctx], max_new_tokens=6, temperature=0.0, stop_ids=())
    assert loglikelihood(model, [(ctx, c.tokens)])[0][1] is True
    other = [(t + 1) % 128 for t in c.tokens]
    assert loglikelihood(model, [(ctx, other)])[0][1] is False


# ---- shared-prefix (KV reuse) scoring, direct windows, rolling documents ----
from lmfoundry.score import (loglikelihood_direct, loglikelihood_shared, rolling_loglikelihood,  # noqa: E402
                             rolling_windows)


def _mc_requests():
    """Six contexts of different lengths, four continuations each (1 to 7 tokens)."""
    reqs = []
    for n in (3, 17, 9, 40, 1, 25):
        ctx = random_tokens(1, n, seed=n)[0].tolist()
        for c in range(4):
            reqs.append((ctx, random_tokens(1, 1 + (3 * c + n) % 7, seed=1000 + 10 * n + c)[0].tolist()))
    return reqs


def test_shared_prefix_scoring_equals_the_plain_path(tmp_path):
    """Each context prefilled once, its KV cache copied across the choices: same numbers (fp32, 1e-5)."""
    hf_llama().save_pretrained(tmp_path)
    model = load_model(tmp_path)
    reqs = _mc_requests()
    plain = loglikelihood(model, reqs, batch_size=1)
    for bs in (1, 3, 4, 64):
        shared = loglikelihood_shared(model, reqs, batch_size=bs)
        direct = loglikelihood_direct(model, reqs, batch_size=bs)
        for (a, ga), (b, gb), (c, gc) in zip(plain, shared, direct):
            assert abs(a - b) <= 1e-5 and abs(a - c) <= 1e-5
            assert ga == gb == gc


def test_shared_prefix_scoring_is_batch_invariant(tmp_path):
    hf_llama().save_pretrained(tmp_path)
    model = load_model(tmp_path)
    reqs = _mc_requests()
    alone = [loglikelihood_shared(model, [r], batch_size=1)[0] for r in reqs]
    for bs in (2, 5, 24):
        together = loglikelihood_shared(model, reqs, batch_size=bs)
        assert max(abs(a[0] - b[0]) for a, b in zip(alone, together)) <= 1e-5
        assert [a[1] for a in alone] == [b[1] for b in together]


def test_shared_prefix_with_explicit_groups_partial_scoring(tmp_path):
    """Winogrande-style: different contexts, a shared token prefix, one continuation."""
    hf_llama().save_pretrained(tmp_path)
    model = load_model(tmp_path)
    pre = random_tokens(1, 30, seed=5)[0].tolist()
    reqs = [(pre + [7, 8], [1, 2, 3]), (pre + [9], [1, 2, 3]), (pre + [7, 8, 9, 10], [4]), ([5] + pre, [6]),
            (pre, [11, 12])]
    plain = loglikelihood(model, reqs, batch_size=1)
    shared = loglikelihood_shared(model, reqs, groups=[0] * len(reqs), batch_size=8)
    assert max(abs(a[0] - b[0]) for a, b in zip(plain, shared)) <= 1e-5


def test_shared_scoring_matches_transformers_log_softmax(tmp_path):
    ref = hf_llama()
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ctx = random_tokens(1, 12, seed=3)[0].tolist()
    conts = [random_tokens(1, k, seed=50 + k)[0].tolist() for k in (1, 2, 5)]
    got = loglikelihood_shared(model, [(ctx, c) for c in conts])
    for c, (score, greedy) in zip(conts, got):
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([ctx + c])).logits[0].float(), -1)
        pos = torch.arange(len(ctx) - 1, len(ctx) + len(c) - 1)
        want = logp[pos, torch.tensor(c)].double().sum().item()
        assert abs(score - want) <= 1e-4
        assert greedy == bool((logp[pos].argmax(-1) == torch.tensor(c)).all())


def test_rolling_windows_predict_every_token_once():
    toks = list(range(10, 33))   # 23 tokens, windows of 8
    windows = rolling_windows(toks, prefix_token=1, max_len=8)
    predicted = [t for _, cont in windows for t in cont]
    assert predicted == toks
    assert windows[0] == ([1], toks[:8])
    for ctx, cont in windows:
        assert len(ctx) + len(cont) - 1 <= 8            # what is fed fits the window
        if ctx != [1]:
            assert len(ctx) + len(cont) - 1 == 8        # later windows keep the full context
            assert ctx + cont == toks[toks.index(cont[-1]) - 8:toks.index(cont[-1]) + 1]


def test_rolling_loglikelihood_single_window_equals_direct_sum(tmp_path):
    hf_llama().save_pretrained(tmp_path)
    model = load_model(tmp_path)
    toks = random_tokens(1, 20, seed=9)[0].tolist()
    total, n = rolling_loglikelihood(model, toks, prefix_token=0)
    (lp,) = token_logprobs(model, [[0] + toks])
    assert n == 20 and abs(total - float(lp["logprobs"].double().sum())) <= 1e-4
