"""lm-evaluation-harness 0.4 task YAML, read as lm-eval reads it: the files, their includes, task and
group resolution, the checks, and where each split's documents come from.

    specs = resolve(["path/to/task.yaml", "lm_eval/tasks/kobest/"], include_paths=[], data_dir="data/")
    # -> [TaskSpec | GroupSpec]; eval.yaml_eval runs them through eval.LM

- `include: base.yaml` (or a list) merges the base file(s) first, relative to the including file; the
  including file's keys win. A directory given as a task runs its top-level groups (those no other
  group there lists) and the tasks no group covers; a name is looked up in `--include-path`
  directories (a group's `task:` list may name tasks, groups or `tag`s, or define them inline).
- `!function utils.fn` names Python code in utils.py next to the YAML that wrote it. It is only
  loaded with allow_code=True (`--allow-code`); otherwise the run is refused naming the key and file.
- Every key is checked: a key lm-eval has but lmfoundry does not run (custom_dataset, use_prompt,
  images, audio, unsafe_code, ...) is refused by name, never ignored. So are unknown metrics,
  aggregations, filters, fewshot samplers and generation settings.
- Data never comes from the Hub. `dataset_path: json|csv|parquet` with `dataset_kwargs.data_files`
  (a path, a list, or {split: path}; relative to the working directory, else to the YAML) names
  local files; a path without a split is the "train" split, as in Hugging Face `datasets`. A Hub id
  (`skt/kobest_v1`) is looked for under `data_dir`: DATA/<dataset_path>/<dataset_name>/<split>.<ext>
  (also <split>-*.<ext> shards, and the Hub's own data/<dataset_name>-<split>.csv layout of KMMLU).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import EvalDataError
from . import metrics as M
from .data import EXTENSIONS

# ---- the keys (data: what each is, and what lmfoundry does with it) ----
TASK_KEYS = {
    "task": "task name", "task_alias": "name shown in the results", "tag": "labels (a set of tasks)",
    "dataset_path": "json/csv/parquet, a local directory, or a Hub id found under --data-dir",
    "dataset_name": "the dataset's config (subset)", "dataset_kwargs": "data_files (and data_dir)",
    "data_files": "lmfoundry shorthand for dataset_kwargs.data_files",
    "training_split": "split", "validation_split": "split", "test_split": "split", "fewshot_split": "split",
    "process_docs": "!function applied to every split", "doc_to_text": "column, Jinja, int or !function",
    "doc_to_target": "column, Jinja, int, list or !function", "doc_to_choice": "column, Jinja, list, dict or !function",
    "process_results": "!function (doc, results) -> {metric: value}", "description": "Jinja, before the shots",
    "target_delimiter": "between input and target", "fewshot_delimiter": "between examples",
    "fewshot_config": "sampler, split, samples, fewshot_indices, per-shot doc_to_* and delimiters",
    "num_fewshot": "shots", "metric_list": "metrics", "output_type": "request type",
    "generation_kwargs": "until, max_gen_toks, do_sample, temperature", "repeats": "samples per document",
    "filter_list": "named response filters", "gen_prefix": "text after the prompt", "metadata": "version, ...",
    "should_decontaminate": "no effect (lm-eval 0.4 does not decontaminate either)",
    "doc_to_decontamination_query": "no effect (as in lm-eval 0.4)",
}
REFUSED_KEYS = {
    "custom_dataset": "a Python dataset builder", "use_prompt": "promptsource prompts", "class": "Python task classes",
    "doc_to_image": "images", "doc_to_audio": "audio", "unsafe_code": "executing generated code",
    "task_list": "the old task_list form",
}
GROUP_KEYS = ("group", "group_alias", "task", "aggregate_metric_list", "metadata")
FEWSHOT_KEYS = ("sampler", "split", "process_docs", "fewshot_indices", "samples", "doc_to_text", "doc_to_choice",
                "doc_to_target", "gen_prefix", "fewshot_delimiter", "target_delimiter")
SAMPLERS = ("default", "first_n")
OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")
METRICS = {  # metric: (output types, default aggregation, higher is better)
    "acc": (("multiple_choice", "loglikelihood"), "mean", True),
    "acc_norm": (("multiple_choice",), "mean", True),
    "acc_bytes": (("multiple_choice",), "mean", True),
    "acc_mutual_info": (("multiple_choice",), "mean", True),
    "f1": (("multiple_choice",), "f1", True),
    "mcc": (("multiple_choice",), "matthews_corrcoef", True),
    "brier_score": (("multiple_choice",), "brier_score", False),
    "exact_match": (("multiple_choice", "generate_until"), "mean", True),
    "perplexity": (("loglikelihood",), "perplexity", False),
    "word_perplexity": (("loglikelihood_rolling",), "weighted_perplexity", False),
    "byte_perplexity": (("loglikelihood_rolling",), "weighted_perplexity", False),
    "bits_per_byte": (("loglikelihood_rolling",), "bits_per_byte", False),
}
DEFAULT_METRICS = {"loglikelihood": ["perplexity", "acc"], "multiple_choice": ["acc", "acc_norm"],
                   "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
                   "generate_until": ["exact_match"]}
GENERATION_KEYS = ("until", "max_gen_toks", "do_sample", "temperature")
GREEDY_ONLY_KEYS = ("top_p", "top_k")   # accepted when do_sample is false: greedy decoding ignores them
DATASET_KWARGS = ("data_files", "data_dir", "trust_remote_code")
LOCAL_BUILDERS = ("json", "csv", "parquet")


# ---- reading YAML (with !function and include) ----
@dataclass(frozen=True)
class FunctionRef:
    """`!function module.name` as written in `yaml_file`; Python is only loaded by `load`."""
    qualname: str
    yaml_file: Path

    def __str__(self):
        return f"!function {self.qualname}"

    def load(self, allow_code: bool, key: str):
        module, _, name = self.qualname.rpartition(".")
        local = self.yaml_file.parent / (module.replace(".", "/") + ".py")
        if not allow_code:
            raise EvalDataError(f"{self.yaml_file}: {key} is `{self}`, Python code from {local}; it runs only with "
                                f"--allow-code (allow_code=True)")
        if not module:
            raise EvalDataError(f"{self.yaml_file}: {key}: `{self}` names no module (write module.function)")
        try:
            mod = _load_module(local) if local.is_file() else importlib.import_module(module)
            return getattr(mod, name)
        except AttributeError:
            raise EvalDataError(f"{self.yaml_file}: {key}: {local if local.is_file() else module} has no "
                                f"function {name!r}") from None
        except Exception as e:  # the user's module failed to import
            raise EvalDataError(f"{self.yaml_file}: {key}: loading {local if local.is_file() else module} failed: "
                                f"{type(e).__name__}: {e}") from None


_MODULES: dict = {}


def _load_module(path: Path):
    key = str(path.resolve())
    if key not in _MODULES:
        name = "lmfoundry_task_code_" + str(len(_MODULES))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _MODULES[key] = module
    return _MODULES[key]


_SAFE_LOADER = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader


def _read_one(path: Path) -> dict:
    class Loader(_SAFE_LOADER):
        pass
    Loader.add_constructor("!function", lambda loader, node: FunctionRef(loader.construct_scalar(node), path))
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise EvalDataError(f"{path}: file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise EvalDataError(f"{path}: malformed YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EvalDataError(f"{path}: expected a YAML mapping (a task or group), got {type(data).__name__}")
    return data


def load_yaml(path, _seen: tuple = ()) -> tuple[dict, dict]:
    """(config with its includes merged, {key: the file that set it})."""
    path = Path(path)
    if path.resolve() in _seen:
        raise EvalDataError(f"{path}: include cycle ({' -> '.join(str(p) for p in _seen)})")
    cfg = _read_one(path)
    includes = cfg.pop("include", None)
    merged, origin = {}, {}
    for inc in ([] if includes is None else includes if isinstance(includes, list) else [includes]):
        inc_path = Path(inc) if Path(inc).is_absolute() else path.parent / inc
        sub, sub_origin = load_yaml(inc_path, _seen + (path.resolve(),))
        merged.update(sub)
        origin.update(sub_origin)
    merged.update(cfg)
    origin.update({k: path for k in cfg})
    return merged, origin


# ---- index: names -> YAML files ----
@dataclass
class Entry:
    name: str
    kind: str                       # "task", "group" or "tag"
    path: Path | None = None
    tasks: list = field(default_factory=list)   # a tag's tasks


def index_paths(paths) -> dict[str, Entry]:
    """Every task, group and tag defined by the YAML files under `paths` (files or directories)."""
    index: dict[str, Entry] = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*.yaml") if "__pycache__" not in p.parts)
        for f in files:
            cfg, _ = load_yaml(f)
            if "group" in cfg:
                index.setdefault(str(cfg["group"]), Entry(str(cfg["group"]), "group", f))
            elif "task" in cfg:
                name = str(cfg["task"])
                index[name] = Entry(name, "task", f)
                tags = cfg.get("tag") or []
                for t in [tags] if isinstance(tags, str) else tags:
                    index.setdefault(t, Entry(t, "tag")).tasks.append(name)
    return index


# ---- resolved tasks and groups ----
@dataclass
class TaskSpec:
    name: str
    cfg: dict
    origin: dict            # key -> file that set it (overrides: the group file)
    path: Path | None

    def where(self, key: str | None = None) -> str:
        src = self.origin.get(key) if key else None
        return f"{src or self.path or '<inline>'} (task {self.name})"

    @property
    def alias(self) -> str:
        return str(self.cfg.get("task_alias") or self.name)


@dataclass
class GroupSpec:
    name: str
    alias: str
    children: list
    aggregate: list          # [{"metric", "filter_list", "weight_by_size"}]
    version: object
    path: Path | None

    def leaves(self) -> list[TaskSpec]:
        out = []
        for c in self.children:
            out.extend(c.leaves() if isinstance(c, GroupSpec) else [c])
        return out


def looks_like_yaml(item: str) -> bool:
    """A task argument naming a YAML file or a directory (rather than a task name)."""
    return item.endswith((".yaml", ".yml")) or "/" in item or Path(item).is_dir()


def resolve(items, include_paths=()) -> list:
    """[TaskSpec | GroupSpec] for YAML files, directories and names (looked up in include_paths)."""
    registry = index_paths(include_paths) if include_paths else {}
    out = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            here = index_paths([p])
            out.extend(_top_level(here, {**here, **registry}))
        elif p.is_file() or looks_like_yaml(item):
            if not p.is_file():
                raise EvalDataError(f"{item}: task file not found")
            cfg, _ = load_yaml(p)
            kind = "group" if "group" in cfg else "task"
            local = {**index_paths([p.parent]), **registry} if kind == "group" else registry   # a group names tasks
            out.append(_build(Entry(str(cfg.get("group") or cfg.get("task")), kind, p), {}, local))
        elif item in registry:
            built = _build(registry[item], {}, registry)
            out.extend(built if isinstance(built, list) else [built])
        else:
            raise EvalDataError(f"unknown task {item!r}: not a built-in task, a YAML file, a directory of YAML "
                                f"tasks, or a name defined under --include-path")
    return out


def _top_level(index: dict, registry: dict) -> list:
    """A directory's groups that no other group there lists, then its tasks no group covers."""
    groups = [e for e in index.values() if e.kind == "group"]
    built = {g.name: _build(g, {}, registry) for g in groups}
    listed = {c.name for g in built.values() for c in g.children if isinstance(c, GroupSpec)}
    covered = {t.name for g in built.values() for t in g.leaves()}
    top = [g for name, g in built.items() if name not in listed]
    tasks = [_build(e, {}, registry) for e in index.values() if e.kind == "task" and e.name not in covered]
    if not top and not tasks:
        raise EvalDataError(f"no lm-eval task or group YAML files found in {', '.join({str(e.path.parent) for e in index.values() if e.path}) or 'the directory'}")
    return top + tasks


