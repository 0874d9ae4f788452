"""Online objectives: the policy samples, a scorer scores, the one training loop trains on the result.

    OnlineDPO(Verifier("math"), SamplingParams(max_new_tokens=64, temperature=0.9), tokenizer=tok)
    GRPO(Verifier("math"), SamplingParams(max_new_tokens=256), num_generations=8, tokenizer=tok)
    train(policy, PromptBatches("prompts.jsonl", tok, 8), objective, cfg, "runs/grpo")

Both follow the objective protocol (objectives.py) and read PromptBatches. The loop counts every
micro-batch of a step before it computes any loss, and what counts (usable pairs, completion
tokens) is only known once the samples are scored, so the rollout of a micro-batch happens in
count(): k samples of each prompt from the current policy through lmfoundry.generate (batched,
KV cache, one seeded generator per sample, seeded from the seed and the rollout id, so a resume
draws the same samples), then the scorer. __call__ trains on the kept rollout.

Online DPO (EXAONE 3.0; OAIF, Guo et al. 2024; TRL's OnlineDPOTrainer): per prompt the best and
the worst scored sample are chosen and rejected (a prompt whose scores all tie is skipped and
counted in pairs/tied), and DPO (objectives.DPO: sigmoid or IPO) takes a step against the frozen
initial policy. count = usable pairs.

The reference policy (online DPO; GRPO with beta > 0) is taken as DPO takes it: `reference=` when
given (a frozen model), else the trainable's (the loop's PrepareContext.reference: with LoRA, the
policy itself with its adapters switched off, so no second model is built and a resume still has
it), else a frozen copy of the initial policy made in prepare() (refused on a resume).

GRPO (DeepSeekMath; TRL's GRPOTrainer): G samples per prompt, advantages (r - mean) / (std + 1e-4)
within each group (unbiased std, as TRL's nanstd; scale_rewards "none": r - mean); a group whose
rewards are all equal has zero advantages. Per token, with ratio = exp(logp - logp_old):
    l = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) + beta * w * (exp(ref - logp) - (ref - logp) - 1)
(k3 KL to the reference only when beta > 0; w = ratio with kl_bias_correction, TRL 1.16's default
after DeepSeek-V3.2, else 1). logp_old is the policy's at the first pass over a
rollout (detached: ratio 1); num_iterations > 1 trains on each rollout that many optimizer steps.
The loop divides the summed loss by the summed count over the step's micro-batches and ranks,
so each loss_type gives TRL's loss when every micro-batch holds the same number of completions
(m the completion mask, L = max_new_tokens):
    grpo     loss_sum = sum_i sum_t m*l / |o_i|            count = completions
             -> the mean over completions of each completion's token mean
    bnpo     loss_sum = sum m*l / sum m (this micro-batch)  count = 1
             -> the mean over micro-batches and ranks of the local token mean
    dr_grpo  loss_sum = sum m*l / L                         count = completions
             -> sum m*l / (completions * L)
    dapo     loss_sum = sum m*l                             count = sum m
             -> sum m*l / the completion tokens of the whole step (TRL's num_items_in_batch)
Groups never span micro-batches or ranks, so advantages need no gathering.

Under torchrun the policy samples as it trains: DDP ranks sample with their unwrapped replica;
under FSDP2 every rank first gathers the full weights once per step into a plain copy (per-token
forwards through sharded modules would need the same number of decode steps on every rank).
"""
from __future__ import annotations

import contextlib
import time

import torch

from ..errors import TrainError
from ..generate import SamplingParams
from . import distributed as D
from .objectives import DPO, IGNORE, PrepareContext, to_device, token_logps
from .rollout import Samples, rollout_seed, sample

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "none")


def plain_copy(model, into=None):
    """A plain (unsharded, frozen) Transformer holding `model`'s current weights (and its LoRA
    adapters, on a dense base); collective under FSDP (every rank calls it). `into`: a copy made
    earlier to refill."""
    from dataclasses import replace

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..lora import apply_lora, dense
    from ..model import Transformer, rope_inv_freq
    weights = (get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) if _sharded(model)
               else model.state_dict())                  # full tensors on every rank
    weights = {name: dense(t) for name, t in weights.items()}
    if into is None:
        with torch.device("meta"):
            into = Transformer(model.config)
        if getattr(model, "lora_config", None) is not None:
            apply_lora(into, replace(model.lora_config, qlora=False), model.lora_format)
        into = into.to_empty(device=model.device).requires_grad_(False).eval()
        into.inv_freq = rope_inv_freq(model.config).to(model.device)
    into.load_state_dict(weights)
    return into


def _sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


