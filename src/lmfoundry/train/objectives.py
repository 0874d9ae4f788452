"""Training objectives: what the loop minimises, one small class each.

The objective protocol (what train() calls; any object with these works):

    name                          a short label (progress bar, trainer_state.json)
    count(batch) -> int/Tensor    the number of loss units in a batch: labelled tokens for
                                  next-token and SFT, preference pairs for DPO
    tokens(batch) -> int          tokens the model reads (for throughput)
    __call__(model, batch) -> (loss_sum, stats)
                                  the loss *summed* over the batch's units and a dict of summed
                                  statistics (logged divided by the same count, or by their own:
                                  a value (sum, count) is logged as Σsum / Σcount); `model` is
                                  the module the loop trains (DDP/FSDP-wrapped under torchrun)
  optional hooks, called when present:
    prepare(ctx)                  once before the first step of a run (and of a resume), with a
                                  PrepareContext: the model, a look at the upcoming batches, the
                                  eval batches, device/autocast, OUT/checkpoints and whether this
                                  is a resume. Precomputation lives here (DPO's reference pass);
                                  an online objective may keep ctx.model to sample from the policy
                                  with lmfoundry.generate inside __call__.
    state_dict() -> dict          objective state saved with every checkpoint: a flat dict whose
    load_state_dict(state)        tensors go to objective.safetensors and other values to
                                  trainer_state.json; restored on resume before prepare() (a
                                  sampling RNG, say); rank 0's is saved. It is taken after every
                                  completed step (so Ctrl-C mid-step saves the last complete
                                  one): keep it cheap, and return copies of what changes in place.

The loop divides the summed loss by the count over all micro-batches of a step and all ranks,
so gradient accumulation and data parallelism give the same gradient as one big batch
(transformers PR #34191 fixed the same normalisation bug in HF Trainer).

Batches follow lmfoundry.data: `labels[b, t]` is the target at position t, -100 where nothing is
predicted, so no shifting happens here.
"""
from __future__ import annotations

import functools
import hashlib
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import TrainError
from . import distributed as D

IGNORE = -100


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class PrepareContext:
    """What an objective's prepare() gets from the loop."""
    net: torch.nn.Module                       # what the loop calls (wrapped for DDP/FSDP)
    model: torch.nn.Module                     # the unwrapped Transformer (fp32 master weights)
    device: torch.device
    peek: Callable[[int], list]                # the next n micro-batches, still trained on afterwards
    micro_batches_left: int                    # how many micro-batches this run will still draw
    eval_batches: list = field(default_factory=list)
    checkpoint_dir: Path = Path("checkpoints")  # OUT/checkpoints: files an objective keeps across resumes
    resuming: bool = False                     # the model is no longer the initial one
    progress: bool = False                     # show bars (rank 0)
    autocast: Callable = nullcontext
    reference: Callable | None = None          # a context manager factory under which `net` is the reference
                                               # policy (LoRA: adapters off); None: the initial weights are


class NextToken:
    """Next-token cross-entropy over every labelled position (pretraining, continued pretraining).

    Batch: {"input_ids", "labels", "doc_ids" (optional, packed rows)} LongTensor [B, T].
    """

    name = "next_token"

    def count(self, batch) -> torch.Tensor:
        return (batch["labels"] != IGNORE).sum()

    def tokens(self, batch) -> int:
        """Tokens the model reads (for throughput)."""
        return batch["input_ids"].numel()

    def __call__(self, model, batch):
        return -token_logps(model, batch["input_ids"], batch["labels"], batch.get("doc_ids"), summed=True), {}


class SFT(NextToken):
    """Supervised fine-tuning: the same cross-entropy; the data sets labels to -100 everywhere
    but on assistant tokens, so only those count (and only they are in the normaliser)."""

    name = "sft"


def token_logps(model, input_ids: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None = None,
                summed: bool = False):
    """log p(labels[b, t] | input_ids[b, :t+1]) in fp32 [B, T], 0 where labels are -100: the one place
    every objective gets label log-probs from the model (cross-entropy is minus their sum).
    summed: their sum over the labelled tokens instead, a scalar (next-token and SFT losses), whose
    gradients are computed in the same pass over the logits (3 matrix products per chunk, as the
    full-logits loss; the per-token form recomputes each chunk in backward: 4).

    The output layer runs inside the model's forward (`head=`, so FSDP2 gathers its sharded weight
    for it) through label_logps: only labelled positions, a few rows of logits at a time, so the
    [B, T, V] logits are never built."""
    head = functools.partial(label_logps, labels=labels, summed=summed)
    return model(input_ids, doc_ids=doc_ids, head=head)


