"""lmfoundry.data: corpora tokenized once, packed batches whose documents never see each other,
mixtures and stages, exact resume, and SFT/DPO labels from the chat template."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lmfoundry.data import DataError, DPOBatches, PackedBatches, SFTBatches, TokenDataset, tokenize_corpus
from lmfoundry.demo import CORPUS
from lmfoundry.tokenizer import load_tokenizer

DOCS = [line for line in CORPUS.splitlines() if line] + [
    "A short one.",
    "Two lines\nin one document.",
    " ".join(["A very long document about apples and trains."] * 12),   # longer than the test seq_len
]


@pytest.fixture(scope="module")
def tok(demo_dir):
    return load_tokenizer(demo_dir)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def expected(tok, text):
    return tok.encode(text) + [tok.eos_token_id]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, demo_dir):
    root = tmp_path_factory.mktemp("corpus")
    src = write_jsonl(root / "docs.jsonl", [{"text": d} for d in DOCS * 3])
    return tokenize_corpus([src], demo_dir, root / "ds", progress=False)


def synthetic(tmp_path, name, low, high, lengths, seed=0):
    """A dataset whose tokens all lie in [low, high): tells sources apart in a batch."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(low, high, size=n) for n in lengths]
    return TokenDataset.from_documents(tmp_path / name, docs, vocab_size=512, eos_token_id=4)


def runs(row_doc_ids):
    """(start, end) of each contiguous run of one doc id."""
    ids = row_doc_ids.tolist()
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or ids[t] != ids[t - 1]:
            out.append((start, t))
            start = t
    return out


def real_tokens(batches):
    """The non-padding tokens of a list of batches, in yield order."""
    out = []
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            for s, e in runs(b["doc_ids"][r]):
                piece = b["input_ids"][r, s:e]
                if piece.any():   # padding runs are all 0 (<|pad|>, never in a document)
                    out.extend(piece.tolist())
    return out


# ---------------------------------------------------------------- tokenize once

def test_tokenize_once_reuses_and_retokenizes_changed_input(tmp_path, demo_dir, tok):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in DOCS])
    ds = tokenize_corpus([src], demo_dir, tmp_path / "ds", workers=2, progress=False)
    assert not ds.reused and len(ds) == len(DOCS)
    index_mtime = (tmp_path / "ds" / "index.json").stat().st_mtime_ns
    again = tokenize_corpus([src], demo_dir, tmp_path / "ds", workers=2, progress=False)
    assert again.reused and (tmp_path / "ds" / "index.json").stat().st_mtime_ns == index_mtime
    assert [list(again[i]) for i in range(len(again))] == [expected(tok, d) for d in DOCS]

    write_jsonl(src, [{"text": d} for d in DOCS + ["one more document"]])
    changed = tokenize_corpus([src], demo_dir, tmp_path / "ds", workers=2, progress=False)
    assert not changed.reused and len(changed) == len(DOCS) + 1
    assert list(changed[len(DOCS)]) == expected(tok, "one more document")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]   # no temporary left behind
    # a different text field is a different dataset
    write_jsonl(src, [{"body": d} for d in DOCS])
    assert len(tokenize_corpus([src], demo_dir, tmp_path / "ds", text_field="body", progress=False)) == len(DOCS)


def test_txt_jsonl_and_parquet_store_encode_plus_eos_per_document(tmp_path, demo_dir, tok):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "docs.txt").write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")   # blank line between docs
    write_jsonl(tmp_path / "docs.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "docs.parquet", row_group_size=3)
    want = [expected(tok, d) for d in DOCS]
    for name in ("docs.txt", "docs.jsonl", "docs.parquet"):
        ds = tokenize_corpus([tmp_path / name], demo_dir, tmp_path / f"ds-{name}", workers=1, progress=False)
        assert ds.dtype == np.uint16
        assert [list(map(int, ds[i])) for i in range(len(ds))] == want, name
    both = tokenize_corpus([tmp_path / "docs.txt", tmp_path / "docs.parquet"], demo_dir, tmp_path / "both",
                           workers=2, progress=False)
    assert len(both) == 2 * len(DOCS) and [s["documents"] for s in both.sources] == [len(DOCS)] * 2
    assert TokenDataset.open(tmp_path / "both").num_tokens == 2 * sum(map(len, want))


def test_shards_split_at_document_boundaries(tmp_path, demo_dir, tok, monkeypatch):
    import lmfoundry.data.corpus as corpus_module
    monkeypatch.setattr(corpus_module, "TASK_CHARS", 500)   # many small tokenization tasks
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in DOCS * 40])
    ds = tokenize_corpus([src], demo_dir, tmp_path / "ds", workers=2, progress=False, shard_tokens=1000)
    assert len(ds.index["shards"]) > 3
    assert [list(map(int, ds[i])) for i in range(len(ds))] == [expected(tok, d) for d in DOCS * 40]


