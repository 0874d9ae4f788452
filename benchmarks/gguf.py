"""GGUF export and import of a >= 1 GB checkpoint: lmfoundry against `cp` of the same bytes, one run.

    .venv/bin/python benchmarks/gguf.py [--size-mb 1100] [--quants f32,f16,q8_0,q4_0]

Writes a random Llama-shaped fp32 checkpoint of about --size-mb (tensor by tensor, no model
built), then times each job as its own process under /usr/bin/time (wall seconds, peak RSS):
  cp, dd    the checkpoint's safetensors file copied (the disk's limit; the first cp warms the cache; dd
            copies through user space with 16 MB reads and writes, as a Python writer must)
  export    `lmfoundry convert SRC OUT.gguf --quant Q` for each Q
  quantize  gguf-py's quantizer alone over the same tensors, in memory (the "plus quantization" part)
  import    `lmfoundry convert OUT.gguf DIR --to llama` (dequantized to fp32)
  baseline  a process that only imports torch, gguf and lmfoundry (the constant in the RSS bound)
The issue's targets: peak RSS <= 2 x the largest tensor + the baseline, and export time <=
1.5 x cp + the quantizer's own time. llama.cpp's convert_hf_to_gguf.py is not on PyPI, so the
side-by-side alternative is the copy itself.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from lmfoundry.checkpoint import write_checkpoint  # noqa: E402
from lmfoundry.config import ModelConfig  # noqa: E402
from lmfoundry.demo import train_demo_tokenizer  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from scale import timed as scale_timed  # noqa: E402

QUANTIZE_ONLY = """
import sys, time, torch, gguf
from lmfoundry.checkpoint import read_checkpoint
cfg, _, loaders = read_checkpoint(sys.argv[1])
qtype = gguf.GGMLQuantizationType[sys.argv[2].upper()]
spent = 0.0
for name, load in loaders.items():
    t = load()
    if t.dim() == 2:
        t0 = time.perf_counter()
        gguf.quants.quantize(t.numpy(), qtype) if qtype.name not in ("F32", "F16") else t.to(torch.float16)
        spent += time.perf_counter() - t0
print(spent)
"""


def timed(cmd: list[str], repeat: int = 1) -> tuple[float, float]:
    """(median wall seconds, peak RSS MB) of a command run `repeat` times under GNU time; `sync`
    first each time, so no run pays for the previous one's writeback."""
    runs = []
    for _ in range(repeat):
        subprocess.run(["sync"], check=True)
        runs.append(scale_timed(cmd))
    return sorted(runs)[len(runs) // 2]


def make_checkpoint(path: Path, size_mb: float) -> ModelConfig:
    per_layer = 4 * 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024
    layers = max(2, round((size_mb * 1e6 / 4 - 2 * 32000 * 1024) / per_layer))
    cfg = ModelConfig(vocab_size=32000, dim=1024, n_layers=layers, n_heads=16, n_kv_heads=8, ffn_dim=2816)
    if not path.exists():
        tok = train_demo_tokenizer()
        gen = torch.Generator().manual_seed(0)
        weights = {n: (lambda s=s: torch.randn(s, generator=gen) * 0.02) for n, s in cfg.shapes().items()}
        write_checkpoint(path, cfg, weights, extra_files={"tokenizer.json": tok.to_str()})
    return cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=1100)
    ap.add_argument("--quants", default="f32,f16,q8_0,q4_0")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeat", type=int, default=3, help="runs per job; the median is reported (default 3)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lmf-gguf-"))
    src = work / "src"
    cfg = make_checkpoint(src, args.size_mb)
    nbytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    largest = max(4 * torch.Size(s).numel() for s in cfg.shapes().values()) / 2**20
    py, cli = sys.executable, str(Path(sys.executable).with_name("lmfoundry"))
    shard = sorted(src.glob("*.safetensors"))[0]
    timed(["cp", str(shard), str(work / "copy")])                    # warm the page cache
    cp_s, _ = timed(["cp", str(shard), str(work / "copy")], args.repeat)
    # cp may copy inside the kernel (copy_file_range); dd reads and writes through user space, as we do
    dd_s, _ = timed(["dd", f"if={shard}", f"of={work / 'copy'}", "bs=16M", "status=none"], args.repeat)
    base_s, base_rss = timed([py, "-c", "import torch, gguf, lmfoundry.checkpoint.gguf, tqdm"], args.repeat)
    print(f"checkpoint: {nbytes / 1e9:.2f} GB fp32, {cfg.n_layers} layers, largest tensor {largest:.0f} MiB; "
          f"cp {cp_s:.2f} s, dd {dd_s:.2f} s; a Python process that only imports torch, gguf and lmfoundry: "
          f"{base_s:.2f} s, {base_rss:.0f} MiB (median of {args.repeat})")
    print(f"RSS bound (2 x largest + baseline): {2 * largest + base_rss:.0f} MiB\n")
    print(f"{'job':<22}{'seconds':>9}{'peak RSS MiB':>14}{'vs cp':>8}{'1.5 cp + quantizer':>20}{'RSS ok':>8}")
    for quant in args.quants.split(","):
        out = work / f"m-{quant}.gguf"
        secs, rss = timed([cli, "convert", str(src), str(out), "--quant", quant, "--force"], args.repeat)
        q_s = float(subprocess.run([py, "-c", QUANTIZE_ONLY, str(src), quant], capture_output=True, text=True,
                                   check=True).stdout) if quant != "f32" else 0.0
        limit = 1.5 * cp_s + q_s
        print(f"{'export ' + quant:<22}{secs:>9.2f}{rss:>14.0f}{secs / cp_s:>7.2f}x{limit:>19.2f}s"
              f"{'yes' if rss <= 2 * largest + base_rss else 'NO':>8}   (quantizer alone {q_s:.2f} s, "
              f"file {out.stat().st_size / 1e9:.2f} GB; {secs / dd_s:.2f}x dd; without the Python start-up: "
              f"{secs - base_s:.2f} s, {(secs - base_s) / cp_s:.2f}x cp, {(secs - base_s) / dd_s:.2f}x dd)")
        secs, rss = timed([cli, "convert", str(out), str(work / f"back-{quant}"), "--to", "llama",
                              "--dtype", "float32", "--force"])
        print(f"{'import ' + quant:<22}{secs:>9.2f}{rss:>14.0f}{secs / cp_s:>7.2f}x")
        shutil.rmtree(work / f"back-{quant}")
    print(f"\nworkdir: {work} (delete it when done)")


if __name__ == "__main__":
    main()
