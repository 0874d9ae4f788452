"""Merge checkpoints tensor by tensor from mergekit's YAML recipes, streaming into the writer.

    merge("recipe.yml", "out/")                   writes a checkpoint directory, atomically
    merge(recipe, "out/", dry_run=True)           -> MergePlan (print(plan.describe())); writes nothing
    lmfoundry merge recipe.yml out/ [--dry-run] [--force] [--random-seed N] [--max-shard-size 5GB]

Recipes use mergekit's schema: `models:` or `slices:` (sources with half-open `layer_range`),
`base_model`, `merge_method`, `parameters` at global, slice and model level (model > slice >
global), values as scalars, gradients (a list, interpolated over a slice's layers at
t = j/(n-1), t = 1 for a one-layer slice, t = 0 for embeddings/final norm/lm_head) or filters
([{filter: substring, value: ...}], first match wins; no filter or "*" matches all). Filters
match the Hugging Face tensor name: the output's for shared parameters, each input's for
per-model ones, as mergekit does. Also `dtype` (inputs are rounded to it), `out_dtype`,
`tokenizer_source` (base or a model path; rows of embed/lm_head are matched by token), and
`chat_template: auto`. Model paths are local checkpoint directories (relative to the working
directory, else to the recipe file). The output has the base model's (else the first model's)
format and config, the tokenizer source's tokenizer files, and the recipe as mergekit_config.yml.

Methods (per tensor; B base, X_i the other inputs, d_i = X_i - B, w_i weight; math in float32):

| method            | inputs        | result                                                                 |
|-------------------|---------------|------------------------------------------------------------------------|
| linear            | >= 1 (+base)  | sum w_i X_i / (sum w_i if normalize [true])                            |
| slerp             | base + 1      | whole-tensor SLERP from B (t=0) to X (t=1); lerp when |cos| > 0.9995   |
| task_arithmetic   | base + any    | B + lambda sum w_i d_i / (sum w_i if normalize [false])                |
| ties              | base + any    | d_i' = top-k |d_i|, k = max(1, floor(density numel)); u_i = w_i d_i';    |
|                   |               | s = sign(sum u_i) (0 -> +); m_i = [sign u_i = s];                      |
|                   |               | B + lambda sum m_i u_i / (sum m_i w_i if normalize [true])             |
| dare_ties         | base + any    | d_i' = d_i * Bernoulli(density) (seeded per tensor), rest as ties,     |
|                   |               | normalize [false]                                                      |
| dare_linear       | base + any    | DARE d_i', then as task_arithmetic                                     |
| breadcrumbs(_ties)| base + any    | keep ranks [n_bot, n_bot + floor(density N)) of |d_i| ascending,        |
|                   |               | n_bot = max(0, N - floor(density N) - floor(gamma N)); as task_arith.  |
|                   |               | (or ties)                                                              |
| model_stock       | base + >= 2   | c = mean pairwise cos(d_i, d_j) (per row with filter_wise);            |
|                   |               | t = N c / (1 + (N-1) c), 0 where the denominator is ~0;                |
|                   |               | B + t mean d_i                                                         |
| passthrough       | 1             | scale X                                                                |

`rescale` (dare_* [true], others [false]) multiplies a sparsified d_i' by |d_i|_1 / |d_i'|_1
(mergekit's L1 matching). These are mergekit 0.1.5's formulas, with three deliberate
differences: the math runs in float32 on inputs rounded to `dtype` (mergekit computes in
`dtype`, so bf16 results differ by rounding), a top-k trim keeps every entry tied with the k-th
(mergekit keeps exactly k, arbitrarily among ties), and DARE masks come from our own generator.

`paper: true` (a shared parameter of the task-arithmetic family) switches to the papers'
semantics: TIES trims each model over the whole model (keep |d| >= the (D - floor(density D))-th
smallest |d| of all D entries it contributes, as prateeky2806/ties-merging; found exactly by two
extra passes of histograms over float32 bit patterns, so density must be one number per model),
signs are elected on the unweighted trimmed d_i, the disjoint merge divides by the number of
agreeing models (sum over agreeing w_i d_i / count; normalize is ignored), and `rescale` divides
by density (DARE's 1/p). `int8_mask` is accepted and ignored (it only saves memory in mergekit).
Random masks come from a generator seeded with sha256(seed, output tensor name), so a recipe
gives the same bytes on every run, whatever the order tensors are computed in.

Memory: tensors are read with plain file reads (a memory map would keep every page read
resident), merged one output tensor at a time and appended to pre-sized safetensors shards, so
peak RSS above the interpreter with torch loaded is <= (n + 5) x the largest tensor in float32
+ 128 MiB (allocator slack), n the largest number of inputs of one tensor. tests/test_merge.py
measures it; `--dry-run` prints it.
"""
from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import yaml

