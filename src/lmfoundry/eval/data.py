"""Task files in the public datasets' own schemas: JSON lines, a JSON list, or parquet."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LMFoundryError

EXTENSIONS = (".jsonl", ".json", ".parquet")


class EvalDataError(LMFoundryError):
    """A task file is missing, unreadable or not in the dataset's schema."""


def read_records(path: str | Path) -> list[dict]:
    """Every record of a .jsonl / .json / .parquet file, as plain Python dicts."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise EvalDataError(f"{path}: reading parquet needs pyarrow (pip install 'lmfoundry[parquet]')") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several unrelated types
            raise EvalDataError(f"{path}: not a readable parquet file ({e})") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{path}: not UTF-8 text ({e})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}: malformed JSON ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise EvalDataError(f"{path}: expected a JSON list of records")
        records = data
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
    for n, r in enumerate(records, 1):
        if not isinstance(r, dict):
            raise EvalDataError(f"{path}: record {n} is a {type(r).__name__}, expected an object")
    return records


def find_file(data_dir: str | Path, stems, splits=()) -> Path | None:
    """The first of DIR/<stem>.<ext> or DIR/<stem>.<split>.<ext> (also <stem>_<split>) that exists."""
    data_dir = Path(data_dir)
    for stem in stems:
        names = [stem] + [f"{stem}{sep}{s}" for s in splits for sep in (".", "_", "/")]
        for name in names:
            for ext in EXTENSIONS:
                p = data_dir / f"{name}{ext}"
                if p.is_file():
                    return p
    return None
