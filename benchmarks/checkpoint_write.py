"""Host memory of a training-checkpoint write: torch's HuggingFaceStorageWriter vs lmfoundry's
streamed writer (checkpoint/dcp_writer.py), the same state, one run.

    .venv/bin/python benchmarks/checkpoint_write.py [--size-mb 300]

The state is what a full fine-tune checkpoints: fp32 weights of a Llama-shaped model of about
--size-mb plus two AdamW moments of the same shapes (a state file of 3x --size-mb), saved by
torch.distributed.checkpoint in one process. Each side runs in its own process: after the state is
built, the peak RSS is reset (/proc/self/clear_refs) and the save's peak above the RSS before it
is reported, with the seconds it took and the file's size.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r'''
import json, sys, time, warnings
import torch
sys.path.insert(0, sys.argv[4])
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from lmfoundry.checkpoint.dcp_writer import storage_writer
from lmfoundry.config import ModelConfig
side, size_mb, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

per_layer = 4 * 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024
layers = max(1, round((size_mb * 1e6 / 4 - 2 * 32000 * 1024) / per_layer))
cfg = ModelConfig(vocab_size=32000, dim=1024, n_layers=layers, n_heads=16, n_kv_heads=8, ffn_dim=2816)
g = torch.Generator().manual_seed(0)
weights = {n: torch.empty(s).normal_(generator=g) for n, s in cfg.shapes().items()}
state = {"model": weights, "optimizer": {f"{n}.{m}": torch.full_like(t, 0.5) for n, t in weights.items()
                                         for m in ("exp_avg", "exp_avg_sq")}}
writer = HuggingFaceStorageWriter(out, save_distributed=True) if side == "torch" else storage_writer(out)
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
t0 = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    dcp.save(state, storage_writer=writer, no_dist=True)
seconds = time.perf_counter() - t0
print(json.dumps({"extra": status("VmHWM:") - before, "seconds": seconds, "params": cfg.num_params(),
                  "file": sum(p.stat().st_size for p in __import__("pathlib").Path(out).iterdir())}))
'''


def run(side: str, size_mb: float, out: Path) -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.run([sys.executable, "-c", CHILD, side, str(size_mb), str(out), src], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=300, help="fp32 weights of the model (the state is 3x)")
    args = ap.parse_args()
    got = {}
    with tempfile.TemporaryDirectory(prefix="lmf-ckpt-") as work:
        for side in ("torch", "streamed"):
            got[side] = r = run(side, args.size_mb, Path(work) / side)
            print(f"{side:>9}: state file {r['file'] / 2**20:7.0f} MiB ({r['params'] / 1e6:.0f}M params)  "
                  f"save {r['seconds']:6.2f} s  peak RSS above the state {r['extra'] / 2**20:7.0f} MiB "
                  f"({r['extra'] / r['params']:.1f} bytes/param)", flush=True)
    t, s = got["torch"], got["streamed"]
    print(f"streamed / torch: peak RSS added x{s['extra'] / max(t['extra'], 1):.3f}, "
          f"time x{s['seconds'] / t['seconds']:.2f}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
