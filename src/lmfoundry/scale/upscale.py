"""Depth Up-Scaling (SOLAR) and block expansion (LLaMA-Pro), streamed tensor by tensor.

A DUS is a renaming of layer indices: output layer j is a copy of source layer plan[j]. No model
is built: the source's lazy tensors go straight into the sharded, atomic checkpoint writer, so
peak memory is the few tensors in flight (the writer streams each shard's bytes behind its header).

    plan_layers(32, drop=8)                  [0..23] + [8..31]: SOLAR 10.7B's 48 layers
    upscale("mistral-7b", "solar", drop=8)   writes them as a checkpoint in the source's format
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..checkpoint import Checkpoint, write_checkpoint
from ..checkpoint.formats import config_to_hf
from ..checkpoint.io import dtype_name, parse_dtype, parse_size
from ..config import ModelConfig
from ..errors import ConfigError

SEAMS = ("stack", "average")
RECIPE_FILE = "lmfoundry_recipe.yaml"
# LLaMA-Pro: a block whose output projections are zero adds nothing to the residual stream.
ZEROED = ("attn.o.weight", "mlp.down.weight")


@dataclass(frozen=True)
class Layer:
    """One output layer: a copy of source layer `src`; with `mean`, the mean of those two source
    layers (seam averaging); with `identity`, a LLaMA-Pro block (ZEROED tensors set to zero)."""
    src: int
    mean: tuple[int, ...] = ()
    identity: bool = False


def _int(name, value) -> int:
    try:
        if isinstance(value, (bool, float)):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: not an integer") from None


def parse_slices(layers, n_layers: int) -> list[tuple[int, int]]:
    """"0:24,8:32" (or [(0, 24), (8, 32)]) -> half-open slices, as mergekit's layer_range."""
    items = [s for s in layers.split(",") if s.strip()] if isinstance(layers, str) else list(layers)
    if not items:
        raise ConfigError(f"layers={layers!r}: give at least one slice start:end, e.g. 0:24,8:32")
    slices = []
    for item in items:
        pair = item.split(":") if isinstance(item, str) else list(item)
        if len(pair) != 2:
            raise ConfigError(f"layers: {item!r} is not a slice start:end (half-open, e.g. 0:24)")
        start, end = (_int(f"layers slice {item!r}", v) for v in pair)
        if not 0 <= start < end <= n_layers:
            raise ConfigError(f"layers: slice {start}:{end} needs 0 <= start < end <= {n_layers} "
                              f"(half-open; the source has {n_layers} layers)")
        slices.append((start, end))
    return slices


def plan_layers(n_layers: int, drop=None, layers=None, target_layers=None) -> list[int]:
    """The source layer of each output layer. Give at most one of drop (SOLAR's m), layers
    (slices) or target_layers (SOLAR's s); none gives the identity plan. A drop of n/2 or more
    gives no more layers than the source (the two copies no longer overlap)."""
    given = [k for k, v in dict(drop=drop, layers=layers, target_layers=target_layers).items() if v is not None]
    if len(given) > 1:
        raise ConfigError(f"give only one of drop, layers, target_layers (got {' and '.join(given)})")
    if target_layers is not None:
        target_layers = _int("target_layers", target_layers)
        if target_layers % 2 or not 2 <= target_layers <= 2 * n_layers - 2:
            raise ConfigError(f"target_layers={target_layers}: Depth Up-Scaling of {n_layers} layers gives "
                              f"s = 2(n - drop) layers, an even number from 2 to {2 * n_layers - 2}")
        drop = n_layers - target_layers // 2
    if drop is not None:
        drop_layers = _int("drop", drop)
        if not 0 < drop_layers < n_layers:
            raise ConfigError(f"drop={drop_layers}: must be between 1 and {n_layers - 1} for {n_layers} layers")
        # SOLAR DUS (arXiv 2312.15166, Fig. 1): keep [0, n-m) of one copy and [m, n) of another,
        # s = 2(n - m) layers; n=32, m=8 gives 48 (0-23 <- 0-23, 24-47 <- 8-31).
        return list(range(n_layers - drop_layers)) + list(range(drop_layers, n_layers))
    if layers is not None:
        return [i for start, end in parse_slices(layers, n_layers) for i in range(start, end)]
    return list(range(n_layers))