def test_tokens_are_uint32_when_the_vocabulary_exceeds_uint16(tmp_path, demo_dir):
    from tokenizers import Tokenizer as Backend
    big = tmp_path / "big-tokenizer"
    big.mkdir()
    backend = Backend.from_file(str(demo_dir / "tokenizer.json"))
    backend.add_tokens([f"zz{i}" for i in range(66_000)])
    backend.save(str(big / "tokenizer.json"))
    shutil.copy(demo_dir / "tokenizer_config.json", big / "tokenizer_config.json")
    tok = load_tokenizer(big)
    text = "apples zz65999 trains"
    assert max(tok.encode(text)) > 65535
    ds = tokenize_corpus([write_jsonl(tmp_path / "a.jsonl", [{"text": text}])], big, tmp_path / "ds", progress=False)
    assert ds.dtype == np.uint32 and list(map(int, ds[0])) == tok.encode(text) + [tok.eos_token_id]


# ---------------------------------------------------------------- packing

def test_rows_are_whole_documents_or_seq_len_chunks_and_labels_stay_inside(corpus):
    T = 48
    pieces = set()
    for i in range(len(corpus)):
        doc = tuple(map(int, corpus[i]))
        pieces.add(doc)
        pieces.update(doc[k:k + T] for k in range(0, len(doc), T))   # only over-long documents are chunked
    it = PackedBatches([(corpus, 1.0)], seq_len=T, batch_size=4, seed=3)
    filled = 0
    for _ in range(10):
        b = next(it)
        assert all(b[k].shape == (4, T) and b[k].dtype == torch.long for k in ("input_ids", "labels", "doc_ids"))
        for r in range(4):
            ids, labels, doc_ids = b["input_ids"][r], b["labels"][r], b["doc_ids"][r]
            spans = runs(doc_ids)
            assert doc_ids[0] == 0 and all(doc_ids[s] == k for k, (s, e) in enumerate(spans))
            for s, e in spans:
                piece = tuple(ids[s:e].tolist())
                if not any(piece):   # padding: the row's last run, nothing to predict
                    assert (s, e) == spans[-1] and (labels[s:e] == -100).all()
                    continue
                filled += e - s
                assert piece in pieces
                assert labels[s:e - 1].tolist() == list(piece[1:]) and labels[e - 1] == -100
    assert filled > 0.9 * 10 * 4 * T   # best-fit packing wastes little


def test_packed_row_logits_equal_per_document_forwards(corpus):
    from lmfoundry.config import ModelConfig
    from lmfoundry.model import Transformer
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).eval()
    it = PackedBatches({"c": (corpus, 1)}, seq_len=64, batch_size=2, seed=1)
    b = next(it)
    while min(len(runs(row)) for row in b["doc_ids"]) < 3:   # rows of several documents
        b = next(it)
    with torch.no_grad():
        packed = model(b["input_ids"], doc_ids=b["doc_ids"])
        for r in range(2):
            spans = runs(b["doc_ids"][r])
            for s, e in spans:
                alone = model(b["input_ids"][r:r + 1, s:e])[0]
                torch.testing.assert_close(packed[r, s:e], alone, atol=1e-5, rtol=1e-5)
        # the loss of the packed batch is the token-weighted mean of per-document next-token losses
        V = packed.shape[-1]
        loss = torch.nn.functional.cross_entropy(packed.view(-1, V), b["labels"].view(-1), ignore_index=-100,
                                                 reduction="sum")
        per_doc = 0.0
        for r in range(2):
            for s, e in runs(b["doc_ids"][r]):
                x = b["input_ids"][r, s:e]
                if x.any():
                    per_doc += torch.nn.functional.cross_entropy(model(x[None])[0, :-1], x[1:], reduction="sum")
        torch.testing.assert_close(loss, per_doc, atol=1e-3, rtol=1e-5)


