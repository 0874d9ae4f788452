"""Depth Up-Scaling and a 3-model linear merge: lmfoundry vs mergekit-yaml, one run.

    .venv/bin/python benchmarks/scale.py --mergekit /path/to/mergekit-yaml [--size-mb 1000]
        [--baseline-src /path/to/other/lmfoundry/src]

Builds three random Llama-shaped checkpoints of about --size-mb each (fp32), then times each
job as a separate process under /usr/bin/time (wall seconds, peak RSS):
  DUS      drop 25% of the layers per copy (SOLAR: n=32, m=8), as `lmfoundry upscale` and as
           the equivalent mergekit passthrough recipe
  linear   a 3-model linear merge with equal weights
and `cp -r` of one checkpoint as the disk's limit. mergekit is optional: without it only
lmfoundry and the copy are timed. Install it apart from the project, e.g.
python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit
--baseline-src times another lmfoundry source tree beside this one (a regression check), e.g.
git worktree add /tmp/base a8a6113, then --baseline-src /tmp/base/src.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmfoundry.checkpoint import save_model  # noqa: E402
from lmfoundry.config import ModelConfig  # noqa: E402
from lmfoundry.model import Transformer  # noqa: E402


def timed(cmd: list[str], src: str | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one command, from GNU time; `src` puts another lmfoundry
    source tree first on its import path."""
    env = dict(os.environ, PYTHONPATH=src) if src else None
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    h, m, s = wall.groups()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return int(h or 0) * 3600 + int(m) * 60 + float(s), rss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="path to mergekit-yaml")
    ap.add_argument("--size-mb", type=float, default=1000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--baseline-src", default=None, help="another lmfoundry src/ directory to time beside this one")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lmf-scale-"))
    # a Llama shape: dim 1024, 16 layers of ~16.8M params, vocab 32000; layers scaled to the size
    per_layer = 4 * 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024
    layers = max(4, round((args.size_mb * 1e6 / 4 - 2 * 32000 * 1024) / per_layer) // 4 * 4)
    cfg = ModelConfig(vocab_size=32000, dim=1024, n_layers=layers, n_heads=16, n_kv_heads=8, ffn_dim=2816)
    models = []
    for k in range(3):
        path = work / f"m{k}"
        if not path.exists():
            torch.manual_seed(k)
            save_model(Transformer(cfg), path)
        models.append(path)
    size = sum(f.stat().st_size for f in models[0].iterdir()) / 1e6
    drop = layers // 4
    lmf = [sys.executable, "-m", "lmfoundry"]
    jobs = {"copy (cp -r)": {"lmfoundry": ["cp", "-r", str(models[0]), str(work / "copy")]}}
    dus_yaml = work / "dus.yml"
    dus_yaml.write_text(f"slices:\n  - sources: [{{model: {models[0]}, layer_range: [0, {layers - drop}]}}]\n"
                        f"  - sources: [{{model: {models[0]}, layer_range: [{drop}, {layers}]}}]\n"
                        "merge_method: passthrough\ndtype: float32\n")
    lin_yaml = work / "linear.yml"
    lin_yaml.write_text("models:\n" + "".join(f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in models)
                        + "merge_method: linear\ndtype: float32\n")
    jobs[f"DUS drop {drop} ({layers}->{2 * (layers - drop)} layers)"] = {
        "lmfoundry": lmf + ["upscale", str(models[0]), str(work / "dus-lmf"), "--drop", str(drop)],
        "mergekit": [args.mergekit, str(dus_yaml), str(work / "dus-mk")] if args.mergekit else None}
    jobs["linear merge of 3"] = {
        "lmfoundry": lmf + ["merge", str(lin_yaml), str(work / "lin-lmf")],
        "mergekit": [args.mergekit, str(lin_yaml), str(work / "lin-mk")] if args.mergekit else None}
    print(f"checkpoints: 3 x {size:.0f} MB fp32 ({layers} layers, {cfg.num_params() / 1e6:.0f}M params) in {work}")
    print(f"{'job':<34}{'lmfoundry s':>12}{'RSS MB':>9}{'mergekit s':>12}{'RSS MB':>9}{'time ratio':>11}{'RSS ratio':>10}"
          + (f"{'baseline s':>12}{'RSS MB':>9}{'time ratio':>11}{'RSS ratio':>10}" if args.baseline_src else ""))
    copy_s = None
    for name, cmds in jobs.items():
        for d in work.glob("*-lmf"), work.glob("*-mk"), [work / "copy"]:
            for p in d:
                shutil.rmtree(p, ignore_errors=True)
        t_l, r_l = timed(cmds["lmfoundry"])
        copy_s = copy_s or t_l
        row = f"{name:<34}{t_l:>12.1f}{r_l:>9.0f}"
        if cmds.get("mergekit"):
            t_m, r_m = timed(cmds["mergekit"])
            row += f"{t_m:>12.1f}{r_m:>9.0f}{t_l / t_m:>10.2f}x{r_l / r_m:>9.2f}x"
        elif args.baseline_src:
            row += " " * 42
        if args.baseline_src and name != "copy (cp -r)":
            for p in work.glob("*-lmf"):
                shutil.rmtree(p)
            t_b, r_b = timed(cmds["lmfoundry"], args.baseline_src)
            row += f"{t_b:>12.1f}{r_b:>9.0f}{t_l / t_b:>10.2f}x{r_l / r_b:>9.2f}x"
        if name != "copy (cp -r)":
            row += f"   ({t_l / copy_s:.1f}x the copy)"
        print(row, flush=True)


if __name__ == "__main__":
    main()
