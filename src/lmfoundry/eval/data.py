"""Task files in the public datasets' own schemas: JSON lines, a JSON list, or parquet, read by
lmfoundry.records (errors are EvalDataError and name the file and line), and CSV (KMMLU's Hub
files) read here, typed per column as pandas (and so Hugging Face `datasets`) would: a column
whose every value is an integer becomes int, else a number becomes float, True/False become bool,
anything else stays text; an empty cell is None."""
from __future__ import annotations

import csv
from pathlib import Path

from ..errors import EvalDataError
from ..records import RECORD_SUFFIXES
from ..records import read_records as _read

EXTENSIONS = RECORD_SUFFIXES + (".csv",)


def read_records(path: str | Path) -> list[dict]:
    """Every record of a .jsonl / .json / .parquet / .csv file, as plain Python dicts."""
    if Path(path).suffix == ".csv":
        return read_csv(path)
    return [record for _, record in _read(path, EvalDataError)]


def _typed(values: list[str]):
    """The column's values converted the way pandas' read_csv infers one dtype for the column."""
    present = [v for v in values if v != ""]
    for convert in (int, float, {"True": True, "False": False, "true": True, "false": False}.__getitem__):
        try:
            converted = {v: convert(v) for v in set(present)}
        except (ValueError, KeyError):
            continue
        return [converted[v] if v != "" else None for v in values]
    return [v if v != "" else None for v in values]


def read_csv(path: str | Path) -> list[dict]:
    path = Path(path)
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                if rows and len(row) != len(rows[0]):
                    raise EvalDataError(f"{path}:{reader.line_num}: {len(row)} fields, the header has {len(rows[0])}")
                rows.append(row)
    except FileNotFoundError:
        raise EvalDataError(f"{path}: file not found") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise EvalDataError(f"{path}: not a readable UTF-8 CSV file ({e})") from None
    if not rows:
        return []
    header, body = rows[0], rows[1:]
    columns = [_typed([row[j] for row in body]) for j in range(len(header))]
    return [{name: columns[j][i] for j, name in enumerate(header)} for i in range(len(body))]


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
