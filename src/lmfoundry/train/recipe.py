"""What `lmfoundry pretrain | sft | dpo` run: a model, data and an objective handed to train().

    run("pretrain", {"model": "tiny", "tokenizer": "tok/", "data": ["corpus.txt"], "out": "runs/a", "steps": 100})

Settings come from three layers, later winning: the defaults below, a YAML file (`config`),
and the command-line flags. SETTINGS is the single table of every setting: the CLI builds its
flags from it and the YAML keys are the same names (dashes or underscores).
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path


from ..checkpoint.io import read_yaml_mapping
from .loop import TrainConfig, TrainError, prepare_out_dir, train

VERBS = ("pretrain", "sft", "dpo")

# name: (type, default (or {verb: default}), help, verbs that take it (None: all))
SETTINGS: dict[str, tuple] = {
    # model and data
    "model": (str, None, "a checkpoint directory (any supported format, e.g. a freshly upscaled one) or a preset",
              None),
    "data": (list, None, "training files: text/.jsonl/.parquet corpora (pretrain), chat .jsonl (sft), "
             "preference .jsonl (dpo)", None),
    "out": (str, None, "output directory: the final checkpoint, metrics.jsonl, checkpoints/", None),
    "tokenizer": (str, None, "tokenizer directory (needed with a preset; default: the model's)", None),
    "eval_data": (list, None, "held-out files, same kind as --data", None),
    "text_field": (str, "text", "the text field of .jsonl/.parquet corpora", ("pretrain",)),
    "tokenized": (str, None, "where the tokenized corpus is kept (default: a cache under "
                  "$LMFOUNDRY_CACHE or ~/.cache/lmfoundry)", ("pretrain",)),
    "stages": (None, None, "(YAML only) [{tokens: N, mixture: {source: weight}}] data stages", ("pretrain",)),
    "epochs": (int, None, "passes over the data; without --steps, train exactly this many epochs", ("sft", "dpo")),
    "batch_size": (int, 8, "rows per micro-batch on each process", None),
    "seq_len": (int, {"pretrain": 512, "sft": 1024, "dpo": 1024}, "tokens per row", None),
    "format": (str, None, "output checkpoint format (default: the model's)", None),
    # optimisation
    "steps": (int, 100, "optimizer steps", None),
    "lr": (float, {"pretrain": 3e-4, "sft": 2e-5, "dpo": 5e-7}, "peak learning rate", None),
    "warmup": (int, 0, "linear warmup steps", None),
    "schedule": (str, "cosine", "cosine, wsd, wsd-sqrt or constant", None),
    "min_lr_ratio": (float, 0.1, "final lr as a fraction of the peak", None),
    "decay_frac": (float, 0.2, "WSD: share of the steps spent decaying", None),
    "weight_decay": (float, {"pretrain": 0.1, "sft": 0.0, "dpo": 0.0}, "AdamW weight decay (matrices only)", None),
    "betas": (str, "0.9,0.95", "AdamW betas, as b1,b2", None),
    "grad_accum": (int, 1, "micro-batches per optimizer step", None),
    "clip": (float, 1.0, "max gradient norm (0: off)", None),
    "seed": (int, 0, "seed for initialisation and data order", None),
    # DPO
    "beta": (float, 0.1, "DPO beta", ("dpo",)),
    "label_smoothing": (float, 0.0, "conservative-DPO label smoothing eps", ("dpo",)),
    "loss": (str, "sigmoid", "sigmoid (DPO) or ipo", ("dpo",)),
    # bookkeeping and hardware
    "log_every": (int, 1, "log every N steps", None),
    "eval_every": (int, 0, "held-out loss every N steps (and at the end)", None),
    "eval_batches": (int, 8, "held-out batches per evaluation", None),
    "save_every": (int, 0, "checkpoint every N steps (always at the end)", None),
    "keep_checkpoints": (int, 3, "newest checkpoints kept (0: all)", None),
    "device": (str, "auto", "auto, cpu, cuda, cuda:1 ...", None),
    "dtype": (str, "auto", "autocast dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16", None),
    "save_dtype": (str, None, "dtype of the final weights (default: the model's)", None),
    "compile": (bool, False, "torch.compile each block", None),
    "activation_checkpointing": (bool, False, "recompute activations in backward", None),
    "fsdp": (bool, False, "shard with FSDP2 under torchrun (default there: DDP)", None),
    "tensorboard": (bool, False, "also log to OUT/tensorboard", None),
    "progress": (bool, True, "show the progress bar", None),
    "resume": (bool, False, "continue from the newest checkpoint in OUT", None),
    "overwrite": (bool, False, "replace OUT if it exists", None),
}
TRAIN_FIELDS = {"steps", "lr", "warmup", "schedule", "min_lr_ratio", "decay_frac", "weight_decay", "grad_accum",
                "clip", "log_every", "eval_every", "eval_batches", "save_every", "keep_checkpoints", "seed",
                "device", "dtype", "save_dtype", "compile", "activation_checkpointing", "fsdp", "progress",
                "tensorboard"}


def settings_for(verb: str) -> dict[str, tuple]:
    return {k: v for k, v in SETTINGS.items() if v[3] is None or verb in v[3]}


def resolve(verb: str, flags: dict, config_file: str | None = None) -> dict:
    """Defaults, then the YAML file, then the flags given on the command line."""
    known = settings_for(verb)
    from_file = {}
    if config_file:
        loaded, _ = read_yaml_mapping(config_file, TrainError, "a mapping of settings")
        from_file = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(from_file) - set(known))
        if unknown:
            raise TrainError(f"{config_file}: unknown setting(s) for {verb}: {', '.join(unknown)}")
        for key in ("data", "eval_data"):
            if isinstance(from_file.get(key), (str, dict)):
                from_file[key] = [from_file[key]]
    given = {**from_file, **{k: v for k, v in flags.items() if k in known}}
    out = {k: (d[verb] if isinstance(d, dict) else d) for k, (_, d, _, _) in known.items()}
    out.update(given)
    out["_given"] = sorted(given)
    for key in ("model", "data", "out"):
        if not out.get(key):
            raise TrainError(f"{verb}: --{key} is required (on the command line or in --config)")
    return out


def _train_config(opts: dict, steps: int) -> TrainConfig:
    try:
        betas = tuple(float(b) for b in str(opts["betas"]).split(","))
    except ValueError:
        raise TrainError(f"--betas must look like 0.9,0.95, got {opts['betas']!r}") from None
    fields = {k: opts[k] for k in TRAIN_FIELDS}
    fields["steps"] = steps
    return TrainConfig(betas=betas, **fields)


def build_model(spec: str, tokenizer, seed: int):
    """A checkpoint directory (loaded as is) or a preset (random init, special token ids taken
    from the tokenizer)."""
    import torch

    from ..checkpoint import load_model
    from ..config import PRESETS, ModelConfig
    from ..model import Transformer
    if Path(spec).is_dir():
        model = load_model(spec)
    elif spec in PRESETS:
        cfg = ModelConfig.from_preset(spec)
        if tokenizer is not None:
            ids = {k: getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
            cfg = cfg.replace(**{f"{k}_token_id": v for k, v in ids.items() if v is not None})
        torch.manual_seed(seed)
        model = Transformer(cfg)
    else:
        raise TrainError(f"--model {spec}: neither a checkpoint directory nor a preset "
                         f"(presets: {', '.join(sorted(PRESETS))})")
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise TrainError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}")
    return model


def _tokenized_dir(files, tokenizer_dir, text_field, given: str | None) -> Path:
    if given:
        return Path(given)
    from ..data.corpus import tokenizer_fingerprint
    from ..records import expand_files
    h = hashlib.sha256()
    for f in expand_files(files):
        h.update(str(Path(f).resolve()).encode() + b"\0")
    h.update(tokenizer_fingerprint(tokenizer_dir).encode() + text_field.encode())
    root = Path(os.environ.get("LMFOUNDRY_CACHE") or Path.home() / ".cache" / "lmfoundry")
    return root / "tokenized" / h.hexdigest()[:16]


def _corpus(files, tokenizer_dir, text_field, where, progress):
    """Tokenize once (rank 0), then every rank opens the shards."""
    from ..data import tokenize_corpus
    from . import distributed as D
    rank, _ = D.rank_and_world()
    if rank == 0:
        ds = tokenize_corpus(files, tokenizer_dir, where, text_field=text_field, progress=progress)
    D.barrier()
    if rank != 0:
        ds = tokenize_corpus(files, tokenizer_dir, where, text_field=text_field, progress=False)
    return ds


def _sources(entries, tokenizer_dir, opts, suffix=""):
    """--data files -> PackedBatches sources. YAML may give {name, path(s), weight} entries for a mixture."""
    plain = [e for e in entries if not isinstance(e, dict)]
    mixture = [e for e in entries if isinstance(e, dict)]
    sources = {}
    if plain:
        where = _tokenized_dir(plain, tokenizer_dir, opts["text_field"], opts["tokenized"] and
                               str(Path(opts["tokenized"]) / f"corpus{suffix}"))
        sources["corpus"] = (_corpus(plain, tokenizer_dir, opts["text_field"], where, opts["progress"]), 1.0)
    for i, e in enumerate(mixture):
        files = e.get("paths") or e.get("path")
        if not files:
            raise TrainError(f"data entry {i}: needs 'path' (or 'paths')")
        name = str(e.get("name", f"source{i}"))
        where = _tokenized_dir(files, tokenizer_dir, opts["text_field"], opts["tokenized"] and
                               str(Path(opts["tokenized"]) / f"{name}{suffix}"))
        sources[name] = (_corpus(files, tokenizer_dir, opts["text_field"], where, opts["progress"]),
                         float(e.get("weight", 1.0)))
    return sources


def run(verb: str, opts: dict):
    """Build everything `opts` (from resolve()) describes and train. Returns the TrainResult."""
    from ..data import DPOBatches, PackedBatches, SFTBatches
    from ..tokenizer import load_tokenizer
    from . import distributed as D
    from .objectives import DPO, SFT, NextToken

    if verb not in VERBS:
        raise TrainError(f"unknown training verb {verb!r}")
    rank, world = D.init_distributed()
    out = Path(opts["out"])
    prepare_out_dir(out, opts["resume"], opts["overwrite"])     # refuse before any expensive work
    D.barrier()

    model_is_dir = Path(opts["model"]).is_dir()
    tokenizer_dir = opts["tokenizer"] or (opts["model"] if model_is_dir else None)
    if tokenizer_dir is None:
        raise TrainError(f"--model {opts['model']} is a preset, which has no tokenizer: give --tokenizer DIR")
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(opts["model"], tokenizer, opts["seed"])
    if opts["seq_len"] > model.config.max_seq_len:
        raise TrainError(f"--seq-len {opts['seq_len']} is longer than the model's context {model.config.max_seq_len}")

    seq_len, batch_size, seed = opts["seq_len"], opts["batch_size"], opts["seed"]
    shard = {"rank": rank, "world_size": world}
    if verb == "pretrain":
        sources = _sources(opts["data"], tokenizer_dir, opts)
        batches = PackedBatches(sources, seq_len, batch_size, seed, opts["stages"], **shard)
        eval_batches = (PackedBatches(_sources(opts["eval_data"], tokenizer_dir, opts, "-eval"), seq_len, batch_size,
                                      seed, **shard) if opts["eval_data"] else None)
        objective = NextToken()
    else:
        cls = SFTBatches if verb == "sft" else DPOBatches
        show = opts["progress"] and rank == 0
        files = [str(f) for f in opts["data"]]
        batches = cls(files, tokenizer, seq_len, batch_size, seed, epochs=opts["epochs"], progress=show, **shard)
        eval_batches = (cls([str(f) for f in opts["eval_data"]], tokenizer, seq_len, batch_size, seed, epochs=1,
                            progress=show, **shard) if opts["eval_data"] else None)
        if verb == "sft":
            objective = SFT()
        else:
            try:
                objective = DPO(opts["beta"], opts["label_smoothing"], opts["loss"])
            except ValueError as e:
                raise TrainError(str(e)) from None

    steps = opts["steps"]
    if "steps" not in opts["_given"] and opts.get("epochs"):
        steps = max(1, math.ceil(len(batches) / opts["grad_accum"]))   # exactly the epochs asked for
    cfg = _train_config(opts, steps)
    info = {"verb": verb, **{k: v for k, v in opts.items() if not k.startswith("_")}}
    try:
        return train(model, batches, objective, cfg, out, eval_batches=eval_batches, resume=opts["resume"],
                     tokenizer_from=tokenizer_dir, format=opts["format"], run_info=info)
    finally:
        if world > 1 and D.dist.is_initialized():
            D.dist.destroy_process_group()