def average_seams(plan: list[int], n_layers: int, seam_width: int = 1) -> list[tuple[int, int] | None]:
    """Per output layer, the two source layers to average, or None to copy plan[j] as it is.

    A seam is an output layer J where a slice starts elsewhere than where the previous one ended.
    Lay the copy before it (A) and the copy after it (B) side by side at their stacked positions
    and, for the seam_width layers on each side of J, average what the two copies hold there:
    output p <- mean(A(p), B(p)), A(p) = plan[J-1] + p - (J-1), B(p) = plan[J] + p - J. This is
    "where the copies cross, average them" (mergekit #252): for SOLAR's n=32, m=8, width 1 gives
    23 <- mean(23, 7) and 24 <- mean(24, 8); width m averages the whole 2m-layer overlap.
    """
    seams = [j for j in range(1, len(plan)) if plan[j] != plan[j - 1] + 1]
    if not seams:
        raise ConfigError("seam='average': the plan has no seam (its layers run straight through)")
    means: list[tuple[int, int] | None] = [None] * len(plan)
    for t, J in enumerate(seams):
        lo, hi = J - seam_width, J + seam_width
        if lo < (seams[t - 1] + seam_width if t else 0) or hi > (seams[t + 1] - seam_width
                                                                if t + 1 < len(seams) else len(plan)):
            raise ConfigError(f"seam_width={seam_width}: the window around the seam at output layer {J} "
                              "reaches another seam or the end of the model; use a smaller seam_width")
        for p in range(lo, hi):
            a, b = plan[J - 1] + p - (J - 1), plan[J] + p - J
            if not (0 <= a < n_layers and 0 <= b < n_layers):
                raise ConfigError(f"seam_width={seam_width}: output layer {p} would average source layers {a} "
                                  f"and {b} (seam at output layer {J}), but the source has 0..{n_layers - 1}")
            means[p] = (a, b)
    return means


def expand_blocks(layers: list[Layer], n_new: int) -> list[Layer]:
    """LLaMA-Pro block expansion (arXiv 2401.02415): cut the layers into n_new equal groups and
    after each group add a copy of its last block with attn.o and mlp.down zeroed. Each new block
    is the identity, so the model computes exactly the same function."""
    if not 1 <= n_new <= len(layers) or len(layers) % n_new:
        divisors = [d for d in range(1, len(layers) + 1) if len(layers) % d == 0]
        raise ConfigError(f"expand={n_new}: must divide the {len(layers)} layers into equal groups "
                          f"(one of {', '.join(map(str, divisors))})")
    group = len(layers) // n_new
    out = []
    for j, layer in enumerate(layers):
        out.append(layer)
        if (j + 1) % group == 0:
            out.append(dataclasses.replace(layer, identity=True))
    return out


def remap_skips(cfg: ModelConfig, layers: list[Layer]) -> tuple[list[list[int]], list[list[int]]]:
    """Solar Pro's skip connections (skip_save, skip_blend) for the output layers.

    The output is cut into runs of consecutive source layers (identity blocks pass the stream
    through, so they do not cut a run). Inside a run the stream goes through the same layers in
    the same order as in the source, so each save and each blend maps to its layer's place in the
    run. A run that keeps a blend but not the save that feeds it would blend in a state from
    somewhere else: refused. Seam-averaged layers count as the stacked layer at their place."""
    runs: list[dict[int, int]] = []   # source layer -> output layer, per run
    prev = None
    for j, layer in enumerate(layers):
        if not layer.identity:
            if prev is None or layer.src != prev + 1:
                runs.append({})
            runs[-1][layer.src], prev = j, layer.src
    new_save, new_blend = [], []
    for slot, (saves, blends) in enumerate(zip(cfg.skip_save, cfg.skip_blend)):
        out_save, out_blend = [], []
        for run in runs:
            out_save += [run[s] for s in saves if s in run]
            for b in (b for b in blends if b in run):
                fed_by = max(s for s in saves if s <= b)   # the model saves before it blends
                if fed_by not in run:
                    raise ConfigError(
                        f"skip connection slot {slot}: layer {b} blends in the state saved at layer {fed_by}, but "
                        f"output layers {min(run.values())}-{max(run.values())} (source {min(run)}-{max(run)}) "
                        f"keep layer {b} without layer {fed_by}; choose slices that keep each save with its blend")
                out_blend.append(run[b])
        new_save.append(sorted(out_save))
        new_blend.append(sorted(out_blend))
    return new_save, new_blend


