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

import functools
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import yaml

from ..checkpoint import Checkpoint, write_checkpoint
from ..checkpoint.formats import Format, config_to_hf, weight_plan
from ..checkpoint.io import all_finite, dtype_name, parse_dtype
from ..records import read_yaml_mapping
from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError

REQUIRED = object()
RECIPE_FILE = "mergekit_config.yml"

# ----- per-tensor methods ---------------------------------------------------------------------------
# fn(base, inputs, model_params, shared_params, generator) -> the output tensor, where `base` is the
# base model's tensor (None for methods whose base is just one more input), `inputs` the other
# inputs' tensors (a method may modify them in place), `model_params` each input's own parameters
# (weight, density, ...), `shared_params` the merge's (normalize, lambda, t, ...) and `generator`
# a random generator seeded for this output tensor.


def linear(base, inputs, model_params, shared_params, generator):
    weights = [p["weight"] for p in model_params]
    out = inputs[0].mul_(weights[0])
    for x, w in zip(inputs[1:], weights[1:]):
        out.add_(x, alpha=w)
    if shared_params["normalize"]:
        if sum(weights) == 0:
            raise ConfigError("linear: the weights sum to 0; set normalize: false")
        out.div_(sum(weights))
    return out


def slerp(base, inputs, model_params, shared_params, generator):
    t, a, b = shared_params["t"], base, inputs[0]
    na, nb = float(a.norm()), float(b.norm())
    dot = float(torch.dot(a.reshape(-1), b.reshape(-1))) / ((na if na > 1e-8 else 1.0) * (nb if nb > 1e-8 else 1.0))
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > 0.9995:                                    # (anti)parallel: plain lerp
        return a.mul_(1 - t).add_(b, alpha=t)
    theta = math.acos(dot)
    return a.mul_(math.sin((1 - t) * theta) / math.sin(theta)).add_(b, alpha=math.sin(t * theta) / math.sin(theta))


def _kth(delta: torch.Tensor, ranks: list) -> list:
    """The ranks-th (1-based) smallest |delta|, by an in-place partial sort of one copy (no indices)."""
    a = delta.abs().reshape(-1).numpy()
    a.partition([r - 1 for r in ranks])
    return [float(a[r - 1]) for r in ranks]


def _small(delta, below):                  # |delta| < below, with boolean temporaries only
    return (delta < below) & (delta > -below)

# Sparsifiers of the task-arithmetic family: fn(delta, density, gamma, generator, threshold) -> delta
# with entries zeroed in place; `threshold` is paper TIES's whole-model one (None: per tensor).


def magnitude(delta, density, gamma, generator, threshold=None):
    """TIES trim: keep the k largest |delta| (with a whole-model threshold: |delta| >= threshold)."""
    if threshold is None:
        if density >= 1:
            return delta
        if density <= 0 or delta.numel() == 0:
            return delta.zero_()
        (threshold,) = _kth(delta, [delta.numel() - max(1, int(density * delta.numel())) + 1])
    return delta.masked_fill_(_small(delta, threshold), 0)


def dare(delta, density, gamma, generator, threshold=None):
    """DARE: drop each entry with probability 1 - density."""
    if density >= 1:
        return delta
    return delta.masked_fill_(torch.rand(delta.shape, generator=generator, dtype=delta.dtype) >= density, 0)