class Online:
    """What online DPO and GRPO share: sampling and scoring rollouts in count(), keeping them by
    rollout id until trained on, per-step statistics, the reference model, resume state."""

    name = "online"
    uses_reference = True

    def __init__(self, scorer, params: SamplingParams, num_generations: int, tokenizer, reference=None,
                 seed: int = 0):
        if num_generations < 2:
            raise TrainError(f"num_generations must be >= 2 (samples of each prompt to compare), got {num_generations}")
        self.scorer, self.params, self.k, self.tokenizer = scorer, params, num_generations, tokenizer
        self.reference, self.seed = reference, seed
        self.reference_context = contextlib.nullcontext     # under it, self.reference is the reference policy
        self.rollouts: dict[int, dict] = {}
        self.policy = self.copy = None
        self.autocast = None
        self.step_open, self.fresh_copy = False, False
        self.seconds = {"generate": 0.0, "score": 0.0}

    # ---- the loop's hooks ----
    def prepare(self, ctx: PrepareContext):
        if ctx.eval_batches:
            raise TrainError(f"{self.name}: held-out batches are not supported; evaluate the saved model instead")
        self.policy, self.device, self.autocast = ctx.model, ctx.device, ctx.autocast
        if hasattr(self.scorer, "to"):
            self.scorer.to(ctx.device)
        if not self.uses_reference:
            return
        if self.reference is None and ctx.reference is not None:    # LoRA: the base, adapters off
            self.reference, self.reference_context = ctx.model, ctx.reference
            return
        if self.reference is None:
            if ctx.resuming:
                raise TrainError(f"{self.name}: resuming needs the initial policy as the reference (pass reference=)")
            self.reference = plain_copy(ctx.model)
        self.reference = self.reference.to(ctx.device).requires_grad_(False).eval()

    def count(self, batch):
        if not self.step_open:               # the first count of a step: the weights may have moved
            self.step_open, self.fresh_copy = True, False
            self.seconds = {"generate": 0.0, "score": 0.0}
            self.rollouts = {key: r for key, r in self.rollouts.items() if not r.get("done")}
        return self.rollout(batch)["count"]

    def tokens(self, batch) -> int:
        return self.rollout(batch)["tokens"]

    def state_dict(self) -> dict:
        """The rollouts kept across steps (GRPO with num_iterations > 1): tensors and JSON values."""
        return {f"rollouts/{key}/{name}": v for key, r in self.rollouts.items() if not r.get("done")
                for name, v in r.items()}

    def load_state_dict(self, state: dict):
        for full, v in state.items():
            _, key, name = full.split("/", 2)
            self.rollouts.setdefault(int(key), {})[name] = v

    # ---- rollouts ----
    def sampler(self):
        """The policy to sample from (under FSDP a plain copy, refilled once per step)."""
        if not _sharded(self.policy):
            return self.policy
        if not self.fresh_copy:
            self.copy, self.fresh_copy = plain_copy(self.policy, self.copy), True
        return self.copy

    def rollout(self, batch) -> dict:
        key = batch["rollout"]
        if key not in self.rollouts:
            if self.policy is None:
                raise TrainError(f"{self.name}: prepare() was not called (train() calls it)")
            t0 = time.perf_counter()
            with self.autocast():
                samples = sample(self.sampler(), self.tokenizer, batch["prompt_ids"], self.k, self.params,
                                 rollout_seed(self.seed, key), first_row=D.rank_and_world()[0] * len(batch["prompts"]))
            t1 = time.perf_counter()
            scores = self.scorer([r for r in batch["records"] for _ in range(self.k)],
                                 [p for p in batch["prompts"] for _ in range(self.k)], samples.texts)
            self.seconds["generate"] += t1 - t0
            self.seconds["score"] += time.perf_counter() - t1
            scores = torch.tensor([float("nan") if s is None else float(s) for s in scores]).view(-1, self.k)
            self.rollouts[key] = self.build(samples, scores)
        return self.rollouts[key]

    def build(self, samples: Samples, scores: torch.Tensor) -> dict:
        raise NotImplementedError

    def common_stats(self, r: dict) -> dict:
        """Per-rollout statistics as (sum, count) pairs, and the step's sampling and scoring seconds
        (counted once per step and rank: their mean over ranks)."""
        first = self.step_open
        self.step_open = False
        stats = {name: tuple(v) for name, v in r.items() if isinstance(v, (list, tuple))}
        for part, seconds in self.seconds.items():
            stats[f"time/{part}"] = (seconds, 1.0) if first else (0.0, 0.0)
        return stats


