"""Rollouts for the online objectives: prompt records in, the policy's own samples out, scored.

    PromptBatches(records, tokenizer, batch_size)   prompt records -> micro-batches of prompts (exact resume)
    sample(model, prompt_ids, k, params, seed)      k completions per prompt from lmfoundry's decode core
    Verifier("math")                                GSM8K `#### N` answers vs the record's "answer" (eval's parser)
    RewardModelScorer("runs/rm")                    a reward model (a *ForSequenceClassification or adapter directory)
    JudgeScorer("http://host:8000/v1")              an OpenAI-compatible judge grading 1-10 ("[[r]]")

A scorer is any callable (records, prompts, completions) -> [float or None]: `records` the prompt
records (a verifier reads its answer field there), `prompts` as the records give them (a string
or messages), `completions` the decoded texts; None marks a completion it could not score (an
unparseable grade). `required` names the record fields it needs (checked when prompts are read).

Prompts are rendered as DPO data renders them: with the policy's chat template and its
generation prompt (a string is one user turn); a tokenizer without a chat template takes string
prompts as plain text. A completion is the sampled tokens plus the stop id that ended it (the
end-of-turn token, as in DPO replies); a completion cut by max_new_tokens has none.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import DataError, JudgeError
from ..generate import SamplingParams, fit_prompt, generate
from ..records import load_records
from .objectives import IGNORE

log = logging.getLogger("lmfoundry.train")


# ---------------------------------------------------------------- prompts

def render_prompt(tokenizer, prompt, where: str) -> list[int]:
    """Token ids of a prompt (a string or messages) with the generation prompt."""
    from ..data.chat import as_messages
    if isinstance(prompt, str) and tokenizer.chat_template is None:
        return tokenizer.encode(prompt)
    return tokenizer.apply_chat_template(as_messages(prompt, "user", where, "prompt"), add_generation_prompt=True,
                                         tokenize=True)


class PromptBatches:
    """Endless micro-batches of prompts for online objectives, shuffled per epoch (seeded) and
    split over ranks: {"rollout": id, "iteration": i, "prompt_ids": [[int]], "prompts": [...],
    "records": [dict]}, batch_size prompts per rank.

    Each generation batch (the `group` micro-batches of one optimizer step) is yielded `repeat`
    times, iteration 0..repeat-1 (GRPO's num_iterations: several optimizer steps on one set of
    samples); a rollout id names a micro-batch's prompts, the same on every iteration. Prompts
    longer than `max_prompt_tokens` keep their last tokens (counted in stats["truncated"]).
    """

    def __init__(self, records, tokenizer, batch_size: int, seed: int = 0, *, field: str = "prompt",
                 required: tuple = (), why: str = "", repeat: int = 1, group: int = 1, rank: int = 0,
                 world_size: int = 1, max_prompt_tokens: int | None = None):
        self.batch_size, self.seed, self.repeat, self.group = batch_size, seed, repeat, group
        self.rank, self.world_size = rank, world_size
        self.items: list[tuple[list[int], dict, object]] = []    # (ids, record, prompt)
        truncated = 0
        for where, record in load_records(records):
            if field not in record:
                raise DataError(f"{where}: record has no '{field}' field (the prompt; set --prompt-field)")
            for name in required:
                if name not in record:
                    raise DataError(f"{where}: record has no '{name}' field ({why or 'the scorer needs it'})")
            ids = render_prompt(tokenizer, record[field], where)
            if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                ids, truncated = ids[-max_prompt_tokens:], truncated + 1
            self.items.append((ids, record, record[field]))
        if truncated:
            log.warning(f"{truncated} of {len(self.items)} prompts are longer than {max_prompt_tokens} tokens "
                        "and keep only their last tokens")
        self.stats = {"prompts": len(self.items), "truncated": truncated}
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        p, self.position = self.position, self.position + 1
        unit = self.group * self.repeat
        rollout = (p // unit) * self.group + p % self.group
        rows = self.batch_size * self.world_size
        picked = [self._row(rollout * rows + self.rank * self.batch_size + r) for r in range(self.batch_size)]
        return {"rollout": rollout, "iteration": (p % unit) // self.group, "prompt_ids": [x[0] for x in picked],
                "records": [x[1] for x in picked], "prompts": [x[2] for x in picked]}

    def _row(self, r: int):
        n = len(self.items)
        order = np.random.default_rng([self.seed, r // n]).permutation(n)
        return self.items[order[r % n]]

    def state_dict(self) -> dict:
        return {"position": self.position, "prompts": len(self.items), "global_rows": self.batch_size * self.world_size,
                "seed": self.seed, "repeat": self.repeat, "group": self.group}

    def load_state_dict(self, state: dict):
        mine = {k: v for k, v in self.state_dict().items() if k != "position"}
        diff = [k for k in mine if state.get(k) != mine[k]]
        if diff:
            raise DataError(f"cannot resume: the saved prompt stream differs in {diff} "
                            f"(saved {[state.get(k) for k in diff]}, now {[mine[k] for k in diff]})")
        self.position = state["position"]


# ---------------------------------------------------------------- sampling

def rollout_seed(seed: int, rollout: int) -> int:
    """The base seed of one rollout's samples (row r of the global batch samples with base + r)."""
    digest = hashlib.blake2b(f"{seed}:{rollout}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Samples:
    """k completions per prompt as training rows: ids [N, T] = prompt + completion, right-padded,
    labels [N, T] the completion tokens (labels[t] = ids[t + 1]) and -100 elsewhere, rows grouped
    by prompt (N = prompts * k)."""
    ids: torch.Tensor
    labels: torch.Tensor
    texts: list[str]
    truncated: torch.Tensor          # [N] bool: cut by max_new_tokens (no stop id)
    lengths: torch.Tensor            # [N] completion tokens (the stop id included)


def sample(model, tokenizer, prompt_ids: list[list[int]], k: int, params: SamplingParams, seed: int,
           first_row: int = 0) -> Samples:
    """k samples of each prompt through lmfoundry.generate (one batch, KV cache): the sample c of
    prompt j is seeded seed + (first_row + j) * k + c, so it does not depend on how prompts are
    split over ranks or batches."""
    rows = [p for p in prompt_ids for _ in range(k)]
    per_row = [replace(params, seed=seed + first_row * k + r) for r in range(len(rows))]
    outs = generate(model, rows, per_row, tokenizer=tokenizer)
    seqs, labels, texts, cut, lengths = [], [], [], [], []
    for prompt, c in zip(rows, outs):
        completion = c.tokens + ([c.stop] if isinstance(c.stop, int) else [])
        seqs.append(prompt + completion)
        labels.append([IGNORE] * (len(prompt) - 1) + completion + [IGNORE])
        texts.append(tokenizer.decode(c.tokens))
        cut.append(c.finish_reason == "length")
        lengths.append(len(completion))
    T = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    lab = torch.tensor([x + [IGNORE] * (T - len(x)) for x in labels])
    return Samples(ids, lab, texts, torch.tensor(cut), torch.tensor(lengths))


# ---------------------------------------------------------------- scorers

def math_answer(completion: str, answer) -> float:
    """1.0 when the completion's first `#### N` (eval's GSM8K strict-match) equals the answer's N
    under GSM8K's exact_match (commas, "$" and a final "." ignored), else 0.0."""
    from ..eval.metrics import exact_match, gsm8k_strict
    return exact_match(gsm8k_strict(completion), str(answer))


VERIFIERS = {"math": math_answer}


class Verifier:
    """Rewards from a checker: check(completion text, record[field]) -> float or None. `check` is
    a name from VERIFIERS or any such function."""

    def __init__(self, check="math", field: str = "answer"):
        if isinstance(check, str) and check not in VERIFIERS:
            raise DataError(f"unknown verifier {check!r}; known: {', '.join(VERIFIERS)}")
        self.name = check if isinstance(check, str) else getattr(check, "__name__", "verifier")
        self.check = VERIFIERS[check] if isinstance(check, str) else check
        self.field, self.required = field, (field,)
        self.why = f"the {self.name} verifier compares completions with it"

    def __call__(self, records, prompts, completions) -> list[float | None]:
        return [self.check(text, record[self.field]) for record, text in zip(records, completions)]


class RewardModelScorer:
    """Rewards from a reward model. Texts are re-tokenized: prompt and completion are rendered with
    the reward model's own tokenizer and chat template, exactly as reward training renders a
    reply, so a reward model whose tokenizer differs from the policy's scores what it was trained on."""

    required: tuple = ()

    def __init__(self, path, batch_size: int = 16, device=None):
        from ..data.chat import Renderer
        from ..tokenizer import load_tokenizer
        from .reward import load_reward_model, tokenizer_dir
        self.rm = load_reward_model(path, device=device)
        self.rm.requires_grad_(False)
        self.render = Renderer(load_tokenizer(tokenizer_dir(path)))
        self.batch_size, self.name = batch_size, f"reward model {path}"

    def to(self, device):
        self.rm.to(device)
        return self

    @torch.no_grad()
    def __call__(self, records, prompts, completions) -> list[float | None]:
        from ..data.chat import as_messages
        context, rows = self.rm.config.max_seq_len, []
        for i, (prompt, text) in enumerate(zip(prompts, completions)):
            where = f"completion {i}"
            messages = as_messages(prompt, "user", where, "prompt")
            ids, target = self.render(messages + [{"role": "assistant", "content": text}], where, first=len(messages))
            end = int(np.flatnonzero(target)[-1]) + 1       # through the reply's end-of-turn token
            rows.append(ids[max(0, end - context):end])
        out = []
        for b in range(0, len(rows), self.batch_size):
            chunk = rows[b:b + self.batch_size]
            T = max(map(len, chunk))
            ids = torch.tensor(np.stack([np.pad(r, (0, T - len(r))) for r in chunk]), device=self.rm.device)
            out += self.rm(ids, torch.tensor([len(r) for r in chunk])).tolist()
        return out


class JudgeScorer:
    """Grades from an OpenAI-compatible endpoint (`lmfoundry serve`, vLLM, an API) with FastChat's
    single-answer MT-Bench prompt (single-math-v1 with the record's reference answer when it has
    `reference_field`), parsed as MT-Bench grades ("[[r]]"); eval.judge.JudgeClient does the
    calls, the on-disk cache and the retries. A grade that does not parse scores None (counted);
    a judge none of whose first answers parse is refused with one error."""

    required: tuple = ()

    def __init__(self, url: str, model: str = "judge", api_key: str | None = None, cache=None,
                 reference_field: str | None = "answer", retries: int = 3, timeout: float = 120.0,
                 max_tokens: int = 512, retry_sleep: float = 2.0):
        from ..eval.judge import JudgeClient
        self.client = JudgeClient(url, api_key, model, cache=cache, max_tokens=max_tokens, retries=retries,
                                  timeout=timeout, retry_sleep=retry_sleep)
        self.reference_field, self.name = reference_field, f"judge {url}"
        self.graded = self.parsed = 0

    def messages(self, record: dict, prompt, completion: str) -> list[dict]:
        from ..eval.judge import MT_BENCH_PROMPTS
        question = prompt if isinstance(prompt, str) else next(
            (m.get("content", "") for m in reversed(prompt) if m.get("role") == "user"), "")
        ref = record.get(self.reference_field) if self.reference_field else None
        p = MT_BENCH_PROMPTS["single-math-v1" if ref is not None else "single-v1"]
        user = p["prompt_template"].format(question=question, answer=completion, ref_answer_1=ref)
        return [{"role": "system", "content": p["system_prompt"]}, {"role": "user", "content": user}]

    def __call__(self, records, prompts, completions) -> list[float | None]:
        from ..eval.judge import parse_mt_bench_score
        out, first = [], None
        for record, prompt, text in zip(records, prompts, completions):
            answer = self.client.complete(self.messages(record, prompt, text))
            grade = parse_mt_bench_score(answer)
            first = first if first is not None else answer
            self.graded, self.parsed = self.graded + 1, self.parsed + (grade is not None)
            out.append(grade)
        if self.parsed == 0 and self.graded >= 4:
            raise JudgeError(f"judge endpoint {self.client.url}: none of its first {self.graded} answers holds a "
                             f"grade in the form [[r]] (first answer: {first[:120]!r})")
        return out