def test_same_seed_same_batches_other_seed_other_batches(corpus):
    take = lambda seed: [next(it) for it in [PackedBatches([(corpus, 1)], 32, 2, seed=seed)] for _ in range(6)]  # noqa
    a, b, c = take(0), take(0), take(1)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_mixture_weights_are_token_proportions(tmp_path):
    rng = np.random.default_rng(0)
    long_docs = synthetic(tmp_path, "long", 10, 100, rng.integers(20, 60, size=200))
    short_docs = synthetic(tmp_path, "short", 100, 200, rng.integers(3, 10, size=300))
    it = PackedBatches({"long": (long_docs, 1.0), "short": (short_docs, 3.0)}, seq_len=64, batch_size=4, seed=0)
    tokens = np.array(real_tokens([next(it) for _ in range(60)]))
    share_short = (tokens >= 100).mean()
    assert abs(share_short - 0.75) < 0.01, share_short


def test_stages_switch_mixture_at_their_token_budget_and_stop(tmp_path):
    a = synthetic(tmp_path, "a", 10, 100, [37, 5, 80, 12, 64, 9] * 5)
    b = synthetic(tmp_path, "b", 100, 200, [7, 30, 15] * 10)
    stages = [{"tokens": 1000, "mixture": {"a": 1}}, {"tokens": 700, "mixture": {"b": 1}},
              {"tokens": 300, "mixture": {"a": 1, "b": 1}}]
    it = PackedBatches({"a": (a, 1), "b": (b, 1)}, seq_len=64, batch_size=3, seed=0, stages=stages)
    assert it.total_tokens == 2000
    batches, yielded = [], []
    for batch in it:
        batches.append(batch)
        yielded.append(it.tokens_yielded)
    stream = np.array(real_tokens(batches))
    assert len(stream) == 2000 == it.tokens_yielded
    assert (stream[:1000] < 100).all() and (stream[1000:1700] >= 100).all()   # switch exactly at 1000
    assert 0.3 < (stream[1700:] >= 100).mean() < 0.7
    assert yielded == sorted(yielded) and all(x["input_ids"].shape == (3, 64) for x in batches)
    with pytest.raises(StopIteration):
        next(it)


def test_resume_continues_exactly_as_uninterrupted(tmp_path, corpus):
    a = synthetic(tmp_path, "a", 10, 100, [37, 5, 80, 12, 64, 9] * 3)
    stages = [{"tokens": 900, "mixture": {"a": 1}}, {"tokens": 2500, "mixture": {"a": 1, "c": 2}}]
    make = lambda: PackedBatches({"a": (a, 1), "c": (corpus, 1)}, 32, 2, seed=5, stages=stages,  # noqa: E731
                                 window=8, rank=1, world_size=2)
    full = list(make())
    for k in (0, 3, 9, len(full) - 1):   # crosses epochs of "a" and the stage switch
        it = make()
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.state_dict()))
        resumed = make()
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert len(rest) == len(full) - k
        assert all(torch.equal(x[key], y[key]) for x, y in zip(rest, full[k:]) for key in x)
    other = PackedBatches({"a": (a, 1), "c": (corpus, 1)}, 64, 2, seed=5, stages=stages)
    with pytest.raises(DataError, match="seq_len"):
        other.load_state_dict(state)


# ---------------------------------------------------------------- SFT

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "You count apples."},
                  {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"},
                  {"role": "assistant", "content": "3 + 4 = 7. The answer is 7."},
                  {"role": "user", "content": "And if he eats 2?"},
                  {"role": "assistant", "content": "7 - 2 = 5."}]},
    {"messages": [{"role": "user", "content": "언어 모델은 무엇을 예측하나요?"},
                  {"role": "assistant", "content": "다음 토큰을 예측합니다."}]},
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"},
                  {"role": "user", "content": "Thanks."}]},
]


def label_segments(labels):
    """Runs of consecutive trained positions."""
    idx = (labels != -100).nonzero().flatten().tolist()
    segs, cur = [], []
    for t in idx:
        if cur and t != cur[-1] + 1:
            segs.append(cur)
            cur = []
        cur.append(t)
    return segs + ([cur] if cur else [])