@dataclass
class UpscaleResult:
    src: Path
    out: Path
    format: str
    source: ModelConfig
    config: ModelConfig
    layers: list[Layer]
    n_tensors: int
    read_bytes: int
    write_bytes: int
    peak_bytes: int
    written: bool = False

    def summary(self) -> str:
        verb = "wrote" if self.written else "would write"
        return (f"{verb} {self.out}: {self.config.n_layers} layers from {self.source.n_layers}, "
                f"{self.config.num_params():,} parameters ({self.format}), {_size(self.write_bytes)}")

    def describe(self) -> str:
        c = self.config
        per_layer = {k: getattr(c, k) for k in ("n_heads", "n_kv_heads", "ffn_dim")}
        rows = [("source", f"{self.src} ({self.format}, {self.source.n_layers} layers, "
                           f"{self.source.num_params():,} parameters)"),
                ("output", f"{self.out} ({c.n_layers} layers, {c.num_params():,} parameters)"),
                ("layer map", "; ".join(layer_map(self.layers))),
                ("per layer", ", ".join(f"{k} {v[0] if len(set(v)) == 1 else v}" for k, v in per_layer.items())),
                ("skips", f"save {c.skip_save}, blend {c.skip_blend}" if c.has_skips else "none"),
                ("tensors", f"{self.n_tensors} (canonical)"),
                ("read / write", f"{_size(self.read_bytes)} / {_size(self.write_bytes)}"),
                ("peak memory", f"about {_size(self.peak_bytes)} (tensors in flight)")]
        return "\n".join(f"{k:>14}  {v}" for k, v in rows)


def layer_map(layers: list[Layer]) -> list[str]:
    """Output layers in words, runs compressed: '0-23 <- 0-23', '23 <- mean(23, 7)'."""
    out, j = [], 0
    while j < len(layers):
        layer, k = layers[j], j
        if layer.mean or layer.identity:
            what = f"mean{layer.mean}" if layer.mean else str(layer.src)
            out.append(f"{j} <- {what}" + (" (identity: attn.o, mlp.down zeroed)" if layer.identity else ""))
        else:
            while k + 1 < len(layers) and layers[k + 1] == Layer(layers[k].src + 1):
                k += 1
            out.append(f"{j}-{k} <- {layer.src}-{layers[k].src}" if k > j else f"{j} <- {layer.src}")
        j = k + 1
    return out


def _size(n: float) -> str:
    unit = 0
    while n >= 1000 and unit < 3:
        n, unit = n / 1000, unit + 1
    return f"{n:.2f} {('B', 'kB', 'MB', 'GB')[unit]}" if unit else f"{n} B"


def _reads(name: str, layers: list[Layer]) -> int:
    """How many source tensors one output tensor is made from."""
    if not name.startswith("layers."):
        return 1
    layer = layers[int(name.split(".")[1])]
    return 1 if layer.identity and name.endswith(ZEROED) else len(layer.mean) or 1


def _mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.float() + b.float()) / 2).to(a.dtype)   # in float32, back to the checkpoint's dtype


def _layer_loader(loaders, layer: Layer, suffix: str):
    parts = [loaders[f"layers.{i}.{suffix}"] for i in (layer.mean or (layer.src,))]
    if layer.identity and suffix in ZEROED:
        return lambda: torch.zeros_like(parts[0]())
    if layer.mean:
        return lambda: _mean(parts[0](), parts[1]())
    return parts[0]


def _check_arguments(src: Path, out: Path, seam, seam_width, expand, plan_given: bool, dry_run: bool,
                     overwrite: bool) -> int:
    """Refuse bad arguments before anything is read; returns seam_width as an integer."""
    if not src.is_dir():
        raise ConfigError(f"src {src}: no such checkpoint directory")
    if seam not in SEAMS:
        raise ConfigError(f"seam={seam!r}: must be one of {', '.join(SEAMS)}")
    if not plan_given and expand is None:
        raise ConfigError("nothing to do: give drop, layers, target_layers or expand")
    seam_width = _int("seam_width", seam_width)
    if seam_width < 1 or seam_width != 1 and seam != "average":
        raise ConfigError(f"seam_width={seam_width}: must be at least 1, and applies to seam='average' only")
    if not dry_run:
        if out.resolve() == src.resolve():
            raise ConfigError(f"out {out}: is the source directory; write the upscaled model elsewhere")
        if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"out {out}: already exists and is not empty (overwrite=True or --force replaces it)")
    return seam_width


PER_LAYER = ("n_heads", "n_kv_heads", "ffn_dim")