def outliers(delta, density, gamma, generator, threshold=None):
    """Breadcrumbs: drop the gamma largest and the smallest |delta|, keeping a density fraction."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    if keep == 0:
        return delta.zero_()
    bottom = max(0, n - keep - int(gamma * n))
    lo, hi = _kth(delta, [bottom + 1, bottom + keep])
    return delta.masked_fill_(_small(delta, lo) | (delta > hi) | (delta < -hi), 0)


def _l1(delta) -> float:
    return float(torch.linalg.vector_norm(delta, 1))


def _add_nonzero(acc, delta, w, chunk=1 << 20):
    """acc += w * (delta != 0), a chunk at a time (torch would materialise the bool as floats)."""
    for i in range(0, delta.numel(), chunk):
        acc.view(-1)[i:i + chunk].add_(delta.view(-1)[i:i + chunk] != 0, alpha=w)


def task_arithmetic(base, inputs, model_params, shared_params, generator, sparsify=None, consensus=False,
                    thresholds=None):
    """base + lambda * the weighted deltas, sparsified first by `sparsify`, with TIES's sign
    election where `consensus`; `thresholds`: per input, paper TIES's whole-model trim threshold."""
    paper, rescale = shared_params["paper"], shared_params["rescale"]
    deltas = []
    for x, p, threshold in zip(inputs, model_params, thresholds or [None] * len(inputs)):
        delta = x.sub_(base)
        if sparsify is not None:
            l1_before = _l1(delta) if rescale and not paper else 0.0
            delta = sparsify(delta, p["density"], p.get("gamma"), generator, threshold)
            if rescale and 0 < p["density"] < 1:
                if paper:
                    delta.div_(p["density"])              # DARE: 1 / p
                elif l1_before >= 1e-7 and (l1_after := _l1(delta)) >= 1e-7:
                    delta.mul_(l1_before / l1_after)      # mergekit: match the L1 norm
        deltas.append(delta)
    weights = [p["weight"] for p in model_params]
    if consensus:
        mixed = _disjoint_merge(base, deltas, weights, paper, divide=paper or shared_params["normalize"])
    else:
        mixed = torch.zeros_like(base)
        for w, delta in zip(weights, deltas):
            mixed.add_(delta, alpha=w)
        if shared_params["normalize"] and abs(sum(weights)) >= 1e-8:
            mixed.div_(sum(weights))
    return base.add_(mixed, alpha=shared_params["lambda"])


def _disjoint_merge(base, deltas, weights, paper: bool, divide: bool):
    """TIES: elect a sign per entry (from the weighted deltas; the paper's from the unweighted ones),
    sum the weighted deltas that agree with it and, with `divide`, divide by the agreeing weight
    (the paper: by the agreeing count)."""
    mixed = torch.zeros_like(base)
    for w, delta in zip(weights, deltas):
        mixed.add_(delta, alpha=1.0 if paper else w)
    positive = mixed >= 0                                 # a zero sum elects +
    divisor = torch.zeros_like(base) if divide else None
    mixed.zero_()
    for w, delta in zip(weights, deltas):
        if w == 0 and not paper:
            continue                                      # sign(0 * d) = 0 agrees with nothing
        up, down = (delta < 0, delta > 0) if w < 0 and not paper else (delta > 0, delta < 0)   # sign(w d): + / -
        delta.masked_fill_(~torch.where(positive, up, down), 0)
        del up, down
        mixed.add_(delta, alpha=w)
        if divisor is not None:
            _add_nonzero(divisor, delta, 1.0 if paper else w)
    if divisor is not None:
        mixed.div_(divisor.masked_fill_(divisor == 0, 1))
    return mixed