def test_sft_labels_are_exactly_the_assistant_turns_with_their_end_token(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", CONVERSATIONS)
    it = SFTBatches(path, tok, seq_len=200, batch_size=1, seed=0, progress=False)
    assert len(it) == 1   # all three conversations packed into one row
    b = next(it)
    ids, labels, doc_ids = b["input_ids"][0], b["labels"][0], b["doc_ids"][0]
    spans = [(s, e) for s, e in runs(doc_ids) if ids[s:e].any()]
    assert len(spans) == 3
    bos = tok.bos_token_id
    got = {}
    for s, e in spans:
        conv_ids = ids[s:e]
        assert conv_ids[0] == bos and (conv_ids == bos).sum() == 1   # one BOS: the template's, not doubled
        text = tok.decode(conv_ids.tolist(), skip_special_tokens=False)
        conv = next(c for c in CONVERSATIONS if c["messages"][0]["content"] in text)
        assert tok.apply_chat_template(conv["messages"], tokenize=True) == conv_ids.tolist()
        segments = label_segments(labels[s:e])
        # labels[t] is the target for position t: the trained tokens are ids[t + 1]
        trained = [tok.decode([int(labels[s + t]) for t in seg], skip_special_tokens=False) for seg in segments]
        for seg in segments:
            assert [int(labels[s + t]) for t in seg] == conv_ids[[t + 1 for t in seg]].tolist()
        got[conv["messages"][0]["content"]] = trained
        want = [m["content"] + "<|im_end|>" for m in conv["messages"] if m["role"] == "assistant"]
        assert trained == want
    assert len(got) == 3


def test_sft_resume_and_epochs(tok):
    records = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                             {"role": "assistant", "content": "Answer " * (i % 7 + 1)}]} for i in range(40)]
    make = lambda: SFTBatches(records, tok, 64, 2, seed=1, epochs=3, progress=False)  # noqa: E731
    full = list(make())
    assert len(full) == len(make()) and len(full) % 3 == 0
    it = make()
    for _ in range(len(full) // 2 + 1):
        next(it)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(it.state_dict())))
    rest = list(resumed)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(rest, full[len(full) // 2 + 1:]) for k in x)
    epoch = len(full) // 3
    assert not torch.equal(full[0]["input_ids"], full[epoch]["input_ids"])   # reshuffled each epoch


def test_sft_overlong_conversations_truncate_drop_or_refuse(tmp_path, tok):
    long = {"messages": [{"role": "user", "content": "Tell me a story."},
                         {"role": "assistant", "content": "apples and trains " * 40}]}
    prompt_only = {"messages": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "ok"}]}
    records = CONVERSATIONS + [long, prompt_only]
    it = SFTBatches(records, tok, seq_len=110, batch_size=2, progress=False)
    assert it.stats["truncated"] == 1 and it.stats["dropped"] == 1   # no assistant token left: dropped
    assert all(len(x) <= 110 for x, _ in it.examples)
    assert SFTBatches(records, tok, 110, 2, overflow="drop", progress=False).stats["dropped"] == 2
    with pytest.raises(DataError, match=r"records\[3\].*longer than seq_len 110"):
        SFTBatches(records, tok, 110, 2, overflow="error", progress=False)


# ---------------------------------------------------------------- DPO

def test_dpo_pairs_share_the_prompt_and_label_only_the_responses(tok):
    records = [
        {"prompt": "How many apples does Tom have?", "chosen": "Seven.", "rejected": "Three, I think."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
         "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]},
    ]
    it = DPOBatches(records, tok, seq_len=64, batch_size=2, seed=0, progress=False)
    assert len(it) == 1
    b = next(it)
    assert set(b) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    for r in range(2):
        text = tok.decode(b["chosen_input_ids"][r].tolist(), skip_special_tokens=False)
        rec = records[0] if "Tom" in text else records[1]
        prompt = rec["prompt"] if isinstance(rec["prompt"], list) else [{"role": "user", "content": rec["prompt"]}]
        prompt_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        P = len(prompt_ids)
        for side in ("chosen", "rejected"):
            ids, labels = b[f"{side}_input_ids"][r], b[f"{side}_labels"][r]
            reply = rec[side] if isinstance(rec[side], str) else rec[side][0]["content"]
            assert ids[:P].tolist() == prompt_ids
            assert (labels[:P - 1] == -100).all()
            trained = labels[labels != -100]
            assert tok.decode(trained.tolist(), skip_special_tokens=False) == reply + "<|im_end|>"
            n = P + len(trained)
            assert labels[P - 1:n - 1].tolist() == ids[P:n].tolist()   # labels[t] is the target for t
            assert (ids[n + 1:] == 0).all() and (labels[n - 1:] == -100).all()   # right padding


def test_dpo_resume_and_incomplete_last_batch(tok):
    records = [{"prompt": f"Q{i}", "chosen": "good " * (i % 3 + 1), "rejected": "bad"} for i in range(11)]
    make = lambda: DPOBatches(records, tok, 32, 3, seed=2, epochs=2, progress=False)  # noqa: E731
    full = list(make())
    assert len(full) == len(make()) == 2 * (11 // 3)
    it = make()
    next(it)
    next(it)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(it.state_dict())))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(list(resumed), full[2:]) for k in x)


