"""Tokenizer training: the directory it writes loads identically in transformers and in
lmfoundry, and the compression report counts what it says it counts."""
from __future__ import annotations

import json

import pytest

from lmfoundry.cli import main
from lmfoundry.data import DataError
from lmfoundry.tokenizer import load_tokenizer
from lmfoundry.tokenizer_train import compression_report, format_report, train_tokenizer

ENGLISH = [
    "Depth up-scaling copies a base model and stacks two trimmed copies.",
    "The stacked model recovers quickly with continued pretraining on general text.",
    "Tom has 3 apples and buys 4 more, so he has 7 apples.",
    "Instruction tuning teaches a model to follow requests.\nPreference tuning teaches it which answers people like.",
] * 3
KOREAN = [
    "언어 모델은 다음 토큰을 예측하도록 학습됩니다.",
    "깊이 확장은 기본 모델을 복사한 뒤 층을 잘라 쌓는 방법입니다.",
    "민수는 사과 3개를 가지고 있고 4개를 더 샀습니다. 사과는 모두 7개입니다.",
    "지시 학습은 모델이 요청을 따르도록 가르칩니다.",
] * 3
PROBES = ["Tom has 12 apples.", "언어 모델은 토큰을 예측합니다.", "  spaces\tand\nnewlines  ",
          "emoji 😀 ∑ 中文", ""]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok-data")
    (root / "en.txt").write_text("\n\n".join(ENGLISH) + "\n", encoding="utf-8")
    (root / "ko.jsonl").write_text("".join(json.dumps({"body": t}, ensure_ascii=False) + "\n" for t in KOREAN),
                                   encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def trained(files):
    return train_tokenizer([files / "en.txt"], files / "tok", vocab_size=400, text_field="text")


def test_trained_tokenizer_loads_identically_in_transformers_and_lmfoundry(trained):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(trained))
    ours = load_tokenizer(trained)
    assert ours.vocab_size == len(hf) == 400
    assert ours.bos_token == hf.bos_token == "<s>" and ours.eos_token == hf.eos_token == "</s>"
    for text in PROBES:
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert ids[0] == ours.bos_token_id            # BOS from the post-processor, once
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text
    chat = [{"role": "user", "content": "Tom has 3 apples?"}, {"role": "assistant", "content": "Yes, 3."}]
    assert ours.apply_chat_template(chat, tokenize=True) == hf.apply_chat_template(chat, tokenize=True,
                                                                                   return_dict=False)
    im_end = ours.token_to_id("<|im_end|>")
    assert ours.encode("a<|im_end|>b", add_special_tokens=False).count(im_end) == 1   # specials stay whole


def test_compression_report_counts_words_chars_and_tokens_per_file(files, trained):
    rows = compression_report(trained, [files / "en.txt", files / "ko.jsonl"], text_field="body")
    # independent counts: the documents we wrote, whitespace words, code points, tokens without BOS
    tok = load_tokenizer(trained)
    for row, docs in zip(rows, (ENGLISH, KOREAN)):
        words = sum(len(d.split()) for d in docs)
        chars = sum(len(d) for d in docs)
        tokens = sum(len(tok.encode(d, add_special_tokens=False)) for d in docs)
        assert (row["documents"], row["words"], row["chars"], row["tokens"]) == (len(docs), words, chars, tokens)
        assert row["tokens_per_word"] == pytest.approx(tokens / words)
        assert row["chars_per_token"] == pytest.approx(chars / tokens)
    en, ko = rows
    assert ko["tokens_per_word"] > en["tokens_per_word"]   # trained on English only: Korean splits into bytes
    table = format_report(rows)
    assert "tokens/word" in table and "en.txt" in table and "ko.jsonl" in table and "total" in table


def test_cli_trains_and_reports(files, tmp_path, capsys):
    out = tmp_path / "cli-tok"
    argv = ["tokenizer", "train", str(files / "en.txt"), str(files / "ko.jsonl"), "--text-field", "body",
            "--out", str(out), "--vocab-size", "420", "--special-token", "<|tool|>"]
    assert main(argv) == 0
    tok = load_tokenizer(out)
    assert tok.vocab_size == 420 and tok.encode("<|tool|>", add_special_tokens=False) == [tok.token_to_id("<|tool|>")]
    assert main(["tokenizer", "report", str(out), str(files / "en.txt"), str(files / "ko.jsonl"),
                 "--text-field", "body"]) == 0
    printed = capsys.readouterr().out
    assert "chars/token" in printed and "ko.jsonl" in printed
    assert main(argv) == 1   # refuses to replace a tokenizer without --force
    err = capsys.readouterr().err
    assert err.startswith("lmfoundry: error:") and "--force" in err and err.count("\n") == 1
    assert main(argv + ["--force"]) == 0


def test_bad_training_input_is_one_clear_error(files, tmp_path):
    with pytest.raises(DataError, match="vocab_size must be at least 261"):
        train_tokenizer([files / "en.txt"], tmp_path / "t1", vocab_size=100)
    with pytest.raises(DataError, match=r"nope\.txt: file not found"):
        train_tokenizer([tmp_path / "nope.txt"], tmp_path / "t2", vocab_size=300)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty\.txt: no documents"):
        train_tokenizer([tmp_path / "empty.txt"], tmp_path / "t3", vocab_size=300)
    with pytest.raises(DataError, match="eos_token '<eot>' is not among the special tokens"):
        train_tokenizer([files / "en.txt"], tmp_path / "t4", vocab_size=300, eos_token="<eot>")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("t1", "t2", "t3", "t4", ".t"))]
