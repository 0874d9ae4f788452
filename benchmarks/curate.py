"""Data curation: lmfoundry vs datatrove on the same pipeline and corpus, one run, side by side.

    .venv/bin/python benchmarks/curate.py                     # ~200 MB generated corpus, 2 workers each
    .venv/bin/python benchmarks/curate.py --mb 20 --workers 2 # a quick look

Pipeline (both): Gopher quality -> Gopher repetition -> C4 quality -> MinHash near-dedup (word
5-grams, 14 bands x 8 hashes), removed documents written out. datatrove runs it as its own
examples do: one LocalPipelineExecutor (reader, the three filters with exclusion writers, a
JSONL writer that passes documents on to MinhashDedupSignature), then MinhashDedupBuckets,
MinhashDedupCluster and MinhashDedupFilter; lmfoundry as `lmfoundry data curate` with the same
steps. Both get `--workers` processes over the same `--files` input files.

Corpus: lmfoundry.curate.synth.corpus (deterministic): English and Korean prose, each kind of
junk, exact and near copies; written once to --data (reused when it is there). Each side runs in
its own subprocess; its CPU time (user + system over its processes, sampled with the memory) is
less sensitive than wall time to other load on a shared machine (datatrove needs `pip install datatrove orjson "xxhash<4"`: its xxhash
wrapper passes str, which xxhash 4.1 refuses); measured: wall time, documents/s over the input,
and the peak of the summed resident memory (RSS) of the side's process tree, sampled every 50 ms
from /proc (Linux). The kept counts differ by design: datatrove's English settings drop the Korean prose, which
lmfoundry's per-language settings keep (printed as "Korean").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def make_corpus(data: Path, mb: int, files: int, seed: int = 0) -> int:
    """Write ~mb MB of synthetic documents into `files` JSONL files; returns the document count."""
    marker = data / f"corpus-{mb}mb-{files}f-{seed}.json"
    if marker.is_file():
        return json.loads(marker.read_text())["documents"]
    from lmfoundry.curate.synth import corpus
    data.mkdir(parents=True, exist_ok=True)
    outs = [open(data / f"part-{i:03d}.jsonl", "w", encoding="utf-8") for i in range(files)]
    size, n = 0, 0
    for doc in corpus(10 ** 9, seed=seed):
        line = json.dumps({"text": doc["text"], "id": str(doc["id"])}, ensure_ascii=False) + "\n"
        outs[n % files].write(line)
        size += len(line.encode("utf-8"))
        n += 1
        if size >= mb * 1_000_000:
            break
    for f in outs:
        f.close()
    marker.write_text(json.dumps({"documents": n, "bytes": size}))
    return n


# ---------------------------------------------------------------- the two sides (run in subprocesses)

def run_ours(data: Path, out: Path, workers: int):
    from lmfoundry.curate import curate, make_config
    cfg = make_config({"inputs": [str(data)], "output": str(out), "workers": workers,
                       "steps": ["gopher_quality", "gopher_repetition", "c4", {"dedup": {"exact": False}}]})
    curate(cfg, progress=False)
    return _kept(out / "data")


def run_datatrove(data: Path, out: Path, workers: int, files: int):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    cfg = MinhashConfig()                               # 5-grams, 14 buckets x 8 hashes, 64-bit xxhash
    common = {"tasks": files, "workers": workers, "skip_completed": False}
    removed = lambda name: JsonlWriter(str(out / "removed" / name), compression=None)  # noqa: E731
    LocalPipelineExecutor(pipeline=[
        JsonlReader(str(data), glob_pattern="part-*.jsonl"),
        GopherQualityFilter(exclusion_writer=removed("gopher_quality")),
        GopherRepetitionFilter(exclusion_writer=removed("gopher_repetition")),
        C4QualityFilter(exclusion_writer=removed("c4")),
        JsonlWriter(str(out / "filtered"), compression=None),
        MinhashDedupSignature(output_folder=str(out / "sigs"), config=cfg),
    ], logging_dir=str(out / "logs1"), **common).run()
    LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(input_folder=str(out / "sigs"),
                                                        output_folder=str(out / "buckets"), config=cfg)],
                          tasks=cfg.num_buckets, workers=workers, logging_dir=str(out / "logs2"),
                          skip_completed=False).run()
    LocalPipelineExecutor(pipeline=[MinhashDedupCluster(input_folder=str(out / "buckets"),
                                                        output_folder=str(out / "remove"), config=cfg)],
                          tasks=1, logging_dir=str(out / "logs3"), skip_completed=False).run()
    LocalPipelineExecutor(pipeline=[
        JsonlReader(str(out / "filtered")),
        MinhashDedupFilter(input_folder=str(out / "remove"), exclusion_writer=removed("dedup")),
        JsonlWriter(str(out / "data"), compression=None),
    ], logging_dir=str(out / "logs4"), **common).run()
    return _kept(out / "data")


def _kept(folder: Path) -> str:
    """'kept documents, of which Korean' of a side's output folder."""
    n = ko = 0
    for f in folder.glob("*.jsonl"):
        for line in open(f, encoding="utf-8"):
            n += 1
            ko += any("\uac00" <= c <= "\ud7a3" for c in json.loads(line)["text"][:200])
    return f"{n} {ko}"


