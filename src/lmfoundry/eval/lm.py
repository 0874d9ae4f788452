"""The two evaluation primitives on strings: `loglikelihood` and `generate_until`.

    lm = LM.load("path/to/checkpoint")                       # or LM(model, tokenizer)
    lm.loglikelihood([("Question: 2+2?\\nAnswer:", " 4")])    # [(sum log p, greedy?)]
    lm.generate_until([("Question: ...\\nAnswer:", {"until": ["Question:"], "max_gen_toks": 256})])
    lm.loglikelihood_rolling(["a whole document"])           # [sum log p over every token]

Tokenization follows lm-evaluation-harness (TemplateLM._encode_pair): trailing whitespace of
the context moves to the front of the continuation; context+continuation is encoded as one
string and the continuation is what follows the separately encoded context, so the BPE merge at
the boundary is the one whole-string tokenization makes. BOS follows the tokenizer's own
post-processor (transformers' default, and lm-eval's since PR #3347), except that a string
which already starts with the BOS text gets no second BOS. An empty context is replaced by the
prefix token (BOS, else EOS). A request longer than the model's context is left-truncated
(the context loses its first tokens), as lm-eval does.

Requests are scored batched and sorted by length; multiple-choice requests with the same context
(or an explicit group) share one prefill through `score.loglikelihood_shared`.
"""
from __future__ import annotations

from typing import Sequence

from .. import score
from ..errors import GenerationError
from ..generate import SamplingParams, generate_text


class LM:
    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None,
                 share_prefix: bool = True, progress: bool = True, name: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.config.max_seq_len)
        self.share_prefix = share_prefix
        self.progress = progress
        self.name = name or "model"
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.config.bos_token_id
        eos = tokenizer.eos_token_id
        if eos is None:
            cfg_eos = model.config.eos_token_id
            eos = cfg_eos[0] if isinstance(cfg_eos, (list, tuple)) and cfg_eos else cfg_eos
        self.eos_token_id = eos
        self.prefix_token_id = bos if bos is not None else eos
        if self.prefix_token_id is None:
            raise GenerationError("the tokenizer has neither a BOS nor an EOS token to condition an empty context on")

    @classmethod
    def load(cls, path, dtype=None, device=None, quantize=None, compile=False, adapter=None, **kw) -> "LM":
        from ..quantize import load_for_inference
        from ..tokenizer import load_tokenizer
        model = load_for_inference(path, dtype=dtype, quantize_method=quantize, device=device, compile=compile,
                                   adapter=adapter)
        return cls(model, load_tokenizer(path), name=str(path), **kw)

    # ---- tokenization ----
    def tok_encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and text.startswith(bos))
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation), split where lm-eval splits them."""
        if context == "":
            cont = self.tok_encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    def _fit(self, ctx: list[int], cont: list[int], where: str) -> tuple[list[int], list[int]]:
        """Left-truncate so that at most max_length tokens are fed (ctx + cont[:-1])."""
        if not cont:
            raise GenerationError(f"{where}: the continuation is empty after tokenization")
        if len(cont) > self.max_length:
            raise GenerationError(f"{where}: the continuation alone has {len(cont)} tokens; the model's context "
                                  f"is {self.max_length}")
        keep = self.max_length + 1 - len(cont)
        return (ctx[-keep:] if len(ctx) > keep else ctx), cont

    # ---- primitives ----
    def loglikelihood(self, requests: Sequence[tuple[str, str]], groups: Sequence | None = None,
                      desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), would greedy decoding produce it) per request.
        `groups` (one hashable key per request) lets requests with different contexts share
        their common token prefix (Winogrande's partial scoring); by default requests with the
        same context are scored as one multiple-choice group."""
        encoded = [self._fit(*self.encode_pair(c, x), f"request {i}") for i, (c, x) in enumerate(requests)]
        return self.loglikelihood_tokens(encoded, groups, desc)

    def loglikelihood_tokens(self, encoded, groups=None, desc="loglikelihood"):
        with Progress(len(encoded), desc, self.progress) as bar:
            if self.share_prefix:
                return score.loglikelihood_shared(self.model, encoded, self.batch_size, groups=groups,
                                                  on_batch=bar.update)
            return score.loglikelihood_direct(self.model, encoded, self.batch_size, on_batch=bar.update)

    def loglikelihood_rolling(self, texts: Sequence[str], desc: str = "perplexity") -> list[tuple[float, int]]:
        """(total log-probability, number of tokens) of each whole text: its tokens (no special
        tokens added) in disjoint windows of max_length, the first conditioned on the prefix token."""
        windows, owner = [], []
        for k, text in enumerate(texts):
            toks = self.tok_encode(text, add_special_tokens=False)
            for w in score.rolling_windows(toks, self.prefix_token_id, self.max_length):
                windows.append(w)
                owner.append(k)
        totals = [[0.0, 0] for _ in texts]
        with Progress(len(windows), desc, self.progress) as bar:
            scored = score.loglikelihood_direct(self.model, windows, self.batch_size, on_batch=bar.update)
        for k, (ctx, cont), (s, _) in zip(owner, windows, scored):
            totals[k][0] += s
            totals[k][1] += len(cont)
        return [(s, n) for s, n in totals]

    def generate_until(self, requests: Sequence[tuple[str, dict]], desc: str = "generate_until") -> list[str]:
        """Greedy (or sampled, with temperature > 0 / do_sample) continuations of each context,
        cut at the first occurrence of any `until` string (EOS always stops); contexts keep
        their last tokens so that max_gen_toks fit (lm-eval's truncation)."""
        params = []
        for ctx, kw in requests:
            kw = dict(kw or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n = next((int(kw.pop(k)) for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if k in kw), 256)
            if n >= self.max_length:
                raise GenerationError(f"max_gen_toks={n} leaves no room for a context in the model's "
                                      f"{self.max_length} tokens; lower it (--max-gen-toks)")
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
            params.append(SamplingParams(max_new_tokens=n, temperature=temperature, seed=kw.pop("seed", None),
                                         stop_strings=tuple(s for s in until if s)))
        prompts = [self.tok_encode(ctx) for ctx, _ in requests]
        with Progress(len(requests), desc, self.progress) as bar:
            return generate_text(self.model, self.tokenizer, prompts, params, context=self.max_length,
                                 batch_size=self.batch_size, on_done=bar.update)

    def chat_template_text(self) -> str | None:
        return self.tokenizer.chat_template


class Progress:
    """A tqdm bar (rate and ETA) on stderr, or nothing."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled and total:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="req", leave=False, dynamic_ncols=True)

    def update(self, n: int):
        if self.bar is not None:
            self.bar.update(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
