"""One reader for every file of records or documents lmfoundry takes: training corpora, chat
and preference records, evaluation task files, curation inputs.

    for where, record in read_records("sft.jsonl"): ...          # dicts, streamed
    for where, text in read_texts("corpus.txt"): ...             # documents, streamed
    paths = expand_files(["data/", "extra.jsonl"])                # directories expand, sorted

Files: `.jsonl` (one JSON object per line), `.json` (a list of objects, or {"data": [...]}),
`.parquet` (rows; needs pyarrow), `.txt` (documents only), and `.jsonl.gz` / `.jsonl.zst` /
`.txt.gz` / `.txt.zst` (gzip from the standard library; zstd needs the `zstandard` package).
`where` names the place as the user would look for it: "FILE:LINE" for lines, "FILE: record N"
for a JSON list, "FILE: row N" for parquet (N from 1). Every problem raises one error (DataError
unless the caller passes its own family) naming the file and, where there is one, the line.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Iterator

from .errors import DataError

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
COMPRESSED = (".gz", ".zst")
TXT_MODES = ("paragraph", "line", "file")
TYPE_NAMES = {str: "string", int: "integer", float: "number", list: "list", dict: "object", bool: "boolean"}


def kind(path: Path) -> str:
    """The file's format suffix with any compression suffix removed (".jsonl" for a.jsonl.gz)."""
    suffixes = path.suffixes
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSED:
        return suffixes[-2]
    return path.suffix


def expand_files(files, suffixes=TEXT_SUFFIXES, error=DataError) -> list[Path]:
    """A path or a list of paths; directories expand to the files under them whose format is one
    of `suffixes` (compressed or not), sorted. Missing files and other formats are refused."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    out: list[Path] = []
    for f in files:
        p = Path(f)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and kind(q) in suffixes
                           and not q.name.startswith("."))
            if not found:
                raise error(f"{p}: directory has no {', '.join(suffixes)} files")
            out.extend(found)
        elif not p.is_file():
            raise error(f"{p}: file not found")
        elif kind(p) not in suffixes:
            raise error(f"{p}: unsupported file type '{kind(p)}' (expected {', '.join(suffixes)})")
        else:
            out.append(p)
    if not out:
        raise error("no data files given")
    return out


def open_binary(path: Path, error=DataError):
    """The file's bytes, decompressed when it ends in .gz or .zst."""
    if not path.is_file():
        raise error(f"{path}: file not found")
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise error(f"{path}: reading .zst files needs the zstandard package (pip install zstandard)") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def decode(raw: bytes, where: str, error=DataError) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def parse_json(raw: bytes | str, where: str, error=DataError):
    try:
        return json.loads(decode(raw, where, error) if isinstance(raw, bytes) else raw)
    except json.JSONDecodeError as e:
        raise error(f"{where}: malformed JSON line ({e.msg} at column {e.colno})") from None


def _first_line(e) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _parquet(path: Path, error, columns=None):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise error(f"{path}: reading parquet needs pyarrow (pip install 'lmfoundry[parquet]')") from None
    try:
        return pq.ParquetFile(path), pa
    except (pa.ArrowException, OSError) as e:
        raise error(f"{path}: not a readable parquet file ({_first_line(e)})") from None


def _compressed_read(f, path: Path, error):
    try:
        return f.read()
    except (OSError, EOFError) as e:   # gzip/zstd report corrupt or truncated streams this way
        raise error(f"{path}: cannot decompress ({_first_line(e)})") from None


def _lines(path: Path, error) -> Iterator[tuple[int, bytes, int]]:
    """(line number, raw line, bytes read from the file since the previous yield)."""
    with open_binary(path, error) as f:
        lineno = 0
        try:
            for raw in f:
                lineno += 1
                yield lineno, raw, len(raw)
        except (OSError, EOFError) as e:
            raise error(f"{path}:{lineno + 1}: cannot decompress ({_first_line(e)})") from None


# ---------------------------------------------------------------- records (dicts)

