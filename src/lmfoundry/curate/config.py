"""The curation pipeline as declared in YAML, checked key by key.

    inputs: [raw/, extra.jsonl.gz]   # files or directories: .txt .jsonl .json .parquet (+ .gz/.zst)
    output: curated/
    text_field: text                 # records' text field / parquet column (chat and preference
                                     # records without it are read as their messages / prompt+answers)
    txt_mode: paragraph              # .txt documents: paragraph | line | file
    format: jsonl                    # kept documents: jsonl | parquet
    shards: 8                        # work units (input files are dealt round-robin); default: one per file
    workers: 2                       # processes on this machine; default: every core
    steps:                           # applied in order; a step is `name` or `name: {settings}`
      - language: {keep: [en, ko]}
      - gopher_quality                # the published defaults (per-language ones for Korean)
      - gopher_repetition
      - c4
      - fineweb
      - classifier: {model: quality.bin, threshold: 0.2}
      - redact
      - decontaminate: {tasks: [arc_challenge, gsm8k], data_dir: evaldata/}
      - dedup: {threshold: 0.8}       # must be last: it compares every document with every other

Every unknown step or key is an error naming the file, the step's position and the key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import DataError
from . import filters, pii

STEP_SETTINGS: dict[str, dict] = {
    "language": {"keep": None, "backend": "script", "min_score": 0.0},
    **{name: {**defaults, "languages": {}} for name, defaults in filters.DEFAULTS.items()},
    "classifier": {"model": None, "threshold": None},
    "redact": {"types": list(pii.TYPES), "public_ips_only": True},
    "decontaminate": {"tasks": None, "data_dir": None, "n": 13, "action": "remove"},
    "dedup": {"exact": True, "near": True, "threshold": 0.8, "num_perm": 112, "ngram": 5, "bands": None,
              "rows": None, "seed": 1},
}
REQUIRED = {"classifier": ("model",), "decontaminate": ("tasks", "data_dir")}
CHOICES = {("language", "backend"): ("script", "langid"), ("decontaminate", "action"): ("remove", "flag")}
TOP_KEYS = {"inputs", "output", "text_field", "txt_mode", "format", "shards", "workers", "steps"}
FORMATS = ("jsonl", "parquet")


@dataclass
class Config:
    inputs: list[str]
    output: str
    steps: list[tuple[str, dict]]
    text_field: str = "text"
    txt_mode: str = "paragraph"
    format: str = "jsonl"
    shards: int | None = None
    workers: int | None = None
    source: str = "config"
    extra: dict = field(default_factory=dict)

    @property
    def dedup(self) -> dict | None:
        return dict(self.steps[-1][1]) if self.steps and self.steps[-1][0] == "dedup" else None

    @property
    def n_workers(self) -> int:
        return max(1, self.workers or os.cpu_count() or 1)

    def describe(self) -> dict:
        return {"inputs": self.inputs, "text_field": self.text_field, "txt_mode": self.txt_mode, "format": self.format,
                "shards": self.shards, "steps": [{n: p} for n, p in self.steps]}


def parse_step(item, where: str) -> tuple[str, dict]:
    """One `steps` entry: "name" or {name: {key: value}}; returns (name, full settings)."""
    if isinstance(item, str):
        name, given = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        (name, given), = item.items()
        given = {} if given is None else given
    else:
        raise DataError(f"{where}: a step is a name or a one-key mapping {{name: {{settings}}}}, got {item!r}")
    if name not in STEP_SETTINGS:
        raise DataError(f"{where}: unknown step '{name}' (known: {', '.join(STEP_SETTINGS)})")
    if not isinstance(given, dict):
        raise DataError(f"{where} ({name}): settings must be a mapping, got {type(given).__name__}")
    known = STEP_SETTINGS[name]
    for key, value in given.items():
        if key not in known:
            raise DataError(f"{where} ({name}): unknown key '{key}' (known: {', '.join(known)})")
        choices = CHOICES.get((name, key))
        if choices and value not in choices:
            raise DataError(f"{where} ({name}): {key} must be one of {', '.join(choices)}, got {value!r}")
    for key in REQUIRED.get(name, ()):
        if given.get(key) in (None, "", []):
            raise DataError(f"{where} ({name}): '{key}' is required")
    if name in filters.DEFAULTS:
        for lang, over in (given.get("languages") or {}).items():
            bad = set(over or {}) - set(filters.DEFAULTS[name])
            if bad:
                raise DataError(f"{where} ({name}): languages.{lang}: unknown key(s) {sorted(bad)}")
    if name == "redact":
        bad = set(given.get("types", [])) - set(pii.TYPES)
        if bad:
            raise DataError(f"{where} (redact): unknown PII type(s) {sorted(bad)} (known: {', '.join(pii.TYPES)})")
    if name == "decontaminate" and isinstance(given.get("tasks"), str):
        given = {**given, "tasks": [t for t in given["tasks"].split(",") if t]}
    if name in filters.DEFAULTS:
        return name, given          # filters.settings() layers defaults, language defaults and these
    return name, {**known, **given}


def make_config(data: dict, source: str = "config", **overrides) -> Config:
    """A Config from a mapping (the YAML's), with CLI overrides (None = not given)."""
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise DataError(f"{source}: unknown key(s) {sorted(unknown)} (known: {', '.join(sorted(TOP_KEYS))})")
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    inputs = data.get("inputs")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise DataError(f"{source}: 'inputs' is required (files or directories)")
    if not data.get("output"):
        raise DataError(f"{source}: 'output' is required (a directory)")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise DataError(f"{source}: 'steps' must be a non-empty list")
    steps = [parse_step(s, f"{source}: steps[{i}]") for i, s in enumerate(raw_steps)]
    for i, (name, _) in enumerate(steps[:-1]):
        if name == "dedup":
            raise DataError(f"{source}: steps[{i}]: dedup must be the last step (it needs every document's "
                            "signature; run the other steps before it)")
    fmt = data.get("format", "jsonl")
    if fmt not in FORMATS:
        raise DataError(f"{source}: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    for key in ("shards", "workers"):
        v = data.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise DataError(f"{source}: {key} must be a positive integer, got {v!r}")
    return Config(inputs=[str(p) for p in inputs], output=str(data["output"]), steps=steps,
                  text_field=data.get("text_field", "text"), txt_mode=data.get("txt_mode", "paragraph"), format=fmt,
                  shards=data.get("shards"), workers=data.get("workers"), source=source)


def load_config(path, **overrides) -> Config:
    from ..records import read_yaml_mapping
    data, _ = read_yaml_mapping(path, DataError)
    return make_config(data, str(path), **overrides)
