"""Bradley-Terry reward models: the Transformer with a scalar score head, trained on preference pairs.

    rm = RewardModel(load_model("sft/"))                     # a new head on a causal LM (its LM head dropped)
    train(rm, DPOBatches("pairs.jsonl", tok, 1024, 8), BradleyTerry(), cfg, "runs/rm", trainable=RewardModelWeights())
    rm = load_reward_model("runs/rm")                        # a LlamaForSequenceClassification directory
    score_pairs(rm, tok, "heldout.jsonl")                    # pairwise accuracy and the reward distribution

The reward of a sequence is score(h), h the final normed hidden state at its last token that is not
the pad id (transformers' GenericForSequenceClassification rule, and TRL's), so the exported model
scores the same in transformers. With no pad id in the config the eos id stands in (as TRL sets
it). A preference pair rendered by DPOBatches ends at the reply's last labelled token, its
end-of-turn marker: template formatting after it (ChatML's newline) is not scored.

The loss per pair is TRL RewardTrainer's: -log sigmoid(r_c - r_r - margin) + c * (r_c + r_r)^2, with the
pair's "margin" (a record field; the Llama 2 margin term) and the centering coefficient c
(Eisenstein et al. 2023; TRL's center_rewards_coefficient). It is summed over pairs; the loop divides by
the number of pairs, which gives TRL's per-batch mean.

What is trained is a trainable like any other (trainable.py): RewardModelWeights trains every
weight and exports a Hugging Face sequence classifier; RewardModelAdapters trains LoRA adapters on
`rm.body` (lora.apply_lora) plus the score head in full and exports a PEFT adapter directory with
task_type SEQ_CLS and the head as PEFT saves modules_to_save ["score"] (base_model.model.score.weight),
which PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1),
dir) loads. load_reward_model reads both (an adapter directory on the base its config names).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, TrainError
from . import distributed as D
from .objectives import IGNORE
from .trainable import LoRA, WholeModel, full_state_dict

__all__ = ["RewardModel", "BradleyTerry", "RewardModelWeights", "RewardModelAdapters", "load_reward_model",
           "save_reward_model", "score_pairs", "last_token", "reply_lengths", "tokenizer_dir"]


def last_token(input_ids: torch.Tensor, pad_id: int | None, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """[B] index of each row's last token that is not `pad_id` (among the first lengths[b]): what
    transformers computes as argmax(arange(T) * (ids != pad))."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    keep = input_ids != pad_id if pad_id is not None else torch.ones_like(input_ids, dtype=torch.bool)
    if lengths is not None:
        keep = keep & (pos < lengths.to(input_ids.device)[:, None])
    return (pos * keep).argmax(-1)


def reply_lengths(labels: torch.Tensor) -> torch.Tensor:
    """[B] tokens of each row through its last labelled token (labels[t] is the target of position t)."""
    pos = torch.arange(labels.shape[1], device=labels.device)
    return (pos * (labels != IGNORE)).argmax(-1) + 2