def _nan_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std over the last dim ignoring NaN (TRL's nanstd); NaN where fewer than 2 values."""
    n = (~x.isnan()).sum(-1)
    var = ((x - x.nanmean(-1, keepdim=True)) ** 2).nanmean(-1)
    return torch.where(n > 1, (var * n / (n - 1).clamp(min=1)).sqrt(), torch.full_like(var, float("nan")))


def group_advantages(rewards: torch.Tensor, scale_rewards: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [P, G], zero-std groups [P] bool) from rewards [P, G] (NaN: unscored, advantage 0)."""
    std = _nan_std(rewards)
    adv = rewards - rewards.nanmean(-1, keepdim=True)
    if scale_rewards == "group":
        adv = adv / (std[:, None] + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), torch.isclose(std, torch.zeros_like(std))


def grpo_token_loss(logps, old_logps, advantages, epsilon: float = 0.2, epsilon_high: float | None = None,
                    beta: float = 0.0, ref_logps=None, kl_bias_correction: bool = True) -> torch.Tensor:
    """Per-token GRPO loss [N, T] (the clipped surrogate, plus beta * k3 KL when beta > 0)."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high))
    adv = advantages[:, None]
    loss = -torch.min(ratio * adv, clipped * adv)
    if beta:
        delta = ref_logps - logps
        loss = loss + beta * (torch.exp(delta) - delta - 1) * (ratio if kl_bias_correction else 1)
    return loss


def grpo_count(mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The count of one micro-batch under `loss_type` (module docstring)."""
    return {"grpo": torch.tensor(float(mask.shape[0])), "dr_grpo": torch.tensor(float(mask.shape[0])),
            "bnpo": torch.tensor(1.0), "dapo": mask.sum().float()}[loss_type]


def grpo_loss_sum(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int):
    """The loss_sum of one micro-batch under `loss_type` (module docstring)."""
    m = mask.to(per_token.dtype)
    tokens = per_token * m
    if loss_type == "grpo":
        return (tokens.sum(-1) / m.sum(-1).clamp(min=1)).sum()
    if loss_type == "bnpo":
        return tokens.sum() / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return tokens.sum() / max_completion_length
    return tokens.sum()


class OnlineDPO(Online):
    """Online DPO (module docstring). `beta`, `loss_type` ("sigmoid" or "ipo") and `label_smoothing`
    are DPO's; the reference is taken as the module docstring says."""

    name = "online_dpo"

    def __init__(self, scorer, params: SamplingParams, num_generations: int = 2, tokenizer=None, beta: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, reference=None, seed: int = 0):
        super().__init__(scorer, params, num_generations, tokenizer, reference, seed)
        try:
            self.dpo = DPO(beta, label_smoothing, loss_type)
        except ValueError as e:
            raise TrainError(str(e)) from None

    def build(self, samples: Samples, scores: torch.Tensor) -> dict:
        valid = ~scores.isnan()
        best = torch.where(valid, scores, -torch.inf).max(-1)
        worst = torch.where(valid, scores, torch.inf).min(-1)
        usable = (valid.sum(-1) >= 2) & (best.values > worst.values)
        tied = (valid.sum(-1) >= 2) & ~usable
        prompts = torch.arange(scores.shape[0])[usable]
        rows = (prompts * self.k + best.indices[usable], prompts * self.k + worst.indices[usable])
        if not len(prompts):                        # a forward all the same (DDP/FSDP), trained with weight 0
            rows = (torch.tensor([0]), torch.tensor([0]))
        pair = {f"{side}_{key}": getattr(samples, attr)[idx] for side, idx in zip(("chosen", "rejected"), rows)
                for key, attr in (("input_ids", "ids"), ("labels", "labels"))}
        gap = (best.values - worst.values)[usable]
        return {"pair": pair, "count": torch.tensor(float(len(prompts))), "tokens": 2 * pair["chosen_input_ids"].numel(),
                "score/mean": [scores.nansum().item(), valid.sum().item()],
                "score/max": [best.values[valid.any(-1)].sum().item(), valid.any(-1).sum().item()],
                "score/gap": [gap.sum().item(), len(prompts)],
                "score/unparseable": [(~valid).sum().item(), scores.numel()],
                "pairs/usable": [len(prompts), scores.shape[0]], "pairs/tied": [tied.sum().item(), scores.shape[0]],
                "completions/length": [samples.lengths.sum().item(), scores.numel()],
                "completions/truncated": [samples.truncated.sum().item(), scores.numel()]}

    def __call__(self, model, batch):
        r = self.rollouts[batch["rollout"]]
        r["done"] = True
        pair = to_device(r["pair"], self.device)
        with torch.no_grad(), self.reference_context():   # every rank, pairs or not (FSDP: collective forwards)
            ref_chosen, ref_rejected, _, _ = self.dpo.policy_logps(self.reference, pair)
        loss, stats = self.dpo(model, {**pair, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected})
        if r["count"] == 0:
            loss, stats = loss * 0, {name: v * 0 for name, v in stats.items()}
        stats.update(self.common_stats(r))
        return loss, stats


class GRPO(Online):
    """GRPO (module docstring) with TRL's names and defaults: beta 0 (no reference model),
    epsilon 0.2, epsilon_high = epsilon, loss_type "dapo", scale_rewards "group", num_iterations 1,
    kl_bias_correction True. mask_truncated drops completions cut by max_new_tokens from the loss (DAPO)."""

    name = "grpo"

    def __init__(self, scorer, params: SamplingParams, num_generations: int = 8, tokenizer=None, beta: float = 0.0,
                 epsilon: float = 0.2, epsilon_high: float | None = None, loss_type: str = "dapo",
                 scale_rewards: str = "group", num_iterations: int = 1, mask_truncated: bool = False,
                 kl_bias_correction: bool = True, reference=None, seed: int = 0):
        super().__init__(scorer, params, num_generations, tokenizer, reference, seed)
        for value, known, what in ((loss_type, LOSS_TYPES, "loss_type"), (scale_rewards, SCALE_REWARDS,
                                                                          "scale_rewards")):
            if value not in known:
                raise TrainError(f"unknown GRPO {what} {value!r}; known: {', '.join(known)}")
        if beta < 0 or epsilon < 0 or num_iterations < 1:
            raise TrainError("GRPO needs beta >= 0, epsilon >= 0 and num_iterations >= 1")
        self.beta, self.epsilon, self.epsilon_high = beta, epsilon, epsilon_high
        self.loss_type, self.scale_rewards, self.iterations = loss_type, scale_rewards, num_iterations
        self.mask_truncated, self.uses_reference = mask_truncated, beta > 0
        self.kl_bias_correction = kl_bias_correction

    def build(self, samples: Samples, scores: torch.Tensor) -> dict:
        adv, zero_std = group_advantages(scores, self.scale_rewards)
        mask = samples.labels != IGNORE
        if self.mask_truncated:
            mask &= ~samples.truncated[:, None]
        r = {"ids": samples.ids, "labels": samples.labels, "mask": mask, "advantages": adv.flatten(),
             "count": grpo_count(mask, self.loss_type), "tokens": samples.ids.numel(),
             "score/mean": [scores.nansum().item(), (~scores.isnan()).sum().item()],
             "score/zero_std": [zero_std.sum().item(), scores.shape[0]],
             "score/unparseable": [scores.isnan().sum().item(), scores.numel()],
             "completions/length": [samples.lengths.sum().item(), scores.numel()],
             "completions/truncated": [samples.truncated.sum().item(), scores.numel()]}
        if self.beta:
            with torch.no_grad(), self.autocast(), self.reference_context():
                r["ref_logps"] = token_logps(self.reference, samples.ids.to(self.device),
                                             samples.labels.to(self.device)).float().cpu()
        return r

    def __call__(self, model, batch):
        r = self.rollouts[batch["rollout"]]
        r["done"] = batch["iteration"] == self.iterations - 1
        ids, labels, mask = (r[k].to(self.device) for k in ("ids", "labels", "mask"))
        logps = token_logps(model, ids, labels)
        if "old_logps" not in r:                         # the first pass: the policy the samples came from
            r["old_logps"] = logps.detach().cpu()
        old = r["old_logps"].to(self.device)
        ref = r["ref_logps"].to(self.device) if self.beta else None
        adv = r["advantages"].to(self.device)
        per_token = grpo_token_loss(logps, old, adv, self.epsilon, self.epsilon_high, self.beta, ref,
                                    self.kl_bias_correction)
        loss = grpo_loss_sum(per_token, mask, self.loss_type, self.params.max_new_tokens)
        ratio, eps_high = torch.exp(logps.detach() - old), self.epsilon if self.epsilon_high is None else self.epsilon_high
        clipped = ((ratio < 1 - self.epsilon) & (adv[:, None] < 0)) | ((ratio > 1 + eps_high) & (adv[:, None] > 0))
        stats = self.common_stats(r)
        stats["clip_ratio"] = ((clipped & mask).sum(), mask.sum())
        if self.beta:
            delta = (ref - logps.detach())[mask]
            stats["kl"] = ((torch.exp(delta) - delta - 1).sum(), mask.sum())
        return loss, stats