def model_stock(base, inputs, model_params, shared_params, generator):
    rows = (lambda t: t.reshape(-1, t.shape[-1])) if shared_params["filter_wise"] else (lambda t: t.reshape(1, -1))
    offsets = [rows(x.sub_(base)) for x in inputs]
    norms = [o.norm(dim=-1) for o in offsets]
    cos = [((offsets[i] * offsets[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
           for i in range(len(inputs)) for j in range(i + 1, len(inputs))]
    c, n = torch.stack(cos).mean(0), len(inputs)
    den = 1 + (n - 1) * c
    t = torch.where(den.abs() < 1e-6, 0.0, n * c / torch.where(den.abs() < 1e-6, 1.0, den)).unsqueeze(-1)
    mean = sum(offsets[1:], offsets[0].clone()).div_(n)
    return rows(base).add_(mean.mul_(t)).reshape(base.shape)


def passthrough(base, inputs, model_params, shared_params, generator):
    scale = model_params[0]["scale"]
    return inputs[0] if scale is None else inputs[0].mul_(scale)


@dataclass(frozen=True)
class Method:
    fn: Callable
    base: str                      # "required": a base model, apart; "input": the base is one more input
    inputs: tuple                  # (min, max) inputs per tensor, base included
    model_params: dict             # name -> (type, default); may also be set at slice/global level
    shared_params: dict            # name -> (type, default); slice/global level only


def _task_arithmetic_family(normalize: bool, rescale: bool, sparsify=None, consensus=False,
                            model_params=None) -> Method:
    return Method(functools.partial(task_arithmetic, sparsify=sparsify, consensus=consensus), "required", (1, None),
                  {"weight": (float, REQUIRED), "density": (float, 1.0), **(model_params or {})},
                  {"normalize": (bool, normalize), "rescale": (bool, rescale), "lambda": (float, 1.0),
                   "int8_mask": (bool, False), "paper": (bool, False)})


BREADCRUMBS_GAMMA = {"gamma": (float, 0.01)}
METHODS = {
    "linear": Method(linear, base="input", inputs=(1, None), model_params={"weight": (float, REQUIRED)},
                     shared_params={"normalize": (bool, True)}),
    "slerp": Method(slerp, base="required", inputs=(2, 2), model_params={}, shared_params={"t": (float, REQUIRED)}),
    "task_arithmetic": _task_arithmetic_family(normalize=False, rescale=False),
    "ties": _task_arithmetic_family(normalize=True, rescale=False, sparsify=magnitude, consensus=True),
    "dare_ties": _task_arithmetic_family(normalize=False, rescale=True, sparsify=dare, consensus=True),
    "dare_linear": _task_arithmetic_family(normalize=False, rescale=True, sparsify=dare),
    "breadcrumbs": _task_arithmetic_family(normalize=False, rescale=False, sparsify=outliers,
                                           model_params=BREADCRUMBS_GAMMA),
    "breadcrumbs_ties": _task_arithmetic_family(normalize=False, rescale=False, sparsify=outliers, consensus=True,
                                                model_params=BREADCRUMBS_GAMMA),
    "model_stock": Method(model_stock, base="required", inputs=(3, None), model_params={},
                          shared_params={"filter_wise": (bool, False)}),
    "passthrough": Method(passthrough, base="input", inputs=(1, 1), model_params={"scale": (float, None)},
                          shared_params={}),
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
    """Each parameter of `spec` for tensor `name` (its checkpoint name), from the first level that
    sets it (model > slice > global), else its default."""
    out = {}
    for key, (kind, default) in spec.items():
        try:
            value = next((v for lv in levels if lv and key in lv for v in [evaluate(lv[key], name, t)]
                          if v is not None), default)
        except ConfigError as e:
            raise ConfigError(f"parameter {key!r} for {where}: {e}") from None
        if value is REQUIRED:
            raise ConfigError(f"missing required parameter {key!r} for {where} (tensor {name})")
        if value is not None and (isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"parameter {key!r} for {where} (tensor {name}): expected {kind.__name__}, got {value!r}")
        out[key] = kind(value) if value is not None else None
    for key in ("density", "gamma"):
        if key in out and not 0 <= out[key] <= 1:
            raise ConfigError(f"parameter {key!r} for {where} (tensor {name}) must be in [0, 1], got {out[key]}")
    return out

# ----- inputs and the plan ------------------------------------------------------------------------


class _Model(Checkpoint):
    """One merge input: a checkpoint opened for reading (with a LoRA adapter folded into each tensor
    as it is read, for mergekit's `base+adapter`), and the token of each embedding row."""

    def __init__(self, path: Path, adapter: Path | None = None):
        super().__init__(path, adapter)           # validates config, tensor names and shapes (and the adapter)
        self._row_keys = None

    def __repr__(self):
        return str(self.path) + (f"+{self.adapter.path}" if self.adapter is not None else "")

    def row_keys(self) -> list | None:
        """One key per embedding row: its token, or ("row", i) where no token names the row;
        None without a tokenizer.json."""
        if self._row_keys is None and (self.path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer
            ids = {i: tok for tok, i in
                   Tokenizer.from_file(str(self.path / "tokenizer.json")).get_vocab(with_added_tokens=True).items()}
            self._row_keys = [ids.get(r, ("row", r)) for r in range(self.config.vocab_size)]
        return self._row_keys


class _Source(NamedTuple):
    model: _Model
    first_layer: int
    params: dict                   # its model-level parameters


class _Slice(NamedTuple):
    sources: list                  # [_Source]
    n_layers: int
    base: _Model | None
    params: dict                   # slice-level parameters


@dataclass
class _Job:
    """One output tensor: its inputs (model, canonical name), where the base is among them, and
    the parameters resolved for it."""
    name: str                      # canonical
    stored: str                    # the output checkpoint's name (filters and errors use it)
    shape: tuple
    inputs: list
    base: int | None
    model_params: list
    shared_params: dict
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
        return self.passes * sum(math.prod(m.shapes[n]) * m.dtype.itemsize
                                 for j in self.jobs.values() for m, n in j.inputs)

    @property
    def write_bytes(self) -> int:
        return sum(math.prod(j.shape) for j in self.jobs.values()) * self.out_dtype.itemsize

    @property
    def peak_bytes(self) -> int:
        """The bound of the module docstring, above the interpreter with torch loaded."""
        largest = max(max(math.prod(j.shape), *(math.prod(m.stored_shape(n)) for m, n in j.inputs))
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

# ----- reading the recipe -------------------------------------------------------------------------


TOP_LEVEL_KEYS = ("merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "tokenizer", "chat_template", "modules")


def _keys(d, allowed, where):
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {d!r}")
    bad = sorted(set(d) - set(allowed))
    if bad:
        raise ConfigError(f"{where}: unknown key {bad[0]!r} (known: {', '.join(allowed)})")
    return d


class _Recipe:
    """A recipe (dict or YAML path) read and checked, key by key; every error names the recipe
    file and the key as written. Opening the models reads their configs and headers only."""

    def __init__(self, recipe):
        if isinstance(recipe, dict):
            self.data, self.text, self.path = recipe, yaml.safe_dump(recipe, sort_keys=False), None
        else:
            self.path = Path(recipe)
            self.data, self.text = read_yaml_mapping(self.path, ConfigError, "a recipe (a YAML mapping with "
                                                                             "merge_method and models or slices)")
        self.src = str(self.path or "recipe")
        r, src = self.data, self.src
        _keys(r, TOP_LEVEL_KEYS, src)
        self.method_name = r.get("merge_method")
        if self.method_name not in METHODS:
            raise ConfigError(f"{src}: unknown merge_method {self.method_name!r} (supported: {', '.join(METHODS)})")
        self.method = METHODS[self.method_name]
        if "modules" in r:
            raise ConfigError(f"{src}: modules: (multi-module models) is not supported; use models: or slices:")
        if ("models" in r) == ("slices" in r):
            raise ConfigError(f"{src}: give exactly one of models: or slices:")
        if r.get("chat_template") not in (None, "auto"):
            raise ConfigError(f"{src}: chat_template {r['chat_template']!r} is not supported; the tokenizer "
                              "source's template is copied (chat_template: auto)")
        self.dtype, self.out_dtype = self._dtype("dtype"), self._dtype("out_dtype")
        self.models: dict[str, _Model] = {}
        self.base = self.model(r["base_model"], "base_model") if r.get("base_model") is not None else None
        self.params = self.parameters(r.get("parameters"), "global")
        tok = self._tokenizer_source()
        self.tokenizer = tok if tok in (None, "base") else self.model(tok, "tokenizer_source")

    def _dtype(self, key):
        try:
            return parse_dtype(self.data.get(key))
        except CheckpointError as e:
            raise ConfigError(f"{self.src}: {key}: {e}") from None

    def _tokenizer_source(self):
        r, src = self.data, self.src
        tok = r.get("tokenizer_source")
        if r.get("tokenizer") is not None:
            _keys(r["tokenizer"], ("source",), f"{src}: tokenizer (tokens and pad_to_multiple_of are not supported)")
            if tok is not None:
                raise ConfigError(f"{src}: give tokenizer_source or tokenizer, not both")
            tok = r["tokenizer"].get("source", "union")
        if tok == "union":
            raise ConfigError(f"{src}: tokenizer_source: union is not supported; use base or a model path "
                              "(embedding rows are then matched by token)")
        return tok

    def model(self, ref, key: str = "model") -> _Model:
        """The model at path `ref` (relative to the working directory, else to the recipe), opened once;
        mergekit's `base+adapter` folds a LoRA adapter directory into it."""
        if not isinstance(ref, str):
            raise ConfigError(f"{self.src}: {key} {ref!r} must be a path")
        parts = ref.split("+")
        if len(parts) > 2 or not all(parts):
            raise ConfigError(f"{self.src}: {key} {ref!r}: expected PATH or PATH+ADAPTER (one '+')")
        path = self._local(parts[0], key, ref)
        adapter = self._local(parts[1], key, ref, "adapter") if len(parts) == 2 else None
        name = f"{path}+{adapter}" if adapter else str(path)
        if name not in self.models:
            self.models[name] = _Model(path, adapter)
        return self.models[name]

    def _local(self, ref: str, key: str, written: str, what: str = "checkpoint") -> Path:
        cands = [Path(ref)] + ([self.path.parent / ref] if self.path and not Path(ref).is_absolute() else [])
        path = next((c.resolve() for c in cands if c.is_dir()), None)
        if path is None:
            where = f"{key} {ref!r}" if ref == written else f"{key} {written!r}: {what} {ref!r}"
            raise ConfigError(f"{self.src}: {where} not found (lmfoundry merges local {what} directories; download "
                              "hub models first)")
        return path

    def parameters(self, d, where: str, shared_ok: bool = True) -> dict:
        method, name = self.method, self.method_name
        d = _keys(d or {}, list({**method.model_params, **method.shared_params}),
                  f"{self.src}: {where}: parameters of {name}")
        misplaced = [k for k in d if k in method.shared_params and not shared_ok]
        if misplaced:
            raise ConfigError(f"{self.src}: {where}: {misplaced[0]!r} is a shared parameter of {name}; set it in "
                              "the top-level (or slice) parameters")
        return d

    def slices(self) -> list[_Slice]:
        """The recipe's slices (models: is one slice over every layer), checked against the method."""
        slices = self._from_models() if "models" in self.data else self._from_slices()
        lo, hi = self.method.inputs
        for i, s in enumerate(slices):
            ms = [src.model for src in s.sources]
            if len(set(map(id, ms))) != len(ms):
                raise ConfigError(f"{self.src}: slice {i}: a model appears twice among its inputs")
            if len(ms) < lo or (hi is not None and len(ms) > hi):
                want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
                raise ConfigError(f"{self.src}: {self.method_name} takes {want} inputs (base included); "
                                  f"slice {i} has {len(ms)}")
            if self.method.base == "required" and (s.base is None or all(m is not s.base for m in ms)):
                raise ConfigError(f"{self.src}: {self.method_name} needs a base_model, and it must be among the "
                                  f"inputs of slice {i}")
        return slices

    def _from_models(self) -> list[_Slice]:
        entries, src = self.data["models"], self.src
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{src}: models: must be a non-empty list of {{model, parameters}}")
        sources = [_Source(self.model(_keys(e, ("model", "parameters"), f"{src}: models entry").get("model")), 0,
                           self.parameters(e.get("parameters"), f"model {e.get('model')}", False)) for e in entries]
        if self.base is not None and all(s.model is not self.base for s in sources):
            sources.append(_Source(self.base, 0, {}))
        lengths = sorted({s.model.config.n_layers for s in sources})
        if len(lengths) > 1:
            raise ConfigError(f"{src}: the models have different numbers of layers {lengths}; use slices:")
        return [_Slice(sources, lengths[0], self.base, {})]

    def _from_slices(self) -> list[_Slice]:
        entries, src = self.data["slices"], self.src
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{src}: slices: must be a non-empty list of {{sources: [...]}}")
        slices = []
        for i, s in enumerate(entries):
            _keys(s, ("sources", "base_model", "parameters", "residual_weight"), f"{src}: slice {i}")
            if s.get("residual_weight") is not None or not isinstance(s.get("sources"), list) or not s["sources"]:
                raise ConfigError(f"{src}: slice {i}: needs a list of sources (residual_weight is not supported)")
            sources = [self._slice_source(e, i) for e in s["sources"]]
            lengths = {n for _, n in sources}
            if len(lengths) > 1:
                raise ConfigError(f"{src}: slice {i}: sources have different lengths {sorted(lengths)}")
            base = self.model(s["base_model"], "base_model") if s.get("base_model") is not None else self.base
            slices.append(_Slice([source for source, _ in sources], lengths.pop(), base,
                                 self.parameters(s.get("parameters"), f"slice {i}")))
        return slices

    def _slice_source(self, entry, i: int) -> tuple[_Source, int]:
        _keys(entry, ("model", "layer_range", "parameters"), f"{self.src}: slice {i} source")
        m, lr = self.model(entry.get("model")), entry.get("layer_range")
        if (not isinstance(lr, list) or len(lr) != 2 or not all(type(v) is int for v in lr)
                or not 0 <= lr[0] < lr[1] <= m.config.n_layers):
            raise ConfigError(f"{self.src}: slice {i}: layer_range {lr} of {entry.get('model')} must be [start, end) "
                              f"with 0 <= start < end <= {m.config.n_layers} (end is exclusive)")
        params = self.parameters(entry.get("parameters"), f"slice {i} model {entry['model']}", False)
        return _Source(m, lr[0], params), lr[1] - lr[0]

# ----- planning -----------------------------------------------------------------------------------


def plan_merge(recipe, seed: int = 0) -> MergePlan:
    """Check a recipe (dict or YAML path) against every input's config and headers and resolve
    every tensor's parameters; no tensor is read."""
    r = _Recipe(recipe)
    slices = r.slices()
    first = r.base or slices[0].sources[0].model
    layers = [(s, j) for s in slices for j in range(s.n_layers)]          # output layer -> (slice, offset)
    cfg, notes = _output_config(r, first, layers)
    target = None if r.tokenizer is None else first if r.tokenizer == "base" else r.tokenizer
    if target is not None:
        cfg = cfg.replace(vocab_size=target.config.vocab_size)
    else:
        _check_same_vocabulary(r)
    try:
        hf = config_to_hf(cfg, first.format)
    except ConfigError as e:
        raise ConfigError(f"{r.src}: the output cannot be written as {first.format.name}: {e}") from None
    starts = [sum(s.n_layers for s in slices[:i]) for i in range(len(slices))]
    layout = [f"{a}..{a + s.n_layers - 1} <- " + " + ".join(f"{src.model}[{src.first_layer}:"
                                                            f"{src.first_layer + s.n_layers}]" for src in s.sources)
              for a, s in zip(starts, slices)]
    plan = MergePlan(r.data, r.text, r.method_name, cfg, first.format, hf, r.dtype,
                     r.out_dtype or r.dtype or first.dtype, (target or first).path, seed, notes=notes, layout=layout)
    _add_jobs(r, plan, target, slices, layers)
    if r.method_name == "ties" and any(j.shared_params["paper"] for j in plan.jobs.values()):
        plan.passes = 3
    return plan


def _output_config(r: _Recipe, first: _Model, layers: list) -> tuple[ModelConfig, list]:
    """The output's config (the first model's, with the stacked layers' per-layer lists) and notes
    on what the other models set differently."""
    origin = [(s.sources[0].model.config, s.sources[0].first_layer + j) for s, j in layers]
    if (first.config.skip_save or first.config.skip_blend) and [i for _, i in origin] != list(
            range(first.config.n_layers)):
        raise ConfigError(f"{r.src}: {first} has skip connections; restacking its layers would misplace them "
                          "(lmfoundry upscale remaps them)")
    cfg = first.config.replace(n_layers=len(layers), **{k: [getattr(c, k)[i] for c, i in origin]
                                                         for k in ("n_heads", "n_kv_heads", "ffn_dim")})
    notes = []
    for m in r.models.values():
        if cfg.tie_embeddings and not m.config.tie_embeddings:
            raise ConfigError(f"{r.src}: {first} ties its embeddings but {m} has a separate lm_head.weight")
        for key in ("rope_theta", "rope_scaling", "norm_eps", "max_seq_len", "sliding_window"):
            if getattr(m.config, key) != getattr(first.config, key):
                notes.append(f"{m} has {key} {getattr(m.config, key)}; the output keeps {first}'s "
                             f"{getattr(cfg, key)}")
    return cfg, notes


def _check_same_vocabulary(r: _Recipe):
    ms = list(r.models.values())
    keys = [m.row_keys() for m in ms] if all((m.path / "tokenizer.json").is_file() for m in ms) else None
    if len({m.config.vocab_size for m in ms}) > 1 or (keys and any(k != keys[0] for k in keys)):
        raise ConfigError(f"{r.src}: the models' vocabularies differ (" + ", ".join(
            f"{m}: {m.config.vocab_size} rows" for m in ms) + "), so embed and lm_head tensors cannot be merged "
            "row by row; set tokenizer_source: base (or a model path) to match rows by token")


def _add_jobs(r: _Recipe, plan: MergePlan, target: _Model | None, slices: list, layers: list):
    """One job per output tensor: its inputs from the slice that makes it (embeddings from the first,
    the final norm and lm_head from the last), at gradient position t within the slice."""
    cfg, shapes = plan.cfg, plan.cfg.shapes()
    stored = {o: t for t, ours in weight_plan(cfg, plan.fmt).items() for o in ours}

    def job(out: str, slc: _Slice, t: float, offset: int | None = None) -> _Job:
        inputs = []
        for src in slc.sources:
            theirs = out if offset is None else f"layers.{src.first_layer + offset}.{out.split('.', 2)[2]}"
            tied = theirs == "lm_head.weight" and theirs not in src.model.stored
            inputs.append((src.model, "embed.weight" if tied else theirs))
        vocab = None
        if out in ("embed.weight", "lm_head.weight") and target is not None:
            vocab = _vocab_maps(target, [m for m, _ in inputs], plan.notes, r.src)
        for i, (m, theirs) in enumerate(inputs):
            want = shapes[out] if vocab is None or vocab[i] is None else (m.config.vocab_size, *shapes[out][1:])
            if m.shapes[theirs] != tuple(want):
                raise ConfigError(f"{r.src}: {stored[out]} (from {m.stored_name(theirs)} of {m}) has shape "
                                  f"{list(m.shapes[theirs])}, the output needs {list(want)}")
        base = (next((i for i, (m, _) in enumerate(inputs) if m is slc.base), None)
                if r.method.base == "required" else None)
        try:
            model_params = [{} if i == base else _resolve(r.method.model_params, [src.params, slc.params, r.params],
                                                          m.stored_name(theirs), t, str(m))
                            for i, ((m, theirs), src) in enumerate(zip(inputs, slc.sources))]
            shared = _resolve(r.method.shared_params, [slc.params, r.params], stored[out], t, "the merge")
        except ConfigError as e:
            raise ConfigError(f"{r.src}: {e}") from None
        return _Job(out, stored[out], shapes[out], inputs, base, model_params, shared, vocab)

    for out in shapes:
        if not out.startswith("layers."):
            plan.jobs[out] = job(out, slices[0] if out == "embed.weight" else slices[-1], 0.0)
    for L, (slc, j) in enumerate(layers):
        for src in slc.sources:                           # heads must agree where shapes alone may not tell
            c, i = src.model.config, src.first_layer + j
            if (c.dim, c.head_dim, c.qk_norm, c.n_heads[i], c.n_kv_heads[i]) != (
                    cfg.dim, cfg.head_dim, cfg.qk_norm, cfg.n_heads[L], cfg.n_kv_heads[L]):
                raise ConfigError(f"{r.src}: layer {i} of {src.model} has other attention heads than output "
                                  f"layer {L}")
        for out in shapes:
            if out.startswith(f"layers.{L}."):
                plan.jobs[out] = job(out, slc, j / (slc.n_layers - 1) if slc.n_layers > 1 else 1.0, j)


def _vocab_maps(target: _Model, inputs: list, notes: list, src: str) -> list:
    """Per input: for each output row, the input's row holding the same token (-1: none), or None
    where the input has the target's rows already."""
    keys, maps = target.row_keys(), []
    for m in inputs:
        if m is target or (m.config.vocab_size == target.config.vocab_size and m.row_keys() in (None, keys)):
            maps.append(None)
            continue
        if keys is None or m.row_keys() is None:
            raise ConfigError(f"{src}: {m if keys else target} has no tokenizer.json, so the embedding rows of "
                              f"{m} ({m.config.vocab_size}) and {target} ({target.config.vocab_size}) cannot be "
                              "matched")
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
            raise ConfigError(f"{j.stored}: {int((count == 0).sum())} output tokens exist in none of its inputs")
        fill = sum(t * h[:, None] for t, h in zip(ts, have)) / count[:, None]
        if j.base is not None:
            fill = torch.where(have[j.base][:, None], ts[j.base], fill)
        for t, h in zip(ts, have):
            t[~h] = fill[~h]
    return ts


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
        for p, m in zip(*_split(j, j.inputs)[2:]):
            if density.setdefault(m, p["density"]) != p["density"]:
                raise ConfigError(f"paper: true trims each model as a whole, so {m} needs one density, "
                                  f"not {density[m]} and {p['density']}")

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


def _run(plan: MergePlan, j: _Job, thresholds: dict | None) -> torch.Tensor:
    base, xs, model_params, ms = _split(j, _inputs(plan, j))
    kw = {} if thresholds is None else {"thresholds": [thresholds.get(m) for m in ms]}
    try:
        y = METHODS[plan.method].fn(base, xs, model_params, j.shared_params, _generator(plan.seed, j.name), **kw)
    except ConfigError as e:
        raise ConfigError(f"{j.stored}: {e}") from None
    if not all_finite(y):
        raise CheckpointError(f"{plan.method} produced NaN or inf values in {j.stored}; nothing was written")
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
    # paper TIES's thresholds take whole passes over the inputs: computed on the first tensor's
    # call, once the writer has claimed OUT (an existing OUT is refused before any work)
    thresholds = functools.cache(lambda: _thresholds(plan) if plan.passes > 1 else None)
    tensors = {name: functools.partial(lambda j: _run(plan, j, thresholds()), j) for name, j in plan.jobs.items()}
    from .. import __version__
    recipe_text = (f"# merged by lmfoundry {__version__} (random seed {seed}); reproduce: "
                   f"lmfoundry merge {RECIPE_FILE} OUT --random-seed {seed}\n" + plan.text)
    return write_checkpoint(out, plan.cfg, tensors, plan.fmt, plan.out_dtype, max_shard_size,
                            tokenizer_from=plan.tokenizer_from, overwrite=overwrite,
                            extra_files={RECIPE_FILE: recipe_text}, progress="merge" if progress else None)


__all__ = ["merge", "plan_merge", "MergePlan", "METHODS", "evaluate"] + [f.__name__ for f in (
    linear, slerp, task_arithmetic, model_stock, passthrough, magnitude, dare, outliers)]