class RewardModel(nn.Module):
    """A Transformer whose LM head is replaced by a bias-free score head [1, dim]: forward(ids) -> rewards [B]."""

    def __init__(self, body: nn.Module):
        super().__init__()
        cfg = body.config
        if cfg.pad_token_id is None and cfg.eos_token_id is not None:
            eos = cfg.eos_token_id
            body.config = cfg = cfg.replace(pad_token_id=eos if isinstance(eos, int) else list(eos)[0])
        self.body = body
        # Transformer.forward ends with lm_head(norm(x)) at the requested positions: with Identity there it
        # returns the final normed hidden state (model.py unchanged; the LM head's weights are not kept).
        body.lm_head = nn.Identity()
        self.score = nn.Linear(cfg.dim, 1, bias=False, device=body.embed.weight.device, dtype=body.embed.weight.dtype)
        nn.init.normal_(self.score.weight, std=cfg.init_std)

    config = property(lambda self: self.body.config)
    layers = property(lambda self: self.body.layers)      # what parallelize() wraps
    device = property(lambda self: self.body.device)
    dtype = property(lambda self: self.body.dtype)
    pad_id = property(lambda self: self.body.config.pad_token_id)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards [B] (fp32) of right-padded rows; `lengths` [B] bounds each row (else the pad id does)."""
        h = self.body(input_ids, logits_at=last_token(input_ids, self.pad_id, lengths))[:, 0]
        return self.score(h).squeeze(-1).float()


# ---------------------------------------------------------------- checkpoints

def seq_cls_format(cfg, format: str | None):
    """The sequence-classification format of a family (default: the plainest that holds cfg)."""
    from ..checkpoint.formats import SEQ_CLS, default_format
    name = format or default_format(cfg).name
    if name not in SEQ_CLS:
        raise TrainError(f"a reward model in the {name} format has no Hugging Face sequence-classification class; "
                         f"use --format {' or '.join(SEQ_CLS)}")
    return SEQ_CLS[name]


def save_reward_model(weights: dict, cfg, path, format: str | None = None, dtype=None, tokenizer_from=None,
                      overwrite: bool = True) -> Path:
    """RewardModel weights (state_dict names: body.*, score.weight) as a Hugging Face
    *ForSequenceClassification directory (num_labels 1, pad_token_id set), through the one writer."""
    from ..checkpoint import write_checkpoint
    tensors = {name.removeprefix("body."): t for name, t in weights.items()}
    return write_checkpoint(path, cfg, tensors, format=seq_cls_format(cfg, format), dtype=dtype,
                            tokenizer_from=tokenizer_from, overwrite=overwrite)


def load_reward_model(path, dtype=None, device=None) -> RewardModel:
    """A RewardModel from a *ForSequenceClassification directory (ours or transformers'/TRL's), or
    from a PEFT SEQ_CLS adapter directory (ours or PEFT's: LoRA folded into its base, the score head
    from the adapter) on the base its adapter_config.json names."""
    from ..checkpoint import Checkpoint
    from ..checkpoint.io import parse_dtype
    from ..lora import Adapter, adapter_base, is_adapter_dir
    from ..model import Transformer, rope_inv_freq
    adapter = None
    if is_adapter_dir(path):
        adapter, path = Path(path), adapter_base(path)
    ckpt = Checkpoint(path)
    adapter = adapter and Adapter(adapter, ckpt.config, ckpt.format, heads=("score",))
    if ckpt.format.head != "score" and "score.weight" not in (adapter.saved if adapter else {}):
        raise CheckpointError(f"{adapter.path if adapter else path}: a {ckpt.format.architecture} is not a reward "
                              "model (it has no score head); train one with `lmfoundry reward`")
    dtype, device = parse_dtype(dtype) or ckpt.dtype, torch.device(device or "cpu")
    with torch.device("meta"):
        rm = RewardModel(Transformer(ckpt.config))
    wanted = rm.state_dict()
    state = {f"body.{name}": (adapter.fold(name, ckpt.read(name)) if adapter else ckpt.read(name))
             for name in ckpt.shapes if f"body.{name}" in wanted}
    state["score.weight"] = adapter.saved["score.weight"] if adapter and adapter.saved else ckpt.read("score.weight")
    if tuple(state["score.weight"].shape) != (1, ckpt.config.dim):
        raise CheckpointError(f"{adapter.path if adapter else path}: score.weight has shape "
                              f"{list(state['score.weight'].shape)}, a reward model's is [1, {ckpt.config.dim}]")
    state = {name: t.to(device=device, dtype=dtype) for name, t in state.items()}
    rm.load_state_dict(state, strict=True, assign=True)
    rm.body.inv_freq = rope_inv_freq(ckpt.config).to(device)
    return rm.eval()


class RewardModelWeights(WholeModel):
    """Every weight of a RewardModel, body and score head; the export is a Hugging Face sequence
    classifier in the body's family (`format`: llama or mistral)."""

    def state_dict(self, model) -> dict[str, torch.Tensor]:
        """Full tensors by the RewardModel's own names (body.*, score.weight): checkpoints keep them
        as they are, never as a causal LM (restated so no causal-LM path is taken for them)."""
        return full_state_dict(model)

    def export(self, model, path, format=None, dtype=None, tokenizer_from=None):
        weights = full_state_dict(model)
        if D.rank_and_world()[0] == 0:
            save_reward_model(weights, model.config, path, format, dtype, tokenizer_from)


class RewardModelAdapters(LoRA):
    """LoRA adapters on a RewardModel's body plus its score head in full; the export is a PEFT
    adapter directory with task_type SEQ_CLS (module docstring)."""

    def named_parameters(self, model) -> dict[str, torch.nn.Parameter]:
        return {**super().named_parameters(model), "score.weight": model.score.weight}

    def export(self, model, path, format=None, dtype=None, tokenizer_from=None):
        from ..lora import save_adapter
        tensors = self.state_dict(model)
        score = tensors.pop("score.weight")
        if D.rank_and_world()[0] == 0:
            save_adapter(model.body, path, {name.removeprefix("body."): t for name, t in tensors.items()},
                         base_model=self.base_model, tokenizer_from=tokenizer_from, overwrite=True,
                         task_type="SEQ_CLS", modules={"score.weight": score})


def tokenizer_dir(path) -> Path:
    """Where a reward model's tokenizer is: its directory, or an adapter's base when the adapter
    directory has no tokenizer files."""
    from ..lora import adapter_base, is_adapter_dir
    path = Path(path)
    if is_adapter_dir(path) and not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return adapter_base(path)
    return path


