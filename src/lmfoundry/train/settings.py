"""Every training setting, once: its type, default, check, help and the verbs that take it.

SETTINGS below is the one table. From it come
    the flags of `lmfoundry pretrain | sft | dpo | reward | online-dpo | grpo`    add_arguments(parser, verb)
    the keys of a `--config` YAML file                  the same names (dashes or underscores)
    TrainConfig, the validated settings of train()     the rows marked train=True, their defaults
and every value, wherever it came from, passes the same parse(): an error names the setting as
the user wrote it (`--lr must be > 0, got -1`, `sft.yaml: lr must be > 0, got -1`).

    resolve("sft", {"lr": 1e-5}, "sft.yaml")   defaults < YAML < flags -> a dict of every setting
    train_config(opts)                         -> TrainConfig
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ..records import read_yaml_mapping
from ..errors import TrainError
from ..lora import DEFAULT_TARGETS as LORA_DEFAULT_TARGETS
from ..lora import TARGETS as LORA_TARGETS
from .metrics import TRACKERS
from .objectives import DPO_LOSSES
from .online import LOSS_TYPES, SCALE_REWARDS
from .rollout import VERIFIERS
from .schedule import SCHEDULES

ONLINE = ("online-dpo", "grpo")                       # the policy samples its own training data
OFFLINE = ("pretrain", "sft", "dpo", "reward")        # training data read from --data
VERBS = OFFLINE + ONLINE


# ---------------------------------------------------------------- checks: value -> problem or None

def at_least(low):
    return lambda v: None if v >= low else f"must be >= {low}"


def above(low):
    return lambda v: None if v > low else f"must be > {low}"


def within(low, high, high_open=False):
    def check(v):
        ok = low <= v < high if high_open else low <= v <= high
        return None if ok else f"must be in [{low}, {high}{')' if high_open else ']'}"
    return check


def one_of(*choices):
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def trackers(names):
    unknown = [n for n in names if n not in TRACKERS]
    return f"must name trackers from {', '.join(TRACKERS)} (or none)" if unknown else None


def lora_targets(names):
    unknown = [n for n in names if n not in LORA_TARGETS]
    return f"must name modules from {', '.join(LORA_TARGETS)}" if unknown or not names else None


# ---------------------------------------------------------------- value types (flags arrive as text)

def floats_pair(v) -> tuple[float, float]:
    """AdamW betas: "0.9,0.95" (a flag) or [0.9, 0.95] (YAML, Python)."""
    parts = v.split(",") if isinstance(v, str) else list(v)
    if len(parts) != 2 or any(isinstance(p, bool) for p in parts):
        raise ValueError(v)
    return float(parts[0]), float(parts[1])


def names_list(v) -> tuple[str, ...]:
    """--report-to tensorboard,wandb (or none) -> ("tensorboard", "wandb")."""
    parts = v.split(",") if isinstance(v, str) else list(v)
    if not all(isinstance(p, str) for p in parts):
        raise ValueError(v)
    return tuple(p.strip() for p in parts if p.strip() and p.strip() != "none")


KINDS: dict[Any, str] = {int: "an integer", float: "a number", bool: "true or false", str: "text",
                         list: "a list of files", floats_pair: "two numbers like 0.9,0.95",
                         names_list: "comma-separated names"}


def coerce(kind, value):
    """`value` as `kind`; ValueError/TypeError when it is not one."""
    if kind is None or value is None:
        return value                                   # YAML-only structures are checked where used
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(value)
    if kind in (int, float):
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise ValueError(value)
        return kind(value)                             # also "3", "1e-3" (YAML 1.1 reads 1e-3 as text)
    if kind is str:
        if isinstance(value, (str, os.PathLike)):
            return str(value)
        raise ValueError(value)
    if kind is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, (str, os.PathLike, dict)) for v in items):
            raise ValueError(value)
        return [v if isinstance(v, dict) else str(v) for v in items]
    return kind(value)


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class Setting:
    type: Callable | None              # None: YAML only (a structure no flag can hold)
    default: Any                       # the library's default (pretrain's)
    help: str
    verbs: tuple[str, ...] = VERBS     # the commands that take it
    check: Callable | None = None      # value -> problem or None
    train: bool = False                # a TrainConfig field
    per_verb: dict = field(default_factory=dict)   # defaults that differ by command

    def default_for(self, verb: str):
        return self.per_verb.get(verb, self.default)


S = Setting
POSITIVE, NONNEG = at_least(1), at_least(0)

SETTINGS: dict[str, Setting] = {
    # model and data
    "model": S(str, None, "a checkpoint directory (any supported format, e.g. a freshly upscaled one) or a preset"),
    "data": S(list, None, "training files: text/.jsonl/.parquet corpora (pretrain), chat .jsonl (sft), "
              "preference .jsonl (dpo, reward)", OFFLINE),
    "prompts": S(list, None, "prompt files (.jsonl/.json/.parquet): records with a prompt (a string or messages) and "
                 "what the scorer needs (the verifier: an answer)", ONLINE),
    "out": S(str, None, "output directory: the final checkpoint, metrics.jsonl, checkpoints/"),
    "tokenizer": S(str, None, "tokenizer directory (needed with a preset; default: the model's)"),
    "eval_data": S(list, None, "held-out files, same kind as --data", OFFLINE),
    "text_field": S(str, "text", "the text field of .jsonl/.parquet corpora", ("pretrain",)),
    "tokenized": S(str, None, "where the tokenized corpus is kept (default: a cache under $LMFOUNDRY_CACHE or "
                   "~/.cache/lmfoundry)", ("pretrain",)),
    "stages": S(None, None, "(YAML only) [{tokens: N, mixture: {source: weight}}] data stages", ("pretrain",)),
    "epochs": S(int, None, "passes over the data; without --steps, train exactly this many epochs",
                ("sft", "dpo", "reward"), POSITIVE),
    "batch_size": S(int, 8, "rows per micro-batch on each process (online-dpo, grpo: prompts)", check=POSITIVE,
                    per_verb={"grpo": 4}),
    "seq_len": S(int, 512, "tokens per row", OFFLINE, POSITIVE, per_verb={"sft": 1024, "dpo": 1024, "reward": 1024}),
    "format": S(str, None, "output checkpoint format (default: the model's)"),
    # optimisation
    "steps": S(int, 100, "optimizer steps", check=POSITIVE, train=True),
    "lr": S(float, 3e-4, "peak learning rate", check=above(0), train=True,
            per_verb={"sft": 2e-5, "dpo": 5e-7, "reward": 1e-4, "online-dpo": 5e-7, "grpo": 1e-6}),
    "warmup": S(int, 0, "linear warmup steps", check=NONNEG, train=True),
    "schedule": S(str, "cosine", "cosine, wsd, wsd-sqrt or constant", check=one_of(*SCHEDULES), train=True),
    "min_lr_ratio": S(float, 0.1, "final lr as a fraction of the peak", check=within(0, 1), train=True),
    "decay_frac": S(float, 0.2, "WSD: share of the steps spent decaying", check=within(0, 1), train=True),
    "weight_decay": S(float, 0.1, "AdamW weight decay (matrices only)", check=NONNEG, train=True,
                      per_verb={"sft": 0.0, "dpo": 0.0, "reward": 0.0, "online-dpo": 0.0, "grpo": 0.0}),
    "betas": S(floats_pair, (0.9, 0.95), "AdamW betas, as b1,b2",
               check=lambda v: None if all(0 <= b < 1 for b in v) else "must each be in [0, 1)", train=True),
    "eps": S(float, 1e-8, "AdamW epsilon", check=above(0), train=True),
    "grad_accum": S(int, 1, "micro-batches per optimizer step", check=POSITIVE, train=True),
    "clip": S(float, 1.0, "max gradient norm (0: off)", check=NONNEG, train=True),
    "seed": S(int, 0, "seed for initialisation and data order", check=NONNEG, train=True),
    # DPO
    "beta": S(float, 0.1, "DPO beta (dpo, online-dpo: > 0); grpo: the KL coefficient (0: no reference model)",
              ("dpo", "online-dpo", "grpo"), NONNEG, per_verb={"grpo": 0.0}),
    "label_smoothing": S(float, 0.0, "conservative-DPO label smoothing eps", ("dpo", "online-dpo"),
                         within(0, 0.5, True)),
    "loss": S(str, "sigmoid", "sigmoid (DPO) or ipo", ("dpo", "online-dpo"), one_of(*DPO_LOSSES)),
    # LoRA / QLoRA (lmfoundry.lora): only the adapters are trained; OUT is a PEFT adapter directory
    "lora_rank": S(int, None, "train rank-R LoRA adapters instead of every weight (OUT: a PEFT adapter)",
                   check=POSITIVE),
    "lora_alpha": S(float, None, "LoRA scale numerator: updates scaled by alpha/rank (default: 2 x rank)",
                    check=above(0)),
    "lora_dropout": S(float, 0.0, "dropout on the adapters' input", check=within(0, 1, True)),
    "lora_targets": S(names_list, LORA_DEFAULT_TARGETS, "modules that get adapters, from "
                      f"{','.join(LORA_TARGETS)}", check=lora_targets),
    "rslora": S(bool, False, "rank-stabilised LoRA: scale by alpha/sqrt(rank)"),
    "dora": S(bool, False, "DoRA: weight-decomposed LoRA (a trained magnitude per output row)"),
    "qlora": S(bool, False, "QLoRA: the base's projections held in 4-bit NF4 (torchao), dequantized per layer"),
    # reward models (TRL RewardTrainer)
    "center_rewards_coefficient": S(float, 0.0, "reward centering: + c * (r_chosen + r_rejected)^2 per pair "
                                    "(Eisenstein et al.; TRL suggests 0.01)", ("reward",), NONNEG),
    "margin": S(float, 0.0, "margin in -log sigmoid(r_chosen - r_rejected - margin) for pairs whose record has no "
                "'margin' field", ("reward",)),
    # online: sampling and scoring
    "prompt_field": S(str, "prompt", "the prompt field of the prompt records", ONLINE),
    "num_generations": S(int, 2, "samples of each prompt (online-dpo: k, best vs worst; grpo: the group size G)",
                         ONLINE, at_least(2), per_verb={"grpo": 8}),
    "max_new_tokens": S(int, 64, "tokens sampled per completion at most", ONLINE, POSITIVE, per_verb={"grpo": 256}),
    "temperature": S(float, 0.9, "sampling temperature", ONLINE, above(0), per_verb={"grpo": 1.0}),
    "top_p": S(float, 1.0, "nucleus sampling (1: off)", ONLINE, lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
    "top_k": S(int, 0, "top-k sampling (0: off)", ONLINE, NONNEG),
    "reward": S(str, None, "score samples with this reward model (a *ForSequenceClassification directory; "
                "texts are re-tokenized with its own tokenizer)", ONLINE),
    "verifier": S(str, None, f"score samples with a verifier: {', '.join(VERIFIERS)} (math: the completion's "
                  "first `#### N` against the record's answer, eval's GSM8K parser)", ONLINE, one_of(*VERIFIERS)),
    "answer_field": S(str, "answer", "the record field the verifier compares with (and the judge's reference)", ONLINE),
    "judge": S(str, None, "score samples with an OpenAI-compatible judge at this base URL, e.g. "
               "http://localhost:8000/v1 (API key: $OPENAI_API_KEY)", ONLINE),
    "judge_model": S(str, "judge", "the judge's model name", ONLINE),
    "judge_cache": S(str, None, "judgment cache (default: OUT/judge_cache.jsonl)", ONLINE),
    # GRPO (TRL GRPOTrainer's names and defaults)
    "epsilon": S(float, 0.2, "clip the importance ratio to [1 - epsilon, 1 + epsilon_high]", ("grpo",), NONNEG),
    "epsilon_high": S(float, None, "upper clip (default: epsilon; DAPO uses 0.28)", ("grpo",), NONNEG),
    "loss_type": S(str, "dapo", f"loss aggregation as TRL: {', '.join(LOSS_TYPES)}", ("grpo",), one_of(*LOSS_TYPES)),
    "scale_rewards": S(str, "group", "advantages divided by the group's reward std (group) or not (none)",
                       ("grpo",), one_of(*SCALE_REWARDS)),
    "num_iterations": S(int, 1, "optimizer steps on each set of samples (mu)", ("grpo",), POSITIVE),
    "mask_truncated": S(bool, False, "leave completions cut by --max-new-tokens out of the loss (DAPO)", ("grpo",)),
    "kl_bias_correction": S(bool, True, "weight the KL term by the importance ratio (DeepSeek-V3.2; TRL's default)",
                            ("grpo",)),
    # bookkeeping and hardware
    "log_every": S(int, 1, "log every N steps", check=POSITIVE, train=True),
    "eval_every": S(int, 0, "held-out loss every N steps (and at the end)", OFFLINE, NONNEG, train=True),
    "eval_batches": S(int, 8, "held-out batches per evaluation", OFFLINE, POSITIVE, train=True),
    "save_every": S(int, 0, "checkpoint every N steps (always at the end)", check=NONNEG, train=True),
    "keep_checkpoints": S(int, 3, "newest checkpoints kept (0: all)", check=NONNEG, train=True),
    "device": S(str, "auto", "auto, cpu, cuda, cuda:1 ...", train=True),
    "dtype": S(str, "auto", "autocast dtype: auto (bf16 where the GPU/CPU has bf16 units, else fp32), float32, "
               "bfloat16",
               check=one_of("auto", "float32", "fp32", "bfloat16", "bf16"), train=True),
    "save_dtype": S(str, None, "dtype of the final weights (default: the model's)", train=True),
    "compile": S(bool, False, "torch.compile each block", train=True),
    "activation_checkpointing": S(bool, False, "recompute activations in backward", train=True),
    "fsdp": S(bool, False, "shard with FSDP2 under torchrun (default there: DDP)", train=True),
    "report_to": S(names_list, (), "trackers besides OUT/metrics.jsonl: tensorboard (OUT/tensorboard), wandb "
                   "(offline, OUT/wandb), none; comma-separated for several", check=trackers, train=True),
    "tensorboard": S(bool, False, "the same as --report-to tensorboard", train=True),
    "progress": S(bool, True, "show the progress bar", train=True),
    "resume": S(bool, False, "continue from the newest checkpoint in OUT"),
    "overwrite": S(bool, False, "replace OUT if it exists"),
}
TRAIN_SETTINGS = tuple(name for name, s in SETTINGS.items() if s.train)


def settings_for(verb: str) -> dict[str, Setting]:
    return {k: s for k, s in SETTINGS.items() if verb in s.verbs}


def parse(name: str, value, where: str | None = None):
    """`value` for setting `name`, converted and checked; errors say `where` (the flag or the
    file and key as the user wrote them; default the name)."""
    s, where = SETTINGS[name], where or name
    given = value if isinstance(value, str) and where.startswith("--") else repr(value)   # as typed / as read
    try:
        value = coerce(s.type, value)
    except (TypeError, ValueError):
        raise TrainError(f"{where} must be {KINDS.get(s.type, 'valid')}, got {given}") from None
    problem = s.check(value) if s.check is not None and value is not None else None
    if problem:
        raise TrainError(f"{where} {problem}, got {given}")
    return value


# ---------------------------------------------------------------- TrainConfig: the train=True rows

class _Checked:
    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, parse(f.name, getattr(self, f.name)))
        if self.tensorboard and "tensorboard" not in self.report_to:    # the old flag, kept as an alias
            self.report_to = (*self.report_to, "tensorboard")

    @classmethod
    def from_dict(cls, d: dict, where: str = "config"):
        unknown = sorted(set(d) - set(TRAIN_SETTINGS))
        if unknown:
            raise TrainError(f"{where}: unknown training setting(s) {', '.join(unknown)}")
        return cls(**d)


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", [(n, SETTINGS[n].type if isinstance(SETTINGS[n].type, type) else Any,
                     field(default=SETTINGS[n].default)) for n in TRAIN_SETTINGS],
    bases=(_Checked,), namespace={"__module__": __name__})
TrainConfig.__doc__ = ("The settings of one train() call, checked on construction; fields and defaults are the "
                       "train=True rows of lmfoundry.train.settings.SETTINGS: " + ", ".join(TRAIN_SETTINGS))


# ---------------------------------------------------------------- command line and YAML

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> argparse.ArgumentParser:
    """The flags of one training command. Unset flags stay out of the namespace (SUPPRESS), so
    --config values win over defaults and flags over both; values arrive as text for parse()."""
    parser.add_argument("--config", metavar="FILE.yaml", help="settings file (the same names as the flags); "
                        "flags win")
    for name, s in settings_for(verb).items():
        shown = s.default_for(verb)
        shown = ",".join(map(str, shown)) if isinstance(shown, tuple) else shown
        text = s.help + (f" (default: {shown})" if shown not in (None, (), "") and s.type is not bool else "")
        if s.type is None:
            continue                                   # YAML only
        if s.type is bool and s.default is True:
            parser.add_argument("--no-" + flag(name)[2:], dest=name, action="store_false",
                                default=argparse.SUPPRESS, help="do not: " + s.help)
        elif s.type is bool:
            parser.add_argument(flag(name), action="store_true", default=argparse.SUPPRESS, help=s.help)
        elif s.type is list:
            parser.add_argument(flag(name), nargs="+", metavar="FILE", default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag(name), default=argparse.SUPPRESS, help=text)
    return parser


def resolve(verb: str, flags: dict, config_file: str | None = None) -> dict:
    """Every setting of `verb`: its default, then the YAML file, then `flags` (the command line,
    or a dict from Python), each value parsed. "_given" lists what was set explicitly."""
    known = settings_for(verb)
    given: dict = {}
    if config_file:
        loaded, _ = read_yaml_mapping(config_file, TrainError, "a mapping of settings")
        spelled: dict[str, str] = {}
        unknown = [str(k) for k in loaded if str(k).replace("-", "_") not in known]
        if unknown:
            raise TrainError(f"{config_file}: unknown setting(s) for {verb}: {', '.join(unknown)}")
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name in spelled:
                raise TrainError(f"{config_file}: {spelled[name]} and {key} are the same setting")
            spelled[name] = str(key)
            given[name] = parse(name, value, f"{config_file}: {key}")
    given.update({k: parse(k, v, flag(k)) for k, v in flags.items() if k in known})
    out = {k: s.default_for(verb) for k, s in known.items()}
    out.update(given)
    out["_given"] = sorted(given)
    for key in ("model", "prompts" if verb in ONLINE else "data", "out"):
        if not out.get(key):
            raise TrainError(f"{verb}: {flag(key)} is required (on the command line or in --config)")
    return out


def train_config(opts: dict, **override) -> TrainConfig:
    """The TrainConfig of resolved settings (values already parsed; rows a verb lacks keep their defaults)."""
    return TrainConfig(**{**{k: opts[k] for k in TRAIN_SETTINGS if k in opts}, **override})