# ---------------------------------------------------------------- measuring a process tree

def _tree(root: int) -> tuple[int, dict[int, float]]:
    """(summed VmRSS in bytes, {pid: CPU seconds so far}) over `root` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = f.read()
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        pid, ppid = int(entry), int(fields["PPid"])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        cpu[pid] = (int(stat[11]) + int(stat[12])) / tick          # utime + stime
    total, seen, stack = 0, {}, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        seen[pid] = cpu.get(pid, 0.0)
        stack += children.get(pid, [])
    return total, seen


def measure(argv: list[str]) -> dict:
    peak, cpu = [0], {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)

    def sample():
        while proc.poll() is None:
            rss, seen = _tree(proc.pid)
            peak[0] = max(peak[0], rss)
            for pid, seconds in seen.items():
                cpu[pid] = max(cpu.get(pid, 0.0), seconds)
            time.sleep(0.05)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{argv[3]} side failed (exit {proc.returncode})")
    kept, korean = (int(x) for x in out.strip().splitlines()[-1].split())
    return {"seconds": seconds, "peak_rss": peak[0], "kept": kept, "kept_korean": korean, "cpu": sum(cpu.values())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="corpus size in MB (default 200)")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", default="/tmp/lmfoundry-curate-bench/data")
    ap.add_argument("--side", choices=["ours", "datatrove"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = Path(args.data)
    if args.side:                                          # a child: run one side, print the kept count
        out = Path(args.out)
        kept = run_ours(data, out, args.workers) if args.side == "ours" else run_datatrove(data, out, args.workers,
                                                                                          args.files)
        print(kept)
        return
    t0 = time.perf_counter()
    n = make_corpus(data, args.mb, args.files)
    size = sum(f.stat().st_size for f in data.glob("part-*.jsonl"))
    print(f"corpus: {n:,} documents, {size / 1e6:.0f} MB in {args.files} files ({time.perf_counter() - t0:.0f}s to "
          f"make or find); {args.workers} workers each; {os.cpu_count()} CPUs", flush=True)
    results = {}
    for side in ("datatrove", "ours"):
        out = data.parent / f"out-{side}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        results[side] = r = measure([sys.executable, __file__, "--side", side, "--data", str(data), "--out", str(out),
                                     "--workers", str(args.workers), "--files", str(args.files)])
        print(f"{side:>10}: {r['seconds']:7.1f} s  {n / r['seconds']:8.0f} docs/s  {r['cpu']:7.1f} CPU-s  peak RSS "
              f"{r['peak_rss'] / 2**20:7.0f} MiB  kept {r['kept']:,} ({r['kept_korean']:,} Korean)", flush=True)
    d, o = results["datatrove"], results["ours"]
    print(f"ratio (ours vs datatrove): throughput x{d['seconds'] / o['seconds']:.2f}, "
          f"CPU time x{o['cpu'] / d['cpu']:.2f}, peak RSS x{o['peak_rss'] / d['peak_rss']:.2f}")


if __name__ == "__main__":
    main()