# ---------------------------------------------------------------- the objective

def pair_rows(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO-style pair batch -> (ids [2B, T] chosen rows then rejected rows, cut to the longest, and
    the length of each through its reply's last labelled token)."""
    sides = [(batch[f"{s}_input_ids"], batch[f"{s}_labels"]) for s in ("chosen", "rejected")]
    lengths = torch.cat([reply_lengths(labels) for _, labels in sides])
    T = int(lengths.max())
    ids = torch.cat([F.pad(ids, (0, max(0, T - ids.shape[1])))[:, :T] for ids, _ in sides])
    return ids, lengths


class BradleyTerry:
    """The pairwise reward-model loss (module docstring). Batch: DPOBatches' pairs (+ "margin" [B]).
    `margin` is used for pairs whose record gives none; `center_rewards_coefficient` is c."""

    name = "reward"

    def __init__(self, center_rewards_coefficient: float = 0.0, margin: float = 0.0):
        if center_rewards_coefficient < 0:
            raise TrainError(f"center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}")
        self.center, self.margin = center_rewards_coefficient, margin

    def count(self, batch) -> torch.Tensor:
        return torch.tensor(batch["chosen_input_ids"].shape[0])

    def tokens(self, batch) -> int:
        return batch["chosen_input_ids"].numel() + batch["rejected_input_ids"].numel()

    def __call__(self, model, batch):
        ids, lengths = pair_rows(batch)
        chosen, rejected = model(ids, lengths).chunk(2)
        margin = batch.get("margin")
        margin = self.margin if margin is None else torch.nan_to_num(margin.float(), nan=self.margin)
        losses = -F.logsigmoid(chosen - rejected - margin)
        if self.center:
            losses = losses + self.center * (chosen + rejected) ** 2
        chosen, rejected = chosen.detach(), rejected.detach()
        stats = {"accuracy": (chosen > rejected).float().sum(), "margin": (chosen - rejected).sum(),
                 "rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum()}
        return losses.sum(), stats


# ---------------------------------------------------------------- lmfoundry reward score

def collate_pairs(pairs: list[tuple]) -> dict:
    """DPOBatches.pairs entries (chosen ids, labels, rejected ids, labels) -> a right-padded batch."""
    T = max(max(len(p[0]), len(p[2])) for p in pairs)
    out = {}
    for k, key in enumerate(("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")):
        fill = IGNORE if key.endswith("labels") else 0
        out[key] = torch.tensor(np.stack([np.pad(p[k], (0, T - len(p[k])), constant_values=fill) for p in pairs]))
    return out


def distribution(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    q = np.quantile(a, [0.1, 0.5, 0.9]) if len(a) else [math.nan] * 3
    return {"mean": float(a.mean()) if len(a) else math.nan, "std": float(a.std(ddof=1)) if len(a) > 1 else math.nan,
            "min": float(a.min()) if len(a) else math.nan, "p10": float(q[0]), "p50": float(q[1]),
            "p90": float(q[2]), "max": float(a.max()) if len(a) else math.nan}


@torch.inference_mode()
def score_pairs(rm: RewardModel, tokenizer, files, batch_size: int = 16, seq_len: int = 1024,
                progress: bool = True) -> dict:
    """Pairwise accuracy (share of pairs with r_chosen > r_rejected) and the reward distribution of
    chosen and rejected replies over every pair of `files` (rendered as reward training renders them)."""
    from tqdm.auto import tqdm

    from ..data import DPOBatches
    pairs = DPOBatches(files, tokenizer, seq_len, 1, epochs=1, progress=progress).pairs
    chosen, rejected = [], []
    for i in tqdm(range(0, len(pairs), batch_size), desc="scoring", unit="batch", disable=not progress):
        ids, lengths = pair_rows(collate_pairs(pairs[i:i + batch_size]))
        r = rm(ids.to(rm.device), lengths).cpu()
        c, rr = r.chunk(2)
        chosen += c.tolist()
        rejected += rr.tolist()
    diffs = np.asarray(chosen) - np.asarray(rejected)
    return {"pairs": len(pairs), "accuracy": float((diffs > 0).mean()), "margin": float(diffs.mean()),
            "ties": int((diffs == 0).sum()), "chosen": distribution(chosen), "rejected": distribution(rejected)}


def format_scores(res: dict) -> str:
    head = f"{'':>9} " + " ".join(f"{k:>8}" for k in res["chosen"])
    rows = [f"{side:>9} " + " ".join(f"{v:8.3f}" for v in res[side].values()) for side in ("chosen", "rejected")]
    return "\n".join([f"{res['pairs']} pairs: accuracy {res['accuracy']:.4f} (chosen scored above rejected), "
                      f"mean margin {res['margin']:+.4f}, ties {res['ties']}", "rewards:", head, *rows])
