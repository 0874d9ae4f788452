"""Training objectives: what the loop minimises, one small class each.

An objective is called as `objective(model, batch) -> (loss_sum, stats)`: the loss *summed*
over its units (labelled tokens for next-token and SFT, preference pairs for DPO) and a dict of
summed statistics. `objective.count(batch)` is the number of units. The loop divides by the
count over all micro-batches of a step and all ranks, so gradient accumulation and data
parallelism give the same gradient as one big batch (transformers PR #34191 fixed the same
normalisation bug in HF Trainer).

Batches follow lmfoundry.data: `labels[b, t]` is the target at position t, -100 where nothing is
predicted, so no shifting happens here.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

IGNORE = -100


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
        logits = model(batch["input_ids"], doc_ids=batch.get("doc_ids"))
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE,
                               reduction="sum")
        return loss, {}


class SFT(NextToken):
    """Supervised fine-tuning: the same cross-entropy; the data sets labels to -100 everywhere
    but on assistant tokens, so only those count (and only they are in the normaliser)."""

    name = "sft"


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
    before training by `precompute_reference` and keyed by a hash of each pair's tokens, so no
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
        logps, lengths = sequence_logps(model(ids), labels)
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
            raise KeyError("a DPO pair has no reference log-probs (precompute_reference did not see it)") from None
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


next_token = NextToken()
sft = SFT()
OBJECTIVES = {"pretrain": NextToken, "sft": SFT, "dpo": DPO}
