"""Running a curation pipeline: shards, workers, resume, the dedup merge, outputs.

    OUT/data/part-00000.jsonl        kept documents (or .parquet): `lmfoundry tokenize OUT/data` reads them
    OUT/removed/part-00000.jsonl     removed documents, each with curate.removed = {step, rule, value, threshold}
    OUT/removed/part-00000.dedup.jsonl  duplicates, with the source of the document they duplicate
    OUT/report.md, OUT/report.json   what happened, per step and rule (report.py)
    OUT/work/                        plan, per-shard state, signatures (safe to delete when done)

Every kept or removed record keeps its fields and gains `curate`: {source (FILE:LINE), lang,
lang_score, quality, pii, contaminated, removed}. Input files are dealt round-robin into shards;
a shard is the unit of resume and of `--shard I/N` (shards k with k % N == I), so a cluster runs
it as an array of tasks. Within a shard, documents go to `workers` processes in chunks.

Phases: (1) per shard, every step but dedup, writing kept documents (to work/ when dedup follows)
and, for dedup, each document's exact hash and MinHash signature; (2) once, the merge: exact and
near duplicates over all shards' signatures; (3) per shard, the duplicates are dropped into
OUT/data. Each phase's output is written under a temporary name and renamed; a marker file in
work/ records a finished shard, so an interrupted run resumes at the first unfinished one.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..records import expand_files, field, kind, read_records, read_texts
from . import steps as S
from .config import Config

CHUNK = 64                 # documents per worker task
EXAMPLES_PER_RULE = 3
EXAMPLE_CHARS = 300
FORMAT_VERSION = 1


# ---------------------------------------------------------------- inputs

def record_text(record: dict, text_field: str, where: str) -> tuple[str, bool]:
    """(the text a record is curated by, whether it is a plain text record). Chat records
    (messages) and preference records (prompt/chosen/rejected) are read as their contents."""
    if text_field in record or ("messages" not in record and "prompt" not in record):
        return field(record, text_field, where, str), True
    if "messages" in record:
        msgs = field(record, "messages", where, list)
        return "\n".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict)), False
    parts = [record.get(k) for k in ("prompt", "chosen", "rejected")]
    return "\n".join(p if isinstance(p, str) else json.dumps(p, ensure_ascii=False) for p in parts if p), False


def iter_docs(files: list[Path], cfg: Config, skipped: list):
    """(where, record, text, is_text_record, bytes read) for every document of the files."""
    for path in files:
        try:
            if kind(path) == ".txt":
                for where, text, n in read_texts(path, txt_mode=cfg.txt_mode, sizes=True):
                    yield where, {"text": text}, text, True, n
            else:
                pending = 0
                for where, record, n in read_records(path, sizes=True):
                    pending += n
                    text, plain = record_text(record, cfg.text_field, where)
                    if text.strip():
                        yield where, record, text, plain, pending
                        pending = 0
        except DataError as e:
            if not cfg.extra.get("skip_bad_files"):
                raise
            print(f"curate: skipping the rest of {path}: {e}", file=sys.stderr)
            skipped.append({"file": str(path), "error": str(e)})


# ---------------------------------------------------------------- outputs

class PartWriter:
    """Records to one .jsonl or .parquet file, written under a temporary name; `close` renames."""

    def __init__(self, path: Path, fmt: str = "jsonl"):
        self.path, self.fmt, self.count = path, fmt, 0
        self.tmp = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.writer = None
        self.f = open(self.tmp, "w", encoding="utf-8") if fmt == "jsonl" else None

    def write(self, record: dict):
        self.count += 1
        if self.f is not None:
            self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
            return
        self.rows.append({**record, "curate": json.dumps(record.get("curate", {}), ensure_ascii=False)})
        if len(self.rows) >= 2048:
            self._flush()

    def _flush(self):
        import pyarrow as pa
        import pyarrow.parquet as pq
        if self.writer is None:
            table = pa.Table.from_pylist(self.rows)
            self.writer = pq.ParquetWriter(self.tmp, table.schema)
        extra = {k for r in self.rows for k in r} - set(self.writer.schema.names)
        if extra:
            raise DataError(f"{self.path}: records have fields {sorted(extra)} the first records lacked; parquet "
                            "needs one schema (use format: jsonl)")
        self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.writer.schema))
        self.rows = []

    def close(self):
        if self.f is not None:
            self.f.close()
        else:
            if self.rows:
                self._flush()
            if self.writer is None:
                self._empty_parquet()
            self.writer.close()
        os.replace(self.tmp, self.path)

    def _empty_parquet(self):
        import pyarrow as pa
        import pyarrow.parquet as pq
        self.writer = pq.ParquetWriter(self.tmp, pa.schema([("text", pa.string()), ("curate", pa.string())]))

    def abort(self):
        if self.f is not None:
            self.f.close()
        elif self.writer is not None:
            self.writer.close()
        self.tmp.unlink(missing_ok=True)


@contextmanager
def committed(*writers: PartWriter):
    """Close (rename into place) every writer if the block succeeds; delete their files if not."""
    try:
        yield writers
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for w in writers:
        w.close()


def save_json(path: Path, data):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_npy(path: Path, array: np.ndarray):
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def load_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- the plan of a run

class Run:
    """The shards of a config and where each one's outputs and state live."""

    def __init__(self, cfg: Config, force: bool = False):
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.files = expand_files(cfg.inputs)
        n = min(cfg.shards or len(self.files), len(self.files))
        self.shards = [self.files[k::n] for k in range(n)]
        self.work = self.out / "work"
        self.dedup = cfg.dedup
        self.ext = "parquet" if cfg.format == "parquet" else "jsonl"
        self._check_plan(force)

    def _check_plan(self, force: bool):
        plan = {"version": FORMAT_VERSION, "config": self.cfg.describe(),
                "files": [[str(f), f.stat().st_size, int(f.stat().st_mtime)] for f in self.files]}
        path = self.work / "plan.json"
        if path.is_file() and load_json(path) != plan:
            if not force:
                raise DataError(f"{self.out}: holds a run with a different config or different input files; "
                                "use another output directory or --force to start over")
            import shutil
            for sub in ("work", "data", "removed"):
                shutil.rmtree(self.out / sub, ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            save_json(path, plan)

    def name(self, k: int) -> str:
        return f"part-{k:05d}"

    def filtered(self, k: int) -> Path:
        return self.work / f"{self.name(k)}.filtered.json"

    def done(self, k: int) -> Path:
        return self.work / f"{self.name(k)}.done.json"

    def mine(self, shard: tuple[int, int] | None) -> list[int]:
        i, n = shard or (0, 1)
        return [k for k in range(len(self.shards)) if k % n == i]


# ---------------------------------------------------------------- phase 1: the per-document steps

class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


def _pool(cfg: Config):
    """(submit(items) -> future, close()) over cfg.n_workers processes (in-process for 1)."""
    backend = next((p["backend"] for n, p in cfg.steps if n == "language"), "script")
    step_list = [(n, p) for n, p in cfg.steps]
    if cfg.n_workers == 1:
        S.init_worker(step_list, backend)
        return (lambda items: _Done(S.process_chunk(items))), (lambda: None)
    S.init_worker(step_list, backend)         # fail here, once, on a bad model or task file
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    pool = ctx.Pool(cfg.n_workers, initializer=S.init_worker, initargs=(step_list, backend))
    return (lambda items: pool.apply_async(S.process_chunk, (items,))), pool.terminate


def _chunks(docs, size: int):
    chunk = []
    for d in docs:
        chunk.append(d)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _example(examples: dict, rule: str, where: str, text: str, removal: dict):
    rows = examples.setdefault(rule, [])
    if len(rows) < EXAMPLES_PER_RULE:
        rows.append({"source": where, "value": removal.get("value"), "text": text[:EXAMPLE_CHARS]})


def filter_shard(run: Run, k: int, submit, workers: int, bar) -> dict:
    """Phase 1 for shard k; returns (and saves) its state."""
    final = run.dedup is None
    kept = PartWriter((run.out / "data" if final else run.work) / f"{run.name(k)}.{run.ext if final else 'jsonl'}",
                      run.cfg.format if final else "jsonl")
    removed = PartWriter(run.out / "removed" / f"{run.name(k)}.jsonl")
    state = {"stats": S.new_stats(), "examples": {}, "skipped_files": [], "kept": 0}
    exact, sigs, sources = [], [], []
    pending: deque = deque()

    def drain():
        records, future = pending.popleft()
        outcomes, stats = future.get()
        S.merge_stats(state["stats"], stats)
        for (where, record, text, plain, _), outcome in zip(records, outcomes):
            _route(where, record, text, plain, outcome, run.cfg.text_field, kept, removed, state, exact, sigs,
                   sources)

    counted = 0
    with committed(kept, removed):
        for chunk in _chunks(iter_docs(run.shards[k], run.cfg, state["skipped_files"]), CHUNK):
            pending.append((chunk, submit([(d[2], d[1].get("curate") if isinstance(d[1].get("curate"), dict)
                                            else None) for d in chunk])))
            step = sum(d[4] for d in chunk)
            counted += step
            bar.update(step)
            if len(pending) >= 2 * workers:
                drain()
        while pending:
            drain()
        bar.update(sum(f.stat().st_size for f in run.shards[k]) - counted)   # estimates -> the files' sizes
    if not final:
        save_npy(run.work / f"{run.name(k)}.exact.npy",
                 np.frombuffer(b"".join(exact), dtype=np.uint8).reshape(len(exact), 16))
        save_npy(run.work / f"{run.name(k)}.sig.npy", np.stack(sigs) if sigs
                 else np.zeros((0, run.dedup["num_perm"]), np.uint32))
        (run.work / f"{run.name(k)}.sources.txt").write_text("".join(s + "\n" for s in sources), encoding="utf-8")
    save_json(run.filtered(k), state)
    if final:
        save_json(run.done(k), {"stats": S.new_stats(), "examples": {}})
    return state


def _route(where, record, text, plain, outcome, text_field, kept, removed, state, exact, sigs, sources):
    removal, new_text, meta, ex, sig = outcome
    if new_text is not None:
        if not plain:
            raise DataError(f"{where}: c4/redact would rewrite a chat or preference record; run them on text "
                            "records only")
        record = {**record, text_field: new_text}
    prior = record.get("curate") if isinstance(record.get("curate"), dict) else {}
    record = {**record, "curate": {**{k: v for k, v in prior.items() if k != "removed"}, "source": where, **meta}}
    if removal is not None:
        record["curate"]["removed"] = removal
        removed.write(record)
        _example(state["examples"], f"{removal['step']}/{removal['rule']}", where, new_text or text, removal)
        return
    kept.write(record)
    state["kept"] += 1
    sources.append(where)
    if ex is not None:
        exact.append(ex)
    if sig is not None:
        sigs.append(sig)


# ---------------------------------------------------------------- phase 2: the dedup merge

def merge(run: Run) -> dict:
    """Exact and near duplicates over every shard; writes work/part-K.dups.npy and dedup.json."""
    from . import dedup as D
    missing = [k for k in range(len(run.shards)) if not run.filtered(k).is_file()]
    if missing:
        raise DataError(f"{run.out}: the dedup merge needs every shard filtered first; missing "
                        f"{', '.join(run.name(k) for k in missing[:8])}{' ...' if len(missing) > 8 else ''} "
                        f"(run `lmfoundry data curate CONFIG --shard I/N` for them)")
    p = run.dedup
    counts = [load_json(run.filtered(k))["kept"] for k in range(len(run.shards))]
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
    total = int(offsets[-1])
    dup_of = np.full(total, -1, dtype=np.int64)
    kind_of = np.zeros(total, dtype=np.int8)            # 1 exact, 2 near
    similarity = np.zeros(total, dtype=np.float32)
    if p["exact"] and total:
        hashes = np.concatenate([np.load(run.work / f"{run.name(k)}.exact.npy") for k in range(len(run.shards))])
        ids, first = D.exact_duplicates(hashes.view(np.dtype((np.void, 16))).reshape(-1))
        dup_of[ids], kind_of[ids], similarity[ids] = first, 1, 1.0
    bands = rows = None
    if p["near"] and total:
        sigs = np.concatenate([np.load(run.work / f"{run.name(k)}.sig.npy") for k in range(len(run.shards))])
        bands, rows = (p["bands"], p["rows"]) if p["bands"] and p["rows"] else D.choose_bands(p["threshold"],
                                                                                             p["num_perm"])
        band = D.band_hashes(sigs, bands, rows)
        ids, keep, sim = D.near_duplicates(sigs, band, dup_of < 0, p["threshold"])
        dup_of[ids], kind_of[ids], similarity[ids] = keep, 2, sim
    summary = _save_dups(run, offsets, dup_of, kind_of, similarity)
    summary.update({"documents": total, "threshold": p["threshold"], "num_perm": p["num_perm"], "ngram": p["ngram"],
                    "bands": bands, "rows": rows})
    save_json(run.work / "dedup.json", summary)
    return summary


def _save_dups(run: Run, offsets, dup_of, kind_of, similarity) -> dict:
    """Per shard: rows (local index, kind, similarity) and the kept document's source, by line."""
    removed = np.nonzero(dup_of >= 0)[0]
    wanted = {int(x) for x in dup_of[removed]}
    shard_of = lambda g: int(np.searchsorted(offsets, g, side="right") - 1)  # noqa: E731
    source = {}
    for k in sorted({shard_of(g) for g in wanted}):
        lines = (run.work / f"{run.name(k)}.sources.txt").read_text(encoding="utf-8").splitlines()
        source.update({g: lines[g - offsets[k]] for g in wanted if shard_of(g) == k})
    for k in range(len(run.shards)):
        mine = removed[(removed >= offsets[k]) & (removed < offsets[k + 1])]
        save_json(run.work / f"{run.name(k)}.dups.json",
                  {str(int(g - offsets[k])): [int(kind_of[g]), round(float(similarity[g]), 4), source[int(dup_of[g])]]
                   for g in mine})
    roots, sizes = np.unique(dup_of[removed], return_counts=True)
    return {"exact_duplicates": int((kind_of == 1).sum()), "near_duplicates": int((kind_of == 2).sum()),
            "clusters": int(len(roots)), "largest_cluster": int(sizes.max() + 1) if len(sizes) else 0}


# ---------------------------------------------------------------- phase 3: dropping the duplicates

def write_shard(run: Run, k: int, bar) -> dict:
    """Phase 3 for shard k: stage file minus its duplicates -> OUT/data; duplicates -> removed/."""
    dups = load_json(run.work / f"{run.name(k)}.dups.json")
    stage = run.work / f"{run.name(k)}.jsonl"
    kept = PartWriter(run.out / "data" / f"{run.name(k)}.{run.ext}", run.cfg.format)
    removed = PartWriter(run.out / "removed" / f"{run.name(k)}.dedup.jsonl")
    stats, examples = S.new_stats(), {}
    step = {"docs_in": 0, "docs_out": 0, "words_in": 0, "words_out": 0}
    with committed(kept, removed):
        for i, (where, record) in enumerate(read_records(stage)):
            text = record_text(record, run.cfg.text_field, where)[0]
            words = len(text.split())
            step["docs_in"] += 1
            step["words_in"] += words
            if str(i) in dups:
                kind_, sim, of = dups[str(i)]
                rule = "exact" if kind_ == 1 else "near"
                record["curate"]["removed"] = {"step": "dedup", "rule": rule, "value": sim,
                                               "threshold": 1.0 if kind_ == 1 else run.dedup["threshold"],
                                               "duplicate_of": of}
                removed.write(record)
                S.bump(stats["removed"], f"dedup/{rule}", docs=1, words=words)
                _example(examples, f"dedup/{rule}", record["curate"].get("source", where), text, {"value": sim})
            else:
                kept.write(record)
                step["docs_out"] += 1
                step["words_out"] += words
            bar.update(1)
    stats["steps"]["dedup"] = step
    stats["documents"]["out"] = step["docs_out"] - step["docs_in"]     # the change to phase 1's count
    stats["words"]["out"] = step["words_out"] - step["words_in"]
    state = {"stats": stats, "examples": examples}
    save_json(run.done(k), state)
    stage.unlink()
    return state


# ---------------------------------------------------------------- the whole run

def curate(cfg: Config, shard: tuple[int, int] | None = None, merge_only: bool = False, force: bool = False,
           progress: bool = True) -> dict:
    """Run what is left of the pipeline for this machine's shards (all of them without `shard`):
    phase 1, then (with dedup, once every shard is filtered) the merge and phase 3; write the
    report. `merge_only` runs just the merge (the multi-machine recipe's middle step)."""
    from tqdm import tqdm

    from .report import write_report
    run = Run(cfg, force)
    mine = run.mine(shard)
    t0 = time.time()
    if not merge_only:
        todo = [k for k in mine if not run.filtered(k).is_file()]
        if todo:
            submit, close = _pool(cfg)
            total = sum(f.stat().st_size for k in todo for f in run.shards[k])
            try:
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"curate: {len(todo)} shard(s)",
                          disable=not progress, dynamic_ncols=True) as bar:
                    for k in todo:
                        filter_shard(run, k, submit, cfg.n_workers, bar)
            finally:
                close()
    if run.dedup is not None:
        all_filtered = all(run.filtered(k).is_file() for k in range(len(run.shards)))
        if merge_only or (shard is None and all_filtered and not (run.work / "dedup.json").is_file()):
            merge(run)
        if (run.work / "dedup.json").is_file() and not merge_only:
            todo = [k for k in mine if not run.done(k).is_file()]
            with tqdm(total=sum(load_json(run.filtered(k))["kept"] for k in todo), unit="doc",
                      desc="curate: dropping duplicates", disable=not progress or not todo) as bar:
                for k in todo:
                    write_shard(run, k, bar)
    return write_report(run, time.time() - t0)