from ..checkpoint import read_checkpoint
from ..checkpoint.formats import Format, config_to_hf, weight_plan
from ..checkpoint.io import (LazyTensors, atomic_dir, copy_tokenizer_files, dtype_name, parse_dtype,
                             read_yaml_mapping, write_json, write_safetensors)
from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError

REQUIRED = object()
RECIPE_FILE = "mergekit_config.yml"
_ST = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# ----- per-tensor methods: fn(base, xs, ws, p, g) -> tensor; they may modify their inputs ---------


def linear(base, xs, ws, p, g):
    w = [m["weight"] for m in ws]
    out = xs[0].mul_(w[0])
    for x, wi in zip(xs[1:], w[1:]):
        out.add_(x, alpha=wi)
    if p["normalize"]:
        if sum(w) == 0:
            raise ConfigError("linear: the weights sum to 0; set normalize: false")
        out.div_(sum(w))
    return out


def slerp(base, xs, ws, p, g):
    t, a, b = p["t"], base, xs[0]
    na, nb = float(a.norm()), float(b.norm())
    dot = float(torch.dot(a.reshape(-1), b.reshape(-1))) / ((na if na > 1e-8 else 1.0) * (nb if nb > 1e-8 else 1.0))
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > 0.9995:                                    # (anti)parallel: plain lerp
        return a.mul_(1 - t).add_(b, alpha=t)
    theta = math.acos(dot)
    return a.mul_(math.sin((1 - t) * theta) / math.sin(theta)).add_(b, alpha=math.sin(t * theta) / math.sin(theta))


def _kth(d: torch.Tensor, ranks: list) -> list:
    """The ranks-th (1-based) smallest |d|, by an in-place partial sort of one copy (no indices)."""
    a = d.abs().reshape(-1).numpy()
    a.partition([r - 1 for r in ranks])
    return [float(a[r - 1]) for r in ranks]


def _small(d, below):                      # |d| < below, with boolean temporaries only
    return (d < below) & (d > -below)


def magnitude(d, m, g, tau=None):
    """TIES trim: keep the k largest |d| (with a whole-model threshold tau: |d| >= tau)."""
    if tau is None:
        if m["density"] >= 1:
            return d
        if m["density"] <= 0 or d.numel() == 0:
            return d.zero_()
        (tau,) = _kth(d, [d.numel() - max(1, int(m["density"] * d.numel())) + 1])
    return d.masked_fill_(_small(d, tau), 0)


def dare(d, m, g, tau=None):
    if m["density"] >= 1:
        return d
    return d.masked_fill_(torch.rand(d.shape, generator=g, dtype=d.dtype) >= m["density"], 0)


def outliers(d, m, g, tau=None):
    """Breadcrumbs: drop the gamma largest and the smallest |d|, keeping a density fraction."""
    if m["density"] >= 1:
        return d
    n = d.numel()
    keep = int(m["density"] * n)
    if keep == 0:
        return d.zero_()
    bottom = max(0, n - keep - int(m["gamma"] * n))
    lo, hi = _kth(d, [bottom + 1, bottom + keep])
    return d.masked_fill_(_small(d, lo) | (d > hi) | (d < -hi), 0)


def _l1(d) -> float:
    return float(torch.linalg.vector_norm(d, 1))


def _add_nonzero(acc, d, w, chunk=1 << 20):
    """acc += w * (d != 0), a chunk at a time (torch would materialise the bool as floats)."""
    for i in range(0, d.numel(), chunk):
        acc.view(-1)[i:i + chunk].add_(d.view(-1)[i:i + chunk] != 0, alpha=w)


def task_arithmetic(base, xs, ws, p, g, sparsify=None, consensus=False, taus=None):
    paper, deltas = p["paper"], []
    for x, m, tau in zip(xs, ws, taus or [None] * len(xs)):
        d = x.sub_(base)
        if sparsify is not None:
            before = _l1(d) if p["rescale"] and not paper else 0.0
            d = sparsify(d, m, g, tau)
            if p["rescale"] and 0 < m["density"] < 1:
                if paper:
                    d.div_(m["density"])                  # DARE: 1 / p
                elif before >= 1e-7 and (after := _l1(d)) >= 1e-7:
                    d.mul_(before / after)                # mergekit: match the L1 norm
        deltas.append(d)
    weights = [m["weight"] for m in ws]
    mixed = torch.zeros_like(base)
    if not consensus:
        for w, d in zip(weights, deltas):
            mixed.add_(d, alpha=w)
        if p["normalize"] and abs(sum(weights)) >= 1e-8:
            mixed.div_(sum(weights))
        return base.add_(mixed, alpha=p["lambda"])
    for w, d in zip(weights, deltas):                     # the vote; the paper's on unweighted deltas
        mixed.add_(d, alpha=1.0 if paper else w)
    positive = mixed >= 0                                 # a zero sum elects +
    divisor = torch.zeros_like(base) if paper or p["normalize"] else None
    mixed.zero_()
    for w, d in zip(weights, deltas):
        if w == 0 and not paper:
            continue                                      # sign(0 * d) = 0 agrees with nothing
        up, down = (d < 0, d > 0) if w < 0 and not paper else (d > 0, d < 0)   # sign(w d) is + / -
        d.masked_fill_(~torch.where(positive, up, down), 0)
        del up, down
        mixed.add_(d, alpha=w)
        if divisor is not None:
            _add_nonzero(divisor, d, 1.0 if paper else w)
    if divisor is not None:
        mixed.div_(divisor.masked_fill_(divisor == 0, 1))
    return base.add_(mixed, alpha=p["lambda"])


