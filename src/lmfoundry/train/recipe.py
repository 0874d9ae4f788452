"""What `lmfoundry pretrain | sft | dpo` run: a model, data and an objective handed to train().

    run("pretrain", resolve("pretrain", {"model": "tiny", "tokenizer": "tok/", "data": ["corpus.txt"],
                                         "out": "runs/a", "steps": 100}))

The settings (defaults < a YAML file < flags) come from lmfoundry.train.settings: resolve()
gives every setting of a command, run() builds what they describe and trains.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

from ..errors import TrainError
from . import distributed as D
from .loop import train
from .settings import VERBS, resolve, train_config
from .state import prepare_out_dir

__all__ = ["run", "resolve", "build_model", "VERBS"]


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
    from ..checkpoint import read_config
    from ..tokenizer import load_tokenizer
    if verb not in VERBS:
        raise TrainError(f"unknown training verb {verb!r}")
    run_dir = prepare_out_dir(opts["out"], opts["resume"], opts["overwrite"])   # before any expensive work
    try:
        model_dir = opts["model"] if Path(opts["model"]).is_dir() else None
        tokenizer_dir = opts["tokenizer"] or model_dir
        if tokenizer_dir is None:
            raise TrainError(f"--model {opts['model']} is a preset, which has no tokenizer: give --tokenizer DIR")
        tokenizer = load_tokenizer(tokenizer_dir)
        model = build_model(opts["model"], tokenizer, opts["seed"])
        if opts["seq_len"] > model.config.max_seq_len:
            raise TrainError(f"--seq-len {opts['seq_len']} is longer than the model's context "
                             f"{model.config.max_seq_len}")
        batches, eval_batches, objective = _data_and_objective(verb, opts, tokenizer, tokenizer_dir)
        steps = opts["steps"]
        if "steps" not in opts["_given"] and opts.get("epochs"):
            steps = max(1, math.ceil(len(batches) / opts["grad_accum"]))   # exactly the epochs asked for
        fmt = opts["format"] or (read_config(model_dir)[1].name if model_dir else None)
        info = {"verb": verb, **{k: v for k, v in opts.items() if not k.startswith("_")}}
        return train(model, batches, objective, train_config(opts, steps=steps), run_dir, eval_batches=eval_batches,
                     tokenizer_from=tokenizer_dir, format=fmt, run_info=info)
    finally:
        if D.rank_and_world()[1] > 1 and D.dist.is_initialized():
            D.dist.destroy_process_group()


def _data_and_objective(verb: str, opts: dict, tokenizer, tokenizer_dir):
    """(training batches, held-out batches or None, objective) for this rank."""
    from ..data import DPOBatches, PackedBatches, SFTBatches
    from .objectives import DPO, SFT, NextToken
    rank, world = D.rank_and_world()
    seq_len, batch_size, seed = opts["seq_len"], opts["batch_size"], opts["seed"]
    shard = {"rank": rank, "world_size": world}
    if verb == "pretrain":
        batches = PackedBatches(_sources(opts["data"], tokenizer_dir, opts), seq_len, batch_size, seed,
                                opts["stages"], **shard)
        eval_batches = (PackedBatches(_sources(opts["eval_data"], tokenizer_dir, opts, "-eval"), seq_len, batch_size,
                                      seed, **shard) if opts["eval_data"] else None)
        return batches, eval_batches, NextToken()
    cls = SFTBatches if verb == "sft" else DPOBatches
    show = opts["progress"] and rank == 0
    batches = cls([str(f) for f in opts["data"]], tokenizer, seq_len, batch_size, seed, epochs=opts["epochs"],
                  progress=show, **shard)
    eval_batches = (cls([str(f) for f in opts["eval_data"]], tokenizer, seq_len, batch_size, seed, epochs=1,
                        progress=show, **shard) if opts["eval_data"] else None)
    objective = SFT() if verb == "sft" else DPO(opts["beta"], opts["label_smoothing"], opts["loss"])
    return batches, eval_batches, objective
