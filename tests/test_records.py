"""lmfoundry.records: one reader for records and documents, with locations users can find."""
import gzip
import json

import pytest

from lmfoundry.errors import DataError, EvalDataError
from lmfoundry.records import expand_files, load_records, read_records, read_texts


def write(path, text, mode="w"):
    path.write_text(text) if mode == "w" else path.write_bytes(text)
    return path


def test_jsonl_json_and_gzip_give_the_same_records_with_locations(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}]
    body = "\n".join(json.dumps(r) for r in rows) + "\n"
    plain = write(tmp_path / "x.jsonl", "\n" + body)            # a blank first line still counts
    packed = write(tmp_path / "x.jsonl.gz", gzip.compress(body.encode()), "b")
    listed = write(tmp_path / "x.json", json.dumps({"data": rows}))
    assert list(read_records(plain)) == [(f"{plain}:2", rows[0]), (f"{plain}:3", rows[1])]
    assert [r for _, r in read_records(packed)] == rows
    assert list(read_records(listed)) == [(f"{listed}: record 1", rows[0]), (f"{listed}: record 2", rows[1])]
    assert [t for _, t in read_texts(packed)] == ["a", "b"]


def test_parquet_records_and_texts(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"text": "x", "n": 1}, {"text": " ", "n": 2}, {"text": "y", "n": 3}]),
                   tmp_path / "t.parquet")
    assert [w for w, _ in read_records(tmp_path / "t.parquet")][-1] == f"{tmp_path / 't.parquet'}: row 3"
    assert list(read_texts(tmp_path / "t.parquet")) == [(f"{tmp_path / 't.parquet'}: row 1", "x"),
                                                        (f"{tmp_path / 't.parquet'}: row 3", "y")]


def test_txt_modes(tmp_path):
    f = write(tmp_path / "c.txt", "one\ntwo\n\n\nthree\n")
    assert list(read_texts(f)) == [(f"{f}:1", "one\ntwo"), (f"{f}:5", "three")]
    assert [t for _, t in read_texts(f, txt_mode="line")] == ["one", "two", "three"]
    assert [t for _, t in read_texts(f, txt_mode="file")] == ["one\ntwo\n\n\nthree\n"]


@pytest.mark.parametrize("name,content,pattern", [
    ("bad.jsonl", '{"text": "a"}\n{oops\n', r"bad\.jsonl:2: malformed JSON line"),
    ("arr.jsonl", '[1, 2]\n', r"arr\.jsonl:1: expected a JSON object, got list"),
    ("notlist.json", '{"a": 1}', r"notlist\.json: expected a JSON list of records"),
    ("latin.jsonl", b'{"text": "caf\xe9"}\n', r"latin\.jsonl:1: not UTF-8 text"),
    ("trunc.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 50, mtime=0)[:-12], r"trunc\.jsonl\.gz:\d+: cannot decompress"),
    ("doc.csv", "a,b\n", r"doc\.csv: unsupported file type '\.csv'"),
])
def test_bad_files_name_the_file_and_line(tmp_path, name, content, pattern):
    f = write(tmp_path / name, content, "b" if isinstance(content, bytes) else "w")
    with pytest.raises(DataError, match=pattern):
        list(read_records(f))
    with pytest.raises(EvalDataError, match=pattern):    # callers choose the error family
        list(read_records(f, EvalDataError))


def test_text_field_errors_and_empty_files(tmp_path):
    f = write(tmp_path / "n.jsonl", '{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"n\.jsonl:2: record has no 'text' field"):
        list(read_texts(f))
    g = write(tmp_path / "i.jsonl", '{"text": 3}\n')
    with pytest.raises(DataError, match=r"i\.jsonl:1: 'text' must be a string, got int"):
        list(read_texts(g))
    write(tmp_path / "empty.jsonl", "")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records \(the file is empty\)"):
        load_records(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match=r"gone\.jsonl: file not found"):
        load_records([tmp_path / "gone.jsonl"])


def test_expand_files(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.jsonl", "a.txt", "c.csv", ".hidden.txt", "z.jsonl.gz"):
        write(tmp_path / "d" / name, "x")
    assert [p.name for p in expand_files(tmp_path / "d")] == ["a.txt", "b.jsonl", "z.jsonl.gz"]
    with pytest.raises(DataError, match="directory has no"):
        expand_files(tmp_path / "d", suffixes=(".parquet",))