def model_stock(base, xs, ws, p, g):
    rows = (lambda t: t.reshape(-1, t.shape[-1])) if p["filter_wise"] else (lambda t: t.reshape(1, -1))
    offsets = [rows(x.sub_(base)) for x in xs]
    norms = [o.norm(dim=-1) for o in offsets]
    cos = [((offsets[i] * offsets[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
           for i in range(len(xs)) for j in range(i + 1, len(xs))]
    c, n = torch.stack(cos).mean(0), len(xs)
    den = 1 + (n - 1) * c
    t = torch.where(den.abs() < 1e-6, 0.0, n * c / torch.where(den.abs() < 1e-6, 1.0, den)).unsqueeze(-1)
    mean = sum(offsets[1:], offsets[0].clone()).div_(n)
    return rows(base).add_(mean.mul_(t)).reshape(base.shape)


def passthrough(base, xs, ws, p, g):
    return xs[0] if ws[0]["scale"] is None else xs[0].mul_(ws[0]["scale"])


@dataclass(frozen=True)
class Method:
    fn: Callable
    base: str                      # "required": a base model, apart; "input": the base is one more input
    inputs: tuple                  # (min, max) inputs per tensor, base included
    model_params: dict             # name -> (type, default); may also be set at slice/global level
    shared_params: dict            # name -> (type, default); slice/global level only


def _gta(fn_kw, normalize, rescale, extra=None):
    return Method(partial(task_arithmetic, **fn_kw), "required", (1, None),
                  {"weight": (float, REQUIRED), "density": (float, 1.0), **(extra or {})},
                  {"normalize": (bool, normalize), "rescale": (bool, rescale), "lambda": (float, 1.0),
                   "int8_mask": (bool, False), "paper": (bool, False)})


_CRUMBS = {"gamma": (float, 0.01)}
METHODS = {
    "linear": Method(linear, "input", (1, None), {"weight": (float, REQUIRED)}, {"normalize": (bool, True)}),
    "slerp": Method(slerp, "required", (2, 2), {}, {"t": (float, REQUIRED)}),
    "task_arithmetic": _gta({}, False, False),
    "ties": _gta({"sparsify": magnitude, "consensus": True}, True, False),
    "dare_ties": _gta({"sparsify": dare, "consensus": True}, False, True),
    "dare_linear": _gta({"sparsify": dare}, False, True),
    "breadcrumbs": _gta({"sparsify": outliers}, False, False, _CRUMBS),
    "breadcrumbs_ties": _gta({"sparsify": outliers, "consensus": True}, False, False, _CRUMBS),
    "model_stock": Method(model_stock, "required", (3, None), {}, {"filter_wise": (bool, False)}),
    "passthrough": Method(passthrough, "input", (1, 1), {"scale": (float, None)}, {}),
}

# ----- recipe values: filters, gradients, precedence -------------------------------------------


def evaluate(value, name: str, t: float):
    """A parameter setting at tensor `name`, position t in [0, 1]; None when no filter matches."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return value
    if value and all(isinstance(v, dict) for v in value):
        for cond in value:
            if set(cond) - {"filter", "value"} or "value" not in cond:
                raise ConfigError(f"parameter condition {cond}: expected {{filter: substring, value: ...}}")
            if cond.get("filter") in (None, "*") or str(cond["filter"]) in name:
                return evaluate(cond["value"], name, t)
        return None
    if not value or any(isinstance(v, (dict, list)) for v in value):
        raise ConfigError(f"parameter value {value}: a gradient is a non-empty list of numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return value[int(t * (len(value) - 1))]
    x = t * (len(value) - 1)
    i = int(x)
    j = min(len(value) - 1, i + 1)
    return (1 - (x - i)) * value[i] + (x - i) * value[j]


def _resolve(spec: dict, levels: list, name: str, t: float, where: str) -> dict:
    out = {}
    for key, (kind, default) in spec.items():
        value = next((v for lv in levels if lv and key in lv for v in [evaluate(lv[key], name, t)] if v is not None),
                     default)
        if value is REQUIRED:
            raise ConfigError(f"missing required parameter {key!r} for {where} (tensor {name})")
        if value is not None and (isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"parameter {key!r} for {where} (tensor {name}): expected {kind.__name__}, got {value!r}")
        out[key] = kind(value) if value is not None else None
    for key in ("density", "gamma"):
        if key in out and not 0 <= out[key] <= 1:
            raise ConfigError(f"parameter {key!r} for {where} (tensor {name}) must be in [0, 1], got {out[key]}")
    return out

# ----- inputs -----------------------------------------------------------------------------------


class _Model:
    """One merge input: its config, format, HF names and tensors (read by LazyTensors)."""

    def __init__(self, path: Path):
        self.path = path
        self.cfg, self.fmt, _ = read_checkpoint(path)       # validates names, shapes and config
        self.lazy, self.shapes = LazyTensors(path), self.cfg.shapes()
        self.parts, self.hf = {}, {}                        # canonical -> (stored name, index, split sizes)
        for theirs, ours in weight_plan(self.cfg, self.fmt).items():
            for k, part in enumerate(ours):
                self.parts[part], self.hf[part] = (theirs, k, [self.shapes[o][0] for o in ours]), theirs
        self._vocab = None

    def __repr__(self):
        return str(self.path)

    def read(self, name: str) -> torch.Tensor:
        theirs, k, sizes = self.parts[name]
        if self.lazy.info[theirs]["dtype"] not in _ST:
            raise CheckpointError(f"{self.lazy.file_of[theirs]}: tensor {theirs} has dtype "
                                  f"{self.lazy.info[theirs]['dtype']}; merging needs floats")
        t = self.lazy.get(theirs)
        if len(sizes) > 1:
            t = t.split(sizes)[k].clone()
        if not _finite(t):
            raise CheckpointError(f"{self.path}: tensor {theirs} contains NaN or inf values")
        return t

    def row_keys(self) -> list | None:
        """One key per embedding row: its token, or ("row", i) where no token names the row;
        None without a tokenizer.json."""
        if self._vocab is None and (self.path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer
            ids = {i: tok for tok, i in
                   Tokenizer.from_file(str(self.path / "tokenizer.json")).get_vocab(with_added_tokens=True).items()}
            self._vocab = [ids.get(r, ("row", r)) for r in range(self.cfg.vocab_size)]
        return self._vocab


@dataclass
class _Job:
    """One output tensor: inputs (model, canonical name), where the base is, resolved parameters."""
    name: str
    shape: tuple
    inputs: list
    base: int | None
    model_params: list
    params: dict
    vocab: list | None = None      # per input: target row -> its row (-1: missing), or None


@dataclass
class MergePlan:
    recipe: dict
    text: str                      # the recipe as written, saved beside the weights
    method: str
    cfg: ModelConfig
    fmt: Format
    hf: dict                       # the output config.json
    dtype: torch.dtype | None
    out_dtype: torch.dtype
    tokenizer_from: Path
    seed: int = 0
    jobs: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    layout: list = field(default_factory=list)   # which input layers make which output layers
    passes: int = 1                # reads of every input (3 for paper TIES)

    @property
    def read_bytes(self) -> int:
        return self.passes * sum(math.prod(m.shapes[n]) * m.lazy.dtype.itemsize
                                 for j in self.jobs.values() for m, n in j.inputs)

    @property
    def write_bytes(self) -> int:
        return sum(math.prod(j.shape) for j in self.jobs.values()) * self.out_dtype.itemsize

    @property
    def peak_bytes(self) -> int:
        """The bound of the module docstring, above the interpreter with torch loaded."""
        largest = max(max(math.prod(j.shape), *(math.prod(m.lazy.shape(m.parts[n][0])) for m, n in j.inputs))
                      for j in self.jobs.values())
        return (max(len(j.inputs) for j in self.jobs.values()) + 5) * largest * 4 + (128 << 20)

    def describe(self) -> str:
        c, gb = self.cfg, (lambda n: f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB")
        rows = [("merge_method", self.method),
                ("output", f"{self.fmt.architecture}, {c.n_layers} layers, {c.num_params():,} parameters, "
                           f"vocab {c.vocab_size}, {dtype_name(self.out_dtype)}"),
                *[("layers", line) for line in self.layout],
                ("tensors", len(self.jobs)),
                ("read", gb(self.read_bytes) + (f" ({self.passes} passes)" if self.passes > 1 else "")),
                ("write", gb(self.write_bytes)),
                ("peak memory", f"<= {gb(self.peak_bytes)} above the Python + torch baseline"),
                ("tokenizer", self.tokenizer_from)] + [("note", n) for n in self.notes]
        return "\n".join(f"{k:<13} {v}" for k, v in rows)

# ----- planning -----------------------------------------------------------------------------------


def _load_recipe(recipe) -> tuple[dict, str, Path | None]:
    if isinstance(recipe, dict):
        return recipe, yaml.safe_dump(recipe, sort_keys=False), None
    path = Path(recipe)
    data, text = read_yaml_mapping(path, ConfigError, "a recipe (a YAML mapping with merge_method and models or "
                                                      "slices)")
    return data, text, path


def _keys(d, allowed, where):
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {d!r}")
    bad = sorted(set(d) - set(allowed))
    if bad:
        raise ConfigError(f"{where}: unknown key {bad[0]!r} (known: {', '.join(allowed)})")
    return d


def plan_merge(recipe, seed: int = 0) -> MergePlan:
    """Check a recipe (dict or YAML path) against every input's config and headers and resolve
    every tensor's parameters; no tensor is read."""
    r, text, rpath = _load_recipe(recipe)
    src = str(rpath or "recipe")
    _keys(r, ("merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
              "tokenizer_source", "tokenizer", "chat_template", "modules"), src)
    name = r.get("merge_method")
    if name not in METHODS:
        raise ConfigError(f"{src}: unknown merge_method {name!r} (supported: {', '.join(METHODS)})")
    method = METHODS[name]
    if "modules" in r:
        raise ConfigError(f"{src}: modules: (multi-module models) is not supported; use models: or slices:")
    if ("models" in r) == ("slices" in r):
        raise ConfigError(f"{src}: give exactly one of models: or slices:")
    if r.get("chat_template") not in (None, "auto"):
        raise ConfigError(f"{src}: chat_template {r['chat_template']!r} is not supported; the tokenizer source's "
                          "template is copied (chat_template: auto)")
    tok = r.get("tokenizer_source")
    if r.get("tokenizer") is not None:
        _keys(r["tokenizer"], ("source",), f"{src}: tokenizer (tokens and pad_to_multiple_of are not supported)")
        if tok is not None:
            raise ConfigError(f"{src}: give tokenizer_source or tokenizer, not both")
        tok = r["tokenizer"].get("source", "union")
    if tok == "union":
        raise ConfigError(f"{src}: tokenizer_source: union is not supported; use base or a model path "
                          "(embedding rows are then matched by token)")
    try:
        dtype, out_dtype = parse_dtype(r.get("dtype")), parse_dtype(r.get("out_dtype"))
    except CheckpointError as e:
        raise ConfigError(f"{src}: {e}") from None
    models: dict[str, _Model] = {}

    def model(ref):
        if not isinstance(ref, str):
            raise ConfigError(f"{src}: model {ref!r} must be a path")
        cands = [Path(ref)] + ([rpath.parent / ref] if rpath and not Path(ref).is_absolute() else [])
        path = next((c.resolve() for c in cands if c.is_dir()), None)
        if path is None:
            raise ConfigError(f"{src}: model {ref!r} not found (lmfoundry merges local checkpoint directories; "
                              "download hub models first)")
        if str(path) not in models:
            models[str(path)] = _Model(path)
        return models[str(path)]

    known = {**method.model_params, **method.shared_params}

    def params(d, where, shared_ok=True):
        d = _keys(d or {}, list(known), f"{src}: {where}: parameters of {name}")
        misplaced = [k for k in d if k in method.shared_params and not shared_ok]
        if misplaced:
            raise ConfigError(f"{src}: {where}: {misplaced[0]!r} is a shared parameter of {name}; set it in the "
                              "top-level (or slice) parameters")
        return d

    base = model(r["base_model"]) if r.get("base_model") is not None else None
    glob = params(r.get("parameters"), "global")
    tok = tok if tok in (None, "base") else model(tok)
    slices = []                        # (sources [(model, first layer, params)], n layers, base, params)
    if "models" in r:
        if not isinstance(r["models"], list) or not r["models"]:
            raise ConfigError(f"{src}: models: must be a non-empty list of {{model, parameters}}")
        sources = [(model(_keys(e, ("model", "parameters"), f"{src}: models entry").get("model")), 0,
                    params(e.get("parameters"), f"model {e.get('model')}", False)) for e in r["models"]]
        if base is not None and all(m is not base for m, _, _ in sources):
            sources.append((base, 0, {}))
        lengths = sorted({m.cfg.n_layers for m, _, _ in sources})
        if len(lengths) > 1:
            raise ConfigError(f"{src}: the models have different numbers of layers {lengths}; use slices:")
        slices.append((sources, lengths[0], base, {}))
    else:
        if not isinstance(r["slices"], list) or not r["slices"]:
            raise ConfigError(f"{src}: slices: must be a non-empty list of {{sources: [...]}}")
        for i, s in enumerate(r["slices"]):
            _keys(s, ("sources", "base_model", "parameters", "residual_weight"), f"{src}: slice {i}")
            if s.get("residual_weight") is not None or not isinstance(s.get("sources"), list) or not s["sources"]:
                raise ConfigError(f"{src}: slice {i}: needs a list of sources (residual_weight is not supported)")
            sources, lengths = [], set()
            for e in s["sources"]:
                _keys(e, ("model", "layer_range", "parameters"), f"{src}: slice {i} source")
                m, lr = model(e.get("model")), e.get("layer_range")
                if (not isinstance(lr, list) or len(lr) != 2 or not all(type(v) is int for v in lr)
                        or not 0 <= lr[0] < lr[1] <= m.cfg.n_layers):
                    raise ConfigError(f"{src}: slice {i}: layer_range {lr} of {e.get('model')} must be [start, end) "
                                      f"with 0 <= start < end <= {m.cfg.n_layers} (end is exclusive)")
                sources.append((m, lr[0], params(e.get("parameters"), f"slice {i} model {e['model']}", False)))
                lengths.add(lr[1] - lr[0])
            if len(lengths) > 1:
                raise ConfigError(f"{src}: slice {i}: sources have different lengths {sorted(lengths)}")
            sbase = model(s["base_model"]) if s.get("base_model") is not None else base
            slices.append((sources, lengths.pop(), sbase, params(s.get("parameters"), f"slice {i}")))
    for i, (sources, _, sbase, _) in enumerate(slices):
        ms = [m for m, _, _ in sources]
        if len(set(map(id, ms))) != len(ms):
            raise ConfigError(f"{src}: slice {i}: a model appears twice among its inputs")
        lo, hi = method.inputs
        if len(ms) < lo or (hi is not None and len(ms) > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            raise ConfigError(f"{src}: {name} takes {want} inputs (base included); slice {i} has {len(ms)}")
        if method.base == "required" and (sbase is None or all(m is not sbase for m in ms)):
            raise ConfigError(f"{src}: {name} needs a base_model, and it must be among the inputs of slice {i}")
    return _plan(r, text, src, name, slices, base, glob, models, tok, dtype, out_dtype, seed)


def _plan(r, text, src, name, slices, base, glob, models, tok, dtype, out_dtype, seed) -> MergePlan:
    method, first = METHODS[name], base or slices[0][0][0][0]
    layers = [(s, j) for s in slices for j in range(s[1])]         # output layer -> (slice, offset)
    starts = [sum(s[1] for s in slices[:i]) for i in range(len(slices))]
    layout = [f"{a}..{a + s[1] - 1} <- " + " + ".join(f"{m}[{lo}:{lo + s[1]}]" for m, lo, _ in s[0])
              for a, s in zip(starts, slices)]
    origin = [(s[0][0][0].cfg, s[0][0][1] + j) for s, j in layers]
    cfg = first.cfg.replace(n_layers=len(layers), n_heads=[c.n_heads[i] for c, i in origin],
                            n_kv_heads=[c.n_kv_heads[i] for c, i in origin], ffn_dim=[c.ffn_dim[i] for c, i in origin])
    if (cfg.skip_save or cfg.skip_blend) and [i for _, i in origin] != list(range(first.cfg.n_layers)):
        raise ConfigError(f"{src}: {first} has skip connections; restacking its layers would misplace them "
                          "(lmfoundry upscale remaps them)")
    notes = []
    for m in models.values():
        if cfg.tie_embeddings and not m.cfg.tie_embeddings:
            raise ConfigError(f"{src}: {first} ties its embeddings but {m} has a separate lm_head.weight")
        for key in ("rope_theta", "rope_scaling", "norm_eps", "max_seq_len", "sliding_window"):
            if getattr(m.cfg, key) != getattr(first.cfg, key):
                notes.append(f"{m} has {key} {getattr(m.cfg, key)}; the output keeps {first}'s {getattr(cfg, key)}")
    target = None
    if tok is not None:
        target = first if tok == "base" else tok
        cfg = cfg.replace(vocab_size=target.cfg.vocab_size)
    else:
        ms = list(models.values())
        keys = [m.row_keys() for m in ms] if all((m.path / "tokenizer.json").is_file() for m in ms) else None
        if len({m.cfg.vocab_size for m in ms}) > 1 or (keys and any(k != keys[0] for k in keys)):
            raise ConfigError(f"{src}: the models' vocabularies differ (" + ", ".join(
                f"{m}: {m.cfg.vocab_size} rows" for m in ms) + "), so embed and lm_head tensors cannot be merged "
                "row by row; set tokenizer_source: base (or a model path) to match rows by token")
    try:
        hf = config_to_hf(cfg, first.fmt)
    except ConfigError as e:
        raise ConfigError(f"{src}: the output cannot be written as {first.fmt.name}: {e}") from None
    out_names = {o: t for t, ours in weight_plan(cfg, first.fmt).items() for o in ours}
    plan = MergePlan(r, text, name, cfg, first.fmt, hf, dtype, out_dtype or dtype or first.lazy.dtype,
                     (target or first).path, seed, notes=notes, layout=layout)
    shapes = cfg.shapes()

    def job(out, slc, t, offset=None):
        sources, _, sbase, sparams = slc
        inputs = []
        for m, lo, _ in sources:
            theirs = out if offset is None else f"layers.{lo + offset}.{out.split('.', 2)[2]}"
            inputs.append((m, "embed.weight" if theirs == "lm_head.weight" and theirs not in m.parts else theirs))
        vocab = None
        if out in ("embed.weight", "lm_head.weight") and target is not None:
            vocab = _vocab_maps(target, [m for m, _ in inputs], plan.notes, src)
        for i, (m, theirs) in enumerate(inputs):
            want = (shapes[out] if vocab is None or vocab[i] is None else (m.cfg.vocab_size, *shapes[out][1:]))
            if m.shapes[theirs] != tuple(want):
                raise ConfigError(f"{src}: {out_names[out]} (from {m.hf[theirs]} of {m}) has shape "
                                  f"{list(m.shapes[theirs])}, the output needs {list(want)}")
        bi = next((i for i, (m, _) in enumerate(inputs) if m is sbase), None) if method.base == "required" else None
        mps = [{} if i == bi else _resolve(method.model_params, [mp, sparams, glob], m.hf[theirs], t, str(m))
               for i, ((m, theirs), (_, _, mp)) in enumerate(zip(inputs, sources))]
        plan.jobs[out] = _Job(out, shapes[out], inputs, bi, mps,
                              _resolve(method.shared_params, [sparams, glob], out_names[out], t, "the merge"), vocab)

    for out in shapes:
        if not out.startswith("layers."):
            job(out, slices[0] if out == "embed.weight" else slices[-1], 0.0)
    for L, (slc, j) in enumerate(layers):
        for m, lo, _ in slc[0]:                             # heads must agree where shapes alone may not tell
            c = m.cfg
            if (c.dim, c.head_dim, c.qk_norm, c.n_heads[lo + j], c.n_kv_heads[lo + j]) != (
                    cfg.dim, cfg.head_dim, cfg.qk_norm, cfg.n_heads[L], cfg.n_kv_heads[L]):
                raise ConfigError(f"{src}: layer {lo + j} of {m} has other attention heads than output layer {L}")
        for out in shapes:
            if out.startswith(f"layers.{L}."):
                job(out, slc, j / (slc[1] - 1) if slc[1] > 1 else 1.0, j)
    if name == "ties" and any(j.params["paper"] for j in plan.jobs.values()):
        plan.passes = 3
    return plan


def _vocab_maps(target: _Model, inputs: list, notes: list, src: str) -> list:
    """Per input: for each output row, the input's row holding the same token (-1: none), or None
    where the input has the target's rows already."""
    keys, maps = target.row_keys(), []
    for m in inputs:
        if m is target or (m.cfg.vocab_size == target.cfg.vocab_size and m.row_keys() in (None, keys)):
            maps.append(None)
            continue
        if keys is None or m.row_keys() is None:
            raise ConfigError(f"{src}: {m if keys else target} has no tokenizer.json, so the embedding rows of "
                              f"{m} ({m.cfg.vocab_size}) and {target} ({target.cfg.vocab_size}) cannot be matched")
        own = {k: i for i, k in enumerate(m.row_keys())}
        idx = torch.tensor([own.get(k, -1) for k in keys])
        note = (f"{m}: {int((idx < 0).sum())} of the output's {len(keys)} tokens missing (filled from the base, "
                f"else the mean of the models that have them); {len(own) - int((idx >= 0).sum())} of its own dropped")
        if note not in notes:
            notes.append(note)
        maps.append(idx)
    return maps

# ----- execution ----------------------------------------------------------------------------------


def _inputs(plan: MergePlan, j: _Job) -> list:
    """The job's input tensors in float32 (float64 stays), rounded to the recipe's dtype first,
    embedding rows reordered to the output vocabulary."""
    ts = []
    for i, (m, name) in enumerate(j.inputs):
        t = m.read(name)
        t = t.to(plan.dtype) if plan.dtype is not None else t
        t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
        if j.vocab and j.vocab[i] is not None:
            idx = j.vocab[i]
            full = t.new_zeros(len(idx), *t.shape[1:])
            full[idx >= 0] = t[idx[idx >= 0]]
            t = full
        ts.append(t)
    if j.vocab and any(v is not None for v in j.vocab):
        have = [torch.ones(j.shape[0], dtype=torch.bool) if v is None else v >= 0 for v in j.vocab]
        count = sum(h.float() for h in have)
        if bool((count == 0).any()):
            raise ConfigError(f"{j.name}: {int((count == 0).sum())} output tokens exist in none of its inputs")
        fill = sum(t * h[:, None] for t, h in zip(ts, have)) / count[:, None]
        if j.base is not None:
            fill = torch.where(have[j.base][:, None], ts[j.base], fill)
        for t, h in zip(ts, have):
            t[~h] = fill[~h]
    return ts


def _finite(t: torch.Tensor) -> bool:
    """No NaN or inf, without isfinite's temporaries: a finite sum proves it; else look closer."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


def _split(j: _Job, ts: list):
    """(base, other inputs, their parameters, their models)."""
    rest = [i for i in range(len(ts)) if i != j.base]
    return (None if j.base is None else ts[j.base], [ts[i] for i in rest], [j.model_params[i] for i in rest],
            [j.inputs[i][0] for i in rest])


def _thresholds(plan: MergePlan) -> dict:
    """Paper TIES: per model, the (D - floor(density D))-th smallest |d| of all its D entries, exactly:
    a histogram of the high 16 bits of the float32 patterns, then of the low 16 bits in the chosen bin."""
    density: dict = {}
    for j in plan.jobs.values():
        for mp, m in zip(*_split(j, j.inputs)[2:]):
            if density.setdefault(m, mp["density"]) != mp["density"]:
                raise ConfigError(f"paper: true trims each model as a whole, so {m} needs one density, "
                                  f"not {density[m]} and {mp['density']}")

    def histograms(select):
        hist: dict = {}
        for j in plan.jobs.values():
            base, xs, _, ms = _split(j, _inputs(plan, j))
            for x, m in zip(xs, ms):
                bits = select(m, x.sub_(base).abs_().float().view(torch.int32).reshape(-1))
                if bits is not None:
                    hist[m] = hist.get(m, 0) + torch.bincount(bits, minlength=1 << 16)
        return hist

    taus, bins = {}, {}
    for m, h in histograms(lambda m, b: b >> 16).items():
        rank = int(h.sum()) - int(density[m] * int(h.sum()))          # 1-based rank of the threshold
        if rank == 0:
            taus[m] = None
            continue
        cum = h.cumsum(0)
        hi = int((cum >= rank).nonzero()[0])
        bins[m] = (hi, rank - (int(cum[hi - 1]) if hi else 0))
    if bins:
        low = histograms(lambda m, b: b[(b >> 16) == bins[m][0]] & 0xFFFF if m in bins else None)
        for m, (hi, rank) in bins.items():
            lo = int((low[m].cumsum(0) >= rank).nonzero()[0])
            taus[m] = torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32).item()
    return taus


def _run(plan: MergePlan, j: _Job, taus: dict | None) -> torch.Tensor:
    base, xs, mps, ms = _split(j, _inputs(plan, j))
    kw = {} if taus is None else {"taus": [taus.get(m) for m in ms]}
    try:
        y = METHODS[plan.method].fn(base, xs, mps, j.params, _generator(plan.seed, j.name), **kw)
    except ConfigError as e:
        raise ConfigError(f"{j.name}: {e}") from None
    if not _finite(y):
        raise CheckpointError(f"{plan.method} produced NaN or inf values in {j.name}; nothing was written")
    return y.to(plan.out_dtype)


def merge(recipe, out, dry_run: bool = False, overwrite: bool = False, seed: int = 0,
          max_shard_size="5GB", progress: bool = False):
    """Run a mergekit-style recipe (dict or YAML path) into the checkpoint directory `out`.

    Returns the output Path, or with dry_run the MergePlan (nothing is read but headers and
    configs, nothing is written). `seed` seeds DARE's per-tensor masks."""
    plan = plan_merge(recipe, seed)
    if dry_run:
        return plan
    out = Path(out)
    if any(out.resolve() == m.path for j in plan.jobs.values() for m, _ in j.inputs):
        raise ConfigError(f"{out}: is one of the merge's inputs")
    fused = weight_plan(plan.cfg, plan.fmt)
    specs = [(t, (sum(plan.jobs[p].shape[0] for p in ours), *plan.jobs[ours[0]].shape[1:]), plan.out_dtype)
             for t, ours in fused.items()]
    with atomic_dir(out, overwrite=overwrite) as tmp:          # refuses an existing OUT before any work
        taus = _thresholds(plan) if plan.passes > 1 else None
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(plan.jobs), unit="tensor", desc="merge", file=sys.stderr)

        def stream():
            for theirs, ours in fused.items():
                parts = [_run(plan, plan.jobs[p], taus) for p in ours]
                yield theirs, parts[0] if len(parts) == 1 else torch.cat(parts)
                if bar is not None:
                    bar.update(len(ours))
        try:
            write_safetensors(tmp, stream(), max_shard_size, specs=specs)
        finally:
            if bar is not None:
                bar.close()
        write_json(tmp / "config.json", dict(plan.hf, torch_dtype=dtype_name(plan.out_dtype)))
        if "generation_config.json" not in copy_tokenizer_files(plan.tokenizer_from, tmp):
            write_json(tmp / "generation_config.json", {"bos_token_id": plan.cfg.bos_token_id,
                                                        "eos_token_id": plan.cfg.eos_token_id})
        from .. import __version__
        (tmp / RECIPE_FILE).write_text(f"# merged by lmfoundry {__version__} (random seed {seed}); reproduce: "
                                       f"lmfoundry merge {RECIPE_FILE} OUT --random-seed {seed}\n" + plan.text)
    return out


__all__ = ["merge", "plan_merge", "MergePlan", "METHODS", "evaluate"] + [f.__name__ for f in (
    linear, slerp, task_arithmetic, model_stock, passthrough, magnitude, dare, outliers)]