LOGITS_PER_CHUNK = 2 ** 25    # logits held at once (128 MiB fp32; fewer chunks: fewer passes over the weight grad)


def label_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, summed: bool = False):
    """log_softmax(hidden @ weight.T)[..., labels] in fp32 (shape of labels; 0 where labels are -100),
    or with `summed` their sum, computed over chunks of LOGITS_PER_CHUNK logits: the loss and
    gradients of F.cross_entropy on the full logits, at the memory of one chunk. Under autocast
    the matrix products run in its dtype, as F.linear would."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    keep = labels != IGNORE
    rows = max(1, LOGITS_PER_CHUNK // weight.shape[0])
    if summed:
        return _SummedLabelLogps.apply(hidden[keep], weight, labels[keep], rows, dtype)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    out[keep] = _LabelLogps.apply(hidden[keep], weight, labels[keep], rows, dtype)
    return out


def _chunk_logps(h, w, y):
    """(logits [n, V] fp32, log-probs of labels y [n], logsumexp [n]) of one chunk."""
    logits = F.linear(h, w).float()
    lse = torch.logsumexp(logits, dim=-1)
    return logits, logits.gather(1, y[:, None])[:, 0] - lse, lse


def _add_weight_grad(grad_w, d, h, buffer):
    """grad_w (fp32 [V, D]) += d.T @ h without a fresh [V, D] temporary per chunk (allocating and
    faulting one in for every chunk costs more than the product at large vocabularies)."""
    if d.dtype == grad_w.dtype:
        grad_w.addmm_(d.t(), h)
    else:
        grad_w.add_(torch.mm(d.t(), h, out=buffer))


def _minus_softmax_plus_onehot(logits, lse, y, scale=None):
    """d log p(y) / d logits = onehot(y) - softmax, in place over logits (times `scale` per row)."""
    d = logits.sub_(lse[:, None]).exp_().neg_()
    if scale is not None:
        d.mul_(scale[:, None])
    d[torch.arange(len(y), device=d.device), y] += 1 if scale is None else scale
    return d


class _SummedLabelLogps(torch.autograd.Function):
    """Σ label log-probs of hidden [N, D] under weight [V, D]; gradients made chunk by chunk in
    forward (the output is a scalar, so backward only scales them)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, rows, dtype):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        buffer = torch.empty(weight.shape, dtype=dtype, device=weight.device) if want_w and dtype != torch.float32 \
            else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for i in range(0, hidden.shape[0], rows):
                h, y = hidden[i:i + rows].to(dtype), labels[i:i + rows]
                logits, logps, lse = _chunk_logps(h, w, y)
                total += logps.sum()
                if want_h or want_w:
                    d = _minus_softmax_plus_onehot(logits, lse, y).to(dtype)
                    if want_h:
                        grad_h[i:i + rows] = d @ w
                    if want_w:
                        _add_weight_grad(grad_w, d, h, buffer)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad).to(ctx.weight_dtype), None, None, None)


class _LabelLogps(torch.autograd.Function):
    """Label log-probs of hidden [N, D] under weight [V, D], `rows` rows of logits at a time.
    Backward recomputes each chunk's logits: d logp / d logits = onehot(label) - softmax."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, rows, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            logps, lse = [], []
            for h, y in zip(hidden.split(rows), labels.split(rows)):
                _, lp, ls = _chunk_logps(h.to(dtype), w, y)
                logps.append(lp)
                lse.append(ls)
        ctx.save_for_backward(hidden, weight, labels, torch.cat(lse) if lse else hidden.new_zeros(0))
        ctx.rows, ctx.dtype = rows, dtype
        return torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels, lse = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        buffer = torch.empty(weight.shape, dtype=ctx.dtype, device=weight.device) if ctx.dtype != torch.float32 \
            else None
        for i in range(0, hidden.shape[0], ctx.rows):
            h, y, g = hidden[i:i + ctx.rows].to(ctx.dtype), labels[i:i + ctx.rows], grad[i:i + ctx.rows]
            d = _minus_softmax_plus_onehot(F.linear(h, w).float(), lse[i:i + ctx.rows], y, g).to(ctx.dtype)
            grad_hidden[i:i + ctx.rows] = d @ w
            _add_weight_grad(grad_weight, d, h, buffer)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over labelled positions of log p(label | prefix), in fp32, and the number of labelled
    positions, per row. TRL sums per-token log-probs over the completion tokens (every one,
    the end-of-turn/EOS included) and does not average (dpo_trainer._compute_loss)."""
    per_token = -F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                 reduction="none").view(labels.shape)
    mask = labels != IGNORE
    return (per_token * mask).sum(-1), mask.sum(-1)


