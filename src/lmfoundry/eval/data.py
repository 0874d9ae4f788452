"""Task files in the public datasets' own schemas: JSON lines, a JSON list, or parquet, read by
lmfoundry.records (errors are EvalDataError and name the file and line)."""
from __future__ import annotations

from pathlib import Path

from ..errors import EvalDataError
from ..records import RECORD_SUFFIXES
from ..records import read_records as _read

EXTENSIONS = RECORD_SUFFIXES


def read_records(path: str | Path) -> list[dict]:
    """Every record of a .jsonl / .json / .parquet file, as plain Python dicts."""
    return [record for _, record in _read(path, EvalDataError)]


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