def _output_config(cfg: ModelConfig, fmt, new_layers: list[Layer]) -> ModelConfig:
    """The source config with the output's layers: per-layer lists and skips follow them."""
    for j, layer in enumerate(new_layers):
        shapes = {tuple(getattr(cfg, k)[i] for k in PER_LAYER) for i in layer.mean}
        if len(shapes) > 1:
            raise ConfigError(f"seam='average': output layer {j} would average source layers {layer.mean}, whose "
                              f"(heads, kv heads, ffn) differ: {' vs '.join(map(str, shapes))}")
    skip_save, skip_blend = remap_skips(cfg, new_layers)
    new_cfg = cfg.replace(n_layers=len(new_layers), skip_save=skip_save, skip_blend=skip_blend,
                          **{k: [getattr(cfg, k)[layer.src] for layer in new_layers] for k in PER_LAYER})
    try:
        config_to_hf(new_cfg, fmt)
    except ConfigError as e:
        raise ConfigError(f"the upscaled model cannot be written as {fmt.architecture} (the source's format): {e}") \
            from None
    return new_cfg


def upscale(src, out, drop=None, layers=None, target_layers=None, seam="stack", seam_width=1, expand=None,
            dtype=None, max_shard_size="5GB", dry_run=False, overwrite=False, progress=False) -> UpscaleResult:
    """Depth Up-Scale `src` (a checkpoint directory) into `out`, in src's format, tensor by tensor.

    drop / layers / target_layers choose the layer plan (plan_layers); seam="average" averages
    around each seam (average_seams); expand=P then adds P identity blocks (expand_blocks).
    Per-layer config lists and Solar Pro skips follow the layers (remap_skips). Tokenizer files
    are copied and the recipe is written beside the weights. dry_run plans and writes nothing;
    progress shows a bar on stderr."""
    src, out = Path(src), Path(out)
    seam_width = _check_arguments(src, out, seam, seam_width, expand,
                                  any(v is not None for v in (drop, layers, target_layers)), dry_run, overwrite)
    out_dtype = parse_dtype(dtype)
    parse_size(max_shard_size)   # a bad size fails here, before anything is read

    ckpt = Checkpoint(src)
    cfg, fmt = ckpt.config, ckpt.format
    plan = plan_layers(cfg.n_layers, drop, layers, target_layers)
    means = average_seams(plan, cfg.n_layers, seam_width) if seam == "average" else [None] * len(plan)
    new_layers = [Layer(i, m or ()) for i, m in zip(plan, means)]
    if expand is not None:
        new_layers = expand_blocks(new_layers, _int("expand", expand))
    new_cfg = _output_config(cfg, fmt, new_layers)

    loaders = ckpt.loaders()
    tensors = {n: f for n, f in loaders.items() if not n.startswith("layers.")}
    suffixes = [n.removeprefix("layers.0.") for n in loaders if n.startswith("layers.0.")]
    for j, layer in enumerate(new_layers):
        tensors.update({f"layers.{j}.{s}": _layer_loader(loaders, layer, s) for s in suffixes})

    # Sizes from the config, without reading a tensor; reads count repeated and averaged layers.
    in_bytes = ckpt.dtype.itemsize
    out_bytes = out_dtype.itemsize if out_dtype else in_bytes
    numel = {n: torch.Size(s).numel() for n, s in new_cfg.shapes().items()}
    reads = sum(numel[n] * _reads(n, new_layers) for n in numel) * in_bytes
    largest = max(numel.values())
    in_flight = largest * (in_bytes + out_bytes + (in_bytes + 4 if seam == "average" else 0))
    result = UpscaleResult(src, out, fmt.name, cfg, new_cfg, new_layers, len(numel), reads,
                           sum(numel.values()) * out_bytes, in_flight)
    if dry_run:
        return result

    args = dict(drop=drop and _int("drop", drop), target_layers=target_layers and _int("target_layers", target_layers),
                layers=layers and ",".join(f"{a}:{b}" for a, b in parse_slices(layers, cfg.n_layers)),
                seam=seam, seam_width=seam_width, expand=expand and _int("expand", expand),
                dtype=out_dtype and dtype_name(out_dtype))
    recipe = {"operation": "upscale", "source": str(src.resolve()), "format": fmt.name,
              "arguments": {k: v for k, v in args.items() if v is not None}, "layer_map": layer_map(new_layers)}
    recipe = "# upscale(source, out, **arguments) reproduces these weights\n" + yaml.safe_dump(recipe, sort_keys=False)
    write_checkpoint(out, new_cfg, tensors, fmt, out_dtype, max_shard_size, tokenizer_from=src, overwrite=overwrite,
                     extra_files={RECIPE_FILE: recipe}, progress="upscale" if progress else None)
    result.written = True
    return result