DPO_LOSSES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid", chosen_len=None, rejected_len=None):
    """Per-pair DPO losses and the implicit rewards, as TRL computes them.

    sigmoid (DPO, Rafailov et al. 2023; with conservative-DPO label smoothing eps as TRL <= 0.28
    and torchtune): h = (pi_c - ref_c) - (pi_r - ref_r),
        L = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    ipo (Azar et al. 2023; TRL divides each log-ratio by its completion length):
        h = (pi_c - ref_c) / len_c - (pi_r - ref_r) / len_r,   L = (h - 1 / (2 * beta))^2
    Rewards are beta * (pi - ref) for chosen and rejected (not length-normalised, as TRL logs them).
    Returns (losses [N], chosen_rewards [N], rejected_rewards [N]).
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        h = chosen_ratio - rejected_ratio
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        if chosen_len is None or rejected_len is None:
            raise ValueError("the IPO loss needs the completion lengths")
        h = chosen_ratio / chosen_len - rejected_ratio / rejected_len
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; known: {', '.join(DPO_LOSSES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _pad_to(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return t if t.shape[1] == length else F.pad(t, (0, length - t.shape[1]), value=value)


class DPO:
    """Direct Preference Optimization against a frozen reference (by default the initial policy).

    Batch: {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"} [B, T],
    right-padded, labels -100 on prompt and padding. Policy log-probs come from one forward over
    the 2B rows [chosen..., rejected...] (as TRL). Reference log-probs come from the batch
    ("ref_chosen_logps", "ref_rejected_logps" [B]) or from `self.reference`, a table filled once
    before training by `prepare` (the loop's hook) and keyed by a hash of each pair's tokens, so no
    reference model stays in memory during training.
    """

    name = "dpo"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
        if loss_type not in DPO_LOSSES:
            raise ValueError(f"unknown DPO loss {loss_type!r}; known: {', '.join(DPO_LOSSES)}")
        if not beta > 0:
            raise ValueError(f"DPO beta must be positive, got {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.label_smoothing, self.loss_type = beta, label_smoothing, loss_type
        self.reference: dict[bytes, tuple[float, float]] = {}

    def count(self, batch) -> torch.Tensor:
        return torch.tensor(batch["chosen_input_ids"].shape[0])

    def tokens(self, batch) -> int:
        return batch["chosen_input_ids"].numel() + batch["rejected_input_ids"].numel()

    def policy_logps(self, model, batch):
        """(chosen logps, rejected logps, chosen lengths, rejected lengths), each [B]."""
        B = batch["chosen_input_ids"].shape[0]
        T = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        ids = torch.cat([_pad_to(batch["chosen_input_ids"], T, 0), _pad_to(batch["rejected_input_ids"], T, 0)])
        labels = torch.cat([_pad_to(batch["chosen_labels"], T, IGNORE), _pad_to(batch["rejected_labels"], T, IGNORE)])
        logps, lengths = token_logps(model, ids, labels).sum(-1), (labels != IGNORE).sum(-1)
        return logps[:B], logps[B:], lengths[:B], lengths[B:]

    # ---- the reference table ----
    @staticmethod
    def keys(batch) -> list[bytes]:
        """One digest per pair over the tokens that decide its log-probs: each side's ids and
        labels up to its last labelled position (right padding after it cannot matter)."""
        out = []
        parts = [batch[k].cpu() for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                          "rejected_labels")]
        for b in range(parts[0].shape[0]):
            h = hashlib.blake2b(digest_size=16)
            for ids, labels in ((parts[0][b], parts[1][b]), (parts[2][b], parts[3][b])):
                where = (labels != IGNORE).nonzero()
                end = int(where[-1]) + 1 if len(where) else 0
                h.update(ids[:end].numpy().tobytes() + b"|" + labels[:end].numpy().tobytes() + b"#")
            out.append(h.digest())
        return out

    def reference_logps(self, batch, device):
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
        try:
            pairs = [self.reference[k] for k in self.keys(batch)]
        except KeyError:
            raise KeyError("a DPO pair has no reference log-probs (prepare() did not see it)") from None
        t = torch.tensor(pairs, dtype=torch.float32, device=device)
        return t[:, 0], t[:, 1]

    def missing(self, batch) -> bool:
        return "ref_chosen_logps" not in batch and any(k not in self.reference for k in self.keys(batch))

    @torch.no_grad()
    def add_reference(self, model, batch):
        """Compute and remember the reference log-probs of the pairs in `batch` with `model`."""
        chosen, rejected, _, _ = self.policy_logps(model, batch)
        for k, c, r in zip(self.keys(batch), chosen.tolist(), rejected.tolist()):
            self.reference[k] = (c, r)

    def reference_tensors(self) -> dict[str, torch.Tensor]:
        keys = sorted(self.reference)
        return {"keys": torch.tensor([list(k) for k in keys], dtype=torch.uint8).reshape(len(keys), 16),
                "logps": torch.tensor([self.reference[k] for k in keys], dtype=torch.float32).reshape(len(keys), 2)}

    def load_reference_tensors(self, tensors: dict[str, torch.Tensor]):
        for k, (c, r) in zip(tensors["keys"].tolist(), tensors["logps"].tolist()):
            self.reference[bytes(k)] = (c, r)

    def prepare(self, ctx: PrepareContext):
        """Reference log-probs of every pair this run will see (the upcoming batches and the eval
        batches), from the initial policy (or ctx.reference's: LoRA's base), once: kept in
        OUT/checkpoints/dpo_reference.safetensors, so a resume finds them (without ctx.reference it
        no longer has the initial policy to compute them with)."""
        from safetensors.torch import load_file, save_file
        from tqdm.auto import tqdm
        ref_file = ctx.checkpoint_dir / "dpo_reference.safetensors"
        if ref_file.is_file():
            self.load_reference_tensors(load_file(str(ref_file)))
        upcoming = ctx.peek(ctx.micro_batches_left)
        todo = [b for b in upcoming + list(ctx.eval_batches) if self.missing(b)]
        rank, world = D.rank_and_world()
        if not int(D.all_reduce_sum(torch.tensor(len(todo), dtype=torch.int64))):
            return
        if ctx.resuming and ctx.reference is None:
            raise TrainError(f"{ref_file}: DPO reference log-probs are missing for pairs this run will see (were "
                             "--steps or the data changed?); the reference is the initial model, which a resume no "
                             "longer has")
        n = max(D.all_gather_objects(len(todo)))
        with torch.no_grad(), (ctx.reference or nullcontext)():
            for i in tqdm(range(n), desc="dpo reference", unit="batch", disable=not ctx.progress):
                # under FSDP every rank must run the same number of forwards
                batch = todo[i] if i < len(todo) else todo[-1] if todo else upcoming[0]
                with ctx.autocast():
                    self.add_reference(ctx.net, to_device(batch, ctx.device))
        if world > 1:
            for table in D.all_gather_objects(self.reference):
                self.reference.update(table)
        if rank == 0:
            ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            tmp = ref_file.with_name(f".{ref_file.name}.tmp")
            save_file(self.reference_tensors(), str(tmp))
            os.replace(tmp, ref_file)
        D.barrier()

    # ---- the loss ----
    def __call__(self, model, batch):
        pc, pr, lc, lr = self.policy_logps(model, batch)
        rc, rr = self.reference_logps(batch, pc.device)
        losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, self.beta, self.label_smoothing,
                                                            self.loss_type, lc, lr)
        stats = {"rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
                 "rewards/accuracy": (chosen_rewards > rejected_rewards).float().sum(),
                 "rewards/margin": (chosen_rewards - rejected_rewards).sum(),
                 "logps/chosen": pc.detach().sum(), "logps/rejected": pr.detach().sum()}
        return losses.sum(), stats