def _build(entry: Entry, overrides: dict, registry: dict, where=None):
    """A task, a group, or a tag's tasks; `overrides` (set by the group file `where`) win over the YAML."""
    if entry.kind == "tag":
        return [_build(registry[t], {**overrides, "task": t}, registry, where) for t in sorted(entry.tasks)]
    cfg, origin = load_yaml(entry.path)
    if entry.kind == "group":
        overrides = {k: v for k, v in overrides.items() if k != "task"}
        return _build_group(str(cfg["group"]), cfg, origin, overrides, registry, entry.path)
    return _task_spec({**cfg, **overrides}, {**origin, **{k: where or entry.path for k in overrides}}, entry.path)


def _task_spec(cfg: dict, origin: dict, path) -> TaskSpec:
    cfg = {k: v for k, v in cfg.items() if k not in ("tag", "group")}
    if "task" not in cfg:
        raise EvalDataError(f"{path}: a task YAML needs a `task:` name")
    spec = TaskSpec(str(cfg["task"]), cfg, origin, path)
    check_task(spec)
    return spec


def _build_group(name, cfg, origin, overrides, registry, path) -> GroupSpec:
    group_overrides = {k: v for k, v in cfg.items() if k not in GROUP_KEYS}
    overrides = {**group_overrides, **overrides}
    members = cfg.get("task") or []
    children = []
    for item in [members] if isinstance(members, str) else members:
        if isinstance(item, str):
            base, item_overrides = item, dict(overrides)
        elif isinstance(item, dict) and "group" in item:
            sub = {k: v for k, v in item.items() if k != "group"}
            if item["group"] in registry:
                children.append(_build(registry[item["group"]], {**overrides, **sub}, registry, path))
            else:
                children.append(_build_group(f"{name}::{item['group']}", item, origin, overrides, registry, path))
            continue
        elif isinstance(item, dict) and "task" in item:
            base, item_overrides = str(item["task"]), {**overrides, **item}
        else:
            raise EvalDataError(f"{path}: group {name}: each `task:` entry is a name or a mapping with `task` or "
                                f"`group`, got {item!r}")
        if base not in registry:   # an inline task
            children.append(_task_spec({**item_overrides, "task": f"{name}::{base}"},
                                       {k: path for k in item_overrides}, path))
            continue
        built = _build(registry[base], {**item_overrides, "task": base}, registry, path)
        children.extend(built if isinstance(built, list) else [built])
    return GroupSpec(name, str(cfg.get("group_alias") or name), children, _aggregates(cfg, path),
                     (cfg.get("metadata") or {}).get("version"), path)