# ---------------------------------------------------------------- bad input

def test_bad_corpus_files_name_the_file_and_line(tmp_path, demo_dir):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    write_jsonl(tmp_path / "nofield.jsonl", [{"text": "ok"}, {"content": "no text field"}])
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": "unterminated\n')
    (tmp_path / "notstr.jsonl").write_text('{"text": 5}\n')
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    (tmp_path / "bad.parquet").write_text("not parquet")
    (tmp_path / "doc.csv").write_text("a,b\n")
    cases = {"missing.jsonl": r"missing\.jsonl: file not found",
             "empty.jsonl": r"empty\.jsonl: no documents \(file is empty\)",
             "blank.txt": r"blank\.txt: no documents",
             "nofield.jsonl": r"nofield\.jsonl:2: record has no 'text' field",
             "broken.jsonl": r"broken\.jsonl:2: malformed JSON",
             "notstr.jsonl": r"notstr\.jsonl:1: 'text' must be a string",
             "nocol.parquet": r"nocol\.parquet: no column 'text'",
             "bad.parquet": r"bad\.parquet: not a readable parquet file",
             "doc.csv": r"doc\.csv: unsupported file type"}
    for name, pattern in cases.items():
        with pytest.raises(DataError, match=pattern):
            tokenize_corpus([tmp_path / name], demo_dir, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_bad_chat_records_name_the_file_and_line(tmp_path, tok):
    ok = CONVERSATIONS[1]
    cases = {
        "role": ([ok, {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}],
                 r"role\.jsonl:2: messages\[1\] has unknown role 'bot'"),
        "nomessages": ([ok, ok, {"conversation": []}], r"nomessages\.jsonl:3: record has no 'messages'"),
        "nocontent": ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}],
                      r"nocontent\.jsonl:1: messages\[0\] \(user\) has no 'content'"),
        "noassistant": ([{"messages": [{"role": "user", "content": "hi"}]}],
                        r"noassistant\.jsonl:1: no assistant message"),
    }
    for name, (records, pattern) in cases.items():
        with pytest.raises(DataError, match=pattern):
            SFTBatches(write_jsonl(tmp_path / f"{name}.jsonl", records), tok, 64, 1, progress=False)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        SFTBatches(tmp_path / "empty.jsonl", tok, 64, 1, progress=False)
    with pytest.raises(DataError, match=r"gone\.jsonl: file not found"):
        SFTBatches(tmp_path / "gone.jsonl", tok, 64, 1, progress=False)
    (tmp_path / "broken.jsonl").write_text(json.dumps(ok) + "\n{oops\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:2: malformed JSON"):
        SFTBatches(tmp_path / "broken.jsonl", tok, 64, 1, progress=False)
    dpo = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"},
                                                {"prompt": "p", "chosen": "c"}])
    with pytest.raises(DataError, match=r"dpo\.jsonl:2: record has no 'rejected' field"):
        DPOBatches(dpo, tok, 64, 1, progress=False)


def test_stage_and_source_mistakes_are_data_errors(corpus, tmp_path):
    with pytest.raises(DataError, match="unknown sources"):
        PackedBatches({"c": (corpus, 1)}, 32, 1, stages=[{"tokens": 10, "mixture": {"web": 1}}])
    with pytest.raises(DataError, match="positive integer token budget"):
        PackedBatches({"c": (corpus, 1)}, 32, 1, stages=[{"mixture": {"c": 1}}])
    other = TokenDataset.from_documents(tmp_path / "other", [[5, 6, 7]], vocab_size=1000, eos_token_id=2)
    with pytest.raises(DataError, match="different tokenizers"):
        PackedBatches({"c": (corpus, 1), "other": (other, 1)}, 32, 1)
    with pytest.raises(DataError, match="no index.json"):
        TokenDataset.open(tmp_path)