def read_records(path, error=DataError, *, sizes: bool = False) -> Iterator:
    """Yield (where, record) for every record of one file, in order; records must be objects.
    With sizes=True, (where, record, bytes of the file read since the previous yield), for
    progress bars (exact for .jsonl; spread over the rows for .parquet; all at once for .json)."""
    path = Path(path)
    fmt = kind(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    if fmt == ".jsonl":
        items = _jsonl_records(path, error)
    elif fmt == ".json":
        items = _json_records(path, error)
    elif fmt == ".parquet":
        items = _parquet_records(path, error)
    else:
        raise error(f"{path}: unsupported file type '{fmt}' (expected {', '.join(RECORD_SUFFIXES)})")
    for item in items:
        yield item if sizes else item[:2]


def _jsonl_records(path: Path, error):
    pending = 0
    for lineno, raw, n in _lines(path, error):
        pending += n
        if raw.strip():
            yield (*_object(parse_json(raw, f"{path}:{lineno}", error), f"{path}:{lineno}", error), pending)
            pending = 0


def _json_records(path: Path, error):
    with open_binary(path, error) as f:
        raw = _compressed_read(f, path, error)
    data = parse_json(raw, str(path), error)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise error(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    pending = len(raw)
    for i, r in enumerate(data, 1):
        yield (*_object(r, f"{path}: record {i}", error), pending)
        pending = 0


def _parquet_records(path: Path, error):
    pf, pa = _parquet(path, error)
    rows, size, row = max(pf.metadata.num_rows, 1), path.stat().st_size, 0
    try:
        for batch in pf.iter_batches(batch_size=1024):
            records = batch.to_pylist()
            step = size * len(records) // rows
            for r in records:
                row += 1
                yield f"{path}: row {row}", r, step
                step = 0
    except (pa.ArrowException, OSError) as e:
        raise error(f"{path}: not a readable parquet file ({_first_line(e)})") from None


def _object(record, where: str, error):
    if not isinstance(record, dict):
        raise error(f"{where}: expected a JSON object, got {type(record).__name__}")
    return where, record


def load_records(source, error=DataError) -> list[tuple[str, dict]]:
    """[(where, record)] from a file, a list of files, or a list of records in memory; refuses
    an empty result (naming the file)."""
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    if not isinstance(source, (list, tuple)):
        raise error(f"expected a records file or a list of records, got {type(source).__name__}")
    if not source:
        raise error("no records given (empty list)")
    if all(isinstance(s, (str, os.PathLike)) for s in source):
        out = []
        for f in source:
            got = list(read_records(f, error))
            if not got:
                raise error(f"{f}: no records (the file is empty)")
            out += got
        return out
    return [(f"records[{i}]", r) for i, r in enumerate(source)]


def field(record: dict, name: str, where: str, kind_=str, error=DataError):
    """record[name], which must exist and be of type kind_ (the error names the field)."""
    if name not in record:
        raise error(f"{where}: record has no '{name}' field (has {sorted(record)[:8]})")
    value = record[name]
    if not isinstance(value, kind_):
        kinds = kind_ if isinstance(kind_, tuple) else (kind_,)
        what = " or ".join(TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise error(f"{where}: '{name}' must be a {what}, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- documents (texts)

def read_texts(path, text_field: str = "text", txt_mode: str = "paragraph", *, sizes: bool = False,
               error=DataError) -> Iterator:
    """Yield (where, text) for every non-empty document of one file; with sizes=True,
    (where, text, bytes of the file read since the previous yield) for progress bars.

    .txt: `txt_mode` "paragraph" (documents separated by blank lines), "line" (one per line) or
    "file" (the whole file). .jsonl/.json: the string field `text_field` of each record.
    .parquet: the string column `text_field`.
    """
    path = Path(path)
    fmt = kind(path)
    if fmt == ".txt":
        if txt_mode not in TXT_MODES:
            raise error(f"txt_mode must be one of {TXT_MODES}, got {txt_mode!r}")
        items = _txt(path, txt_mode, error)
    elif fmt == ".parquet":
        items = _parquet_texts(path, text_field, error)
    elif fmt in (".jsonl", ".json"):
        items = _record_texts(path, text_field, error)
    else:
        raise error(f"{path}: unsupported file type '{fmt}' (expected {', '.join(TEXT_SUFFIXES)})")
    for item in items:
        yield item if sizes else item[:2]


def _txt(path: Path, mode: str, error):
    if mode == "file":
        with open_binary(path, error) as f:
            raw = _compressed_read(f, path, error)
        text = decode(raw, str(path), error)
        if text.strip():
            yield f"{path}:1", text, len(raw)
        return
    lines, first, pending = [], 0, 0
    for lineno, raw, n in _lines(path, error):
        pending += n
        line = decode(raw, f"{path}:{lineno}", error)
        if mode == "line":
            if line.strip():
                yield f"{path}:{lineno}", line.rstrip("\r\n"), pending
                pending = 0
        elif line.strip():
            if not lines:
                first = lineno
            lines.append(line)
        elif lines:
            yield f"{path}:{first}", "".join(lines).rstrip("\r\n"), pending
            lines, pending = [], 0
    if lines:
        yield f"{path}:{first}", "".join(lines).rstrip("\r\n"), pending


def _record_texts(path: Path, text_field: str, error):
    pending = 0
    for where, record, n in read_records(path, error, sizes=True):
        pending += n
        text = field(record, text_field, where, str, error)
        if text.strip():
            yield where, text, pending
            pending = 0


def _parquet_texts(path: Path, text_field: str, error):
    pf, pa = _parquet(path, error)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise error(f"{path}: no column '{text_field}' (columns: {names[:12]})")
    column = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column) or pa.types.is_large_string(column)):
        raise error(f"{path}: column '{text_field}' must hold strings, it holds {column}")
    rows, size, row = max(pf.metadata.num_rows, 1), path.stat().st_size, 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        values = batch.column(0).to_pylist()
        step = size * len(values) // rows
        for text in values:
            row += 1
            if text is None:
                raise error(f"{path}: row {row}: '{text_field}' is null")
            if text.strip():
                yield f"{path}: row {row}", text, step
                step = 0


# ---------------------------------------------------------------- settings files

def read_yaml_mapping(path, error=DataError, expected: str = "a YAML mapping") -> tuple[dict, str]:
    """(the mapping, its text) from a YAML file; a missing file, malformed YAML or anything but a
    mapping raises `error` naming the file."""
    import yaml
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise error(f"{path}: malformed YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{path}: expected {expected}, got {type(data).__name__}")
    return data, text