def _aggregates(cfg, path) -> list:
    aggs = cfg.get("aggregate_metric_list") or []
    out = []
    for a in [aggs] if isinstance(aggs, dict) else aggs:
        unknown = set(a) - {"metric", "filter_list", "aggregation", "weight_by_size"}
        if unknown or "metric" not in a:
            raise EvalDataError(f"{path}: aggregate_metric_list entries take metric, filter_list, aggregation, "
                                f"weight_by_size; got {sorted(a)}")
        if a.get("aggregation", "mean") != "mean":
            raise EvalDataError(f"{path}: aggregate_metric_list aggregation {a['aggregation']!r}: only mean is "
                                f"defined (as in lm-eval)")
        flist = a.get("filter_list")
        out.append({"metric": a["metric"], "filter_list": [flist] if isinstance(flist, str) else flist,
                    "weight_by_size": bool(a.get("weight_by_size", True))})
    return out


# ---- checks: every key known, refused by name otherwise ----
def _refuse(spec: TaskSpec, key: str, why: str):
    raise EvalDataError(f"{spec.where(key)}: {why}")


def check_task(spec: TaskSpec):
    cfg = spec.cfg
    for key in cfg:
        if key in REFUSED_KEYS:
            _refuse(spec, key, f"key {key!r} ({REFUSED_KEYS[key]}) is not supported by lmfoundry")
        if key not in TASK_KEYS:
            _refuse(spec, key, f"unknown key {key!r} (lmfoundry reads: {', '.join(TASK_KEYS)})")
    otype = cfg.get("output_type", "generate_until")
    if otype not in OUTPUT_TYPES:
        _refuse(spec, "output_type", f"output_type {otype!r} is not one of {', '.join(OUTPUT_TYPES)}")
    _check_sub(spec, "fewshot_config", FEWSHOT_KEYS)
    _check_sub(spec, "dataset_kwargs", DATASET_KWARGS)
    sampler = (cfg.get("fewshot_config") or {}).get("sampler", "default")
    if sampler not in SAMPLERS:
        _refuse(spec, "fewshot_config", f"fewshot_config.sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    if otype != "generate_until" and int(cfg.get("repeats", 1)) != 1:
        _refuse(spec, "repeats", "repeats > 1 is only meaningful for generate_until")
    if otype == "generate_until":
        _check_generation(spec)
    elif cfg.get("filter_list"):
        _refuse(spec, "filter_list", f"filter_list applies to generate_until responses, not {otype}")
    for m in cfg.get("metric_list") or []:
        _check_metric(spec, m, otype)
    for f in cfg.get("filter_list") or []:
        _check_filter(spec, f)


def _check_sub(spec, key, allowed):
    sub = spec.cfg.get(key)
    if sub is None:
        return
    if not isinstance(sub, dict):
        _refuse(spec, key, f"{key} must be a mapping")
    unknown = [k for k in sub if k not in allowed]
    if unknown:
        _refuse(spec, key, f"{key}.{unknown[0]} is not supported (lmfoundry reads {', '.join(allowed)})")


def _check_generation(spec):
    kw = spec.cfg.get("generation_kwargs") or {}
    for k in kw:
        if k in GREEDY_ONLY_KEYS and not kw.get("do_sample"):
            continue
        if k not in GENERATION_KEYS:
            _refuse(spec, "generation_kwargs", f"generation_kwargs.{k} is not supported (lmfoundry's generate_until "
                    f"takes {', '.join(GENERATION_KEYS)})")


def _check_metric(spec, m, otype):
    if not isinstance(m, dict) or "metric" not in m:
        _refuse(spec, "metric_list", f"each metric_list entry needs a `metric`, got {m!r}")
    name, agg = m["metric"], m.get("aggregation")
    if isinstance(name, FunctionRef):
        if otype != "generate_until" and "process_results" not in spec.cfg:
            _refuse(spec, "metric_list", f"metric `{name}`: a metric function only scores generate_until tasks")
    elif "process_results" not in spec.cfg:
        if name not in METRICS:
            _refuse(spec, "metric_list", f"metric {name!r} is not supported (lmfoundry scores: {', '.join(METRICS)})")
        if otype not in METRICS[name][0]:
            _refuse(spec, "metric_list", f"metric {name!r} does not apply to output_type {otype}")
        if name == "exact_match" and otype == "generate_until":
            extra = [k for k in m if k not in ("metric", "aggregation", "higher_is_better", "hf_evaluate")
                     and k not in M.EXACT_MATCH_OPTIONS]
            if extra:
                _refuse(spec, "metric_list", f"exact_match option {extra[0]!r} is not one of "
                        f"{', '.join(M.EXACT_MATCH_OPTIONS)}")
        if m.get("hf_evaluate") and otype == "generate_until":
            _refuse(spec, "metric_list", f"metric {name!r} with hf_evaluate: true needs the Hugging Face evaluate "
                    f"library; lmfoundry computes its own {name!r} (drop hf_evaluate)")
    if agg is not None and not isinstance(agg, FunctionRef) and agg not in M.AGGREGATIONS:
        _refuse(spec, "metric_list", f"aggregation {agg!r} is not supported ({', '.join(M.AGGREGATIONS)})")


def _check_filter(spec, f):
    if not isinstance(f, dict) or "name" not in f or not isinstance(f.get("filter"), list):
        _refuse(spec, "filter_list", f"each filter_list entry is {{name, filter: [{{function, ...}}]}}, got {f!r}")
    for step in f["filter"]:
        fn = step.get("function") if isinstance(step, dict) else None
        if fn not in M.FILTERS:
            _refuse(spec, "filter_list", f"filter function {fn!r} (in {f['name']!r}) is not supported "
                    f"({', '.join(M.FILTERS)})")


# ---- where the documents come from ----
def split_files(spec: TaskSpec, split: str, data_dir=None) -> list[Path]:
    """The local files holding `split` of the task's dataset (see the module docstring)."""
    cfg = spec.cfg
    kwargs = cfg.get("dataset_kwargs") or {}
    files = kwargs.get("data_files", cfg.get("data_files"))
    path = cfg.get("dataset_path")
    if files is not None:
        by_split = files if isinstance(files, dict) else {"train": files}
        if split not in by_split:
            _refuse(spec, "dataset_kwargs", f"data_files has no {split!r} split (it has {', '.join(map(str, by_split))}); "
                    f"name the splits ({{{split}: FILE, ...}}) or set the task's split keys to them")
        names = by_split[split]
        return [f for n in ([names] if isinstance(names, str) else names) for f in _local_file(spec, str(n))]
    if path in LOCAL_BUILDERS or path is None:
        _refuse(spec, "dataset_path", f"dataset_path {path!r} needs dataset_kwargs.data_files naming local files")
    root = _local_root(spec, str(path), data_dir)
    if kwargs.get("data_dir"):
        root = root / str(kwargs["data_dir"])
    name = cfg.get("dataset_name")
    stems = ([f"{name}/{split}", f"{name}/{split}-*", f"data/{name}-{split}", f"{name}-{split}"] if name else
             [split, f"{split}-*", f"data/{split}-*", f"data/{split}"])
    for stem in stems:
        found = sorted(p for ext in EXTENSIONS for p in root.glob(stem + ext))
        if found:
            return found
    _refuse(spec, "dataset_path", f"no local files for split {split!r} of {path}"
            f"{'/' + str(name) if name else ''}: looked for {root}/{stems[0]}.jsonl (or .json/.parquet/.csv, "
            f"{stems[1]}, {stems[2]})")


def _local_file(spec, name: str) -> list[Path]:
    base = spec.origin.get("dataset_kwargs") or spec.origin.get("data_files") or spec.path
    base_dir = Path(base).parent if isinstance(base, Path) else Path(".")
    for root in (Path("."), base_dir):
        p = root / name
        matches = sorted(root.glob(name)) if any(c in name for c in "*?[") else ([p] if p.is_file() else [])
        if matches:
            return matches
    _refuse(spec, "dataset_kwargs", f"data file {name} not found (relative to the working directory or {base_dir})")


def _local_root(spec, path: str, data_dir) -> Path:
    for candidate in (Path(path), (spec.path.parent / path) if spec.path else None):
        if candidate is not None and candidate.is_dir():
            return candidate
    if data_dir is not None and (Path(data_dir) / path).is_dir():
        return Path(data_dir) / path
    hint = f"{data_dir}/{path}" if data_dir is not None else f"--data-dir DIR holding DIR/{path}/"
    _refuse(spec, "dataset_path", f"dataset_path {path!r} is a Hugging Face Hub dataset and lmfoundry reads local "
            f"files only: point dataset_kwargs.data_files at them, or put them under {hint}")


# ---- documents as process_docs sees them ----
class Docs(list):
    """A list of records with the parts of `datasets.Dataset` that lm-eval's process_docs functions use:
    map (also batched, with_indices, remove_columns), filter, select, column access, renames."""

    @property
    def column_names(self) -> list[str]:
        names: dict = {}
        for row in self:
            names.update(dict.fromkeys(row))
        return list(names)

    @property
    def features(self) -> dict:
        return dict.fromkeys(self.column_names)

    def __getitem__(self, key):
        if isinstance(key, str):
            return [row.get(key) for row in self]
        out = super().__getitem__(key)
        return Docs(out) if isinstance(key, slice) else out

    def map(self, function, batched=False, with_indices=False, remove_columns=None, batch_size=1000, **_ignored):
        drop = set([remove_columns] if isinstance(remove_columns, str) else remove_columns or ())
        if not batched:
            out = []
            for i, row in enumerate(self):
                new = function(row, i) if with_indices else function(row)
                out.append({**{k: v for k, v in row.items() if k not in drop}, **(new or {})})
            return Docs(out)
        out = []
        for start in range(0, len(self), batch_size or len(self) or 1):
            rows = self[start:start + (batch_size or len(self))]
            cols = {k: [r.get(k) for r in rows] for k in rows.column_names}
            new = function(cols, list(range(start, start + len(rows)))) if with_indices else function(cols)
            kept = {k: v for k, v in cols.items() if k not in drop}
            merged = {**kept, **(new or {})}
            n = len(next(iter(merged.values()))) if merged else 0
            out.extend({k: v[i] for k, v in merged.items()} for i in range(n))
        return Docs(out)

    def filter(self, function, with_indices=False, **_ignored):
        return Docs(r for i, r in enumerate(self) if (function(r, i) if with_indices else function(r)))

    def select(self, indices):
        return Docs(self[i] for i in indices)

    def rename_column(self, old, new):
        return self.rename_columns({old: new})

    def rename_columns(self, mapping):
        return Docs({mapping.get(k, k): v for k, v in r.items()} for r in self)

    def remove_columns(self, columns):
        drop = set([columns] if isinstance(columns, str) else columns)
        return Docs({k: v for k, v in r.items() if k not in drop} for r in self)

    def to_list(self) -> list[dict]:
        return list(self)
