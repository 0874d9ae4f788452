"""The one settings table (flags, YAML keys, TrainConfig) and the trackers of --report-to."""
import dataclasses
import json
import struct

import pytest
import torch

from lmfoundry.cli import build_parser, main
from lmfoundry.config import ModelConfig
from lmfoundry.model import Transformer
from lmfoundry.train import ListBatches, NextToken, TrainConfig, TrainError, train
from lmfoundry.train.settings import SETTINGS, resolve, train_config

REQUIRED = ["--model", "m", "--data", "d.jsonl", "--out", "o"]


def from_flags(verb, *argv):
    args = build_parser().parse_args([verb, *REQUIRED, *map(str, argv)])
    flags = {k: v for k, v in vars(args).items() if k not in ("fn", "verb", "verb_name", "debug", "config")}
    return resolve(verb, flags, args.config)


def from_yaml(tmp_path, verb, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text("model: m\ndata: d.jsonl\nout: o\n" + text)
    return resolve(verb, {}, str(path))


def test_a_flag_and_its_yaml_key_give_the_same_settings(tmp_path):
    cases = [("--lr", "0.001", "lr: 1e-3"), ("--betas", "0.8,0.99", "betas: [0.8, 0.99]"),
             ("--grad-accum", "4", "grad-accum: 4"), ("--schedule", "wsd", "schedule: wsd"),
             ("--report-to", "tensorboard,wandb", "report_to: tensorboard,wandb"),
             ("--seq-len", "64", "seq_len: 64"), ("--fsdp", None, "fsdp: true"),
             ("--no-progress", None, "progress: false"), ("--eval-data", "e.jsonl", "eval-data: [e.jsonl]")]
    for flag, value, yaml_line in cases:
        a = from_flags("sft", flag, *([value] if value is not None else []))
        b = from_yaml(tmp_path, "sft", yaml_line + "\n")
        assert a == b, flag
        assert dataclasses.asdict(train_config(a)) == dataclasses.asdict(train_config(b)), flag
    opts = from_flags("sft", "--betas", "0.8,0.99", "--report-to", "none")
    cfg = train_config(opts)
    assert cfg.betas == (0.8, 0.99) and cfg.report_to == () and opts["_given"] == ["betas", "data", "model", "out",
                                                                                   "report_to"]


def test_each_command_gets_its_own_defaults_and_config_files_lose_to_flags(tmp_path):
    want = {"pretrain": (3e-4, 0.1, 512), "sft": (2e-5, 0.0, 1024), "dpo": (5e-7, 0.0, 1024)}
    for verb, (lr, wd, seq_len) in want.items():
        opts = from_flags(verb)
        assert (opts["lr"], opts["weight_decay"], opts["seq_len"]) == (lr, wd, seq_len)
        assert train_config(opts).lr == lr
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: d.jsonl\nout: o\nlr: 0.5\nsteps: 7\n")
    args = build_parser().parse_args(["dpo", "--config", str(path), "--lr", "0.25"])
    opts = resolve("dpo", {k: v for k, v in vars(args).items() if k in SETTINGS}, args.config)
    assert opts["lr"] == 0.25 and opts["steps"] == 7 and opts["beta"] == 0.1
    assert TrainConfig().lr == 3e-4 and TrainConfig().weight_decay == 0.1     # the library default is pretrain's


@pytest.mark.parametrize("yaml_text, message", [
    ("seq-lenn: 3\nlearning_rate: 1\n", "c.yaml: unknown setting(s) for sft: seq-lenn, learning_rate"),
    ("beta: 0.2\n", "c.yaml: unknown setting(s) for sft: beta"),               # a DPO setting
    ("lr: -1\n", "c.yaml: lr must be > 0, got -1"),
    ("seq-len: abc\n", "c.yaml: seq-len must be an integer, got 'abc'"),
    ("grad_accum: 2.5\n", "c.yaml: grad_accum must be an integer, got 2.5"),
    ("betas: 0.9\n", "c.yaml: betas must be two numbers like 0.9,0.95, got 0.9"),
    ("report-to: tensorbored\n", ("c.yaml: report-to must name trackers from tensorboard, wandb (or none), "
                                  "got 'tensorbored'")),
    ("schedule: linear\n", "c.yaml: schedule must be one of cosine, wsd, wsd-sqrt, constant, got 'linear'"),
    ("seq-len: 8\nseq_len: 9\n", "c.yaml: seq-len and seq_len are the same setting"),
])
def test_bad_yaml_settings_are_named_as_written(tmp_path, yaml_text, message):
    with pytest.raises(TrainError) as e:
        from_yaml(tmp_path, "sft", yaml_text)
    assert str(e.value) == f"{tmp_path / 'c.yaml'}: {message.removeprefix('c.yaml: ')}"


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr must be > 0, got -1"),
    (["--steps", "ten"], "--steps must be an integer, got ten"),
    (["--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5), got 0.5"),
    (["--loss", "hinge"], "--loss must be one of sigmoid, ipo, got hinge"),
    (["--betas", "0.9,1.5"], "--betas must each be in [0, 1), got 0.9,1.5"),
])
def test_bad_flags_are_one_line_naming_the_flag(capsys, argv, message):
    assert main(["dpo", *REQUIRED, *argv]) == 1
    assert capsys.readouterr().err == f"lmfoundry: error: {message}\n"


def test_train_config_checks_fields_by_name():
    with pytest.raises(TrainError, match=r"^lr must be > 0, got -1$"):
        TrainConfig(lr=-1)
    with pytest.raises(TrainError, match=r"^warmup must be >= 0, got -2$"):
        TrainConfig(warmup=-2)
    assert TrainConfig(tensorboard=True).report_to == ("tensorboard",)       # the old setting, an alias
    assert TrainConfig(report_to="wandb,none").report_to == ("wandb",)


# ---------------------------------------------------------------- trackers

def tiny_run(out, **kw):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(20, 40, (2, 17), generator=g) for _ in range(3)]
    batches = [{"input_ids": x[:, :-1], "labels": x[:, 1:]} for x in ids]
    cfg = TrainConfig(steps=4, lr=1e-3, eval_every=2, progress=False, **kw)
    train(model, ListBatches(batches), NextToken(), cfg, out, eval_batches=batches[:1])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_report_to_tensorboard_writes_the_metrics_series(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    rows = tiny_run(tmp_path / "out", report_to="tensorboard")
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "eval_loss"):
        series = [(e.step, e.value) for e in events.Scalars(key)]
        want = [(r["step"], r[key]) for r in rows if key in r]
        assert [s for s, _ in series] == [s for s, _ in want], key
        assert [v for _, v in series] == pytest.approx([v for _, v in want], rel=1e-6), key   # float32 in events
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"lr": 0.001' in config and '"objective": "next_token"' in config


def read_wandb_history(run_file):
    """Records of a W&B offline run file: a 7-byte header, then LevelDB-log chunks
    (crc32, length, type; 32 KiB blocks) holding wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, chunk, records = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768                       # block trailer
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                                   # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    history = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "run"
              for i in r.run.config.update}
    return history, config


def test_report_to_wandb_logs_offline_under_out(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")                  # no account, no network: offline by default
    rows = tiny_run(tmp_path / "out", report_to="wandb")
    (run_file,) = (tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = read_wandb_history(run_file)
    assert [h["_step"] for h in history] == [r["step"] for r in rows]
    for h, r in zip(history, rows):
        assert {k: h[k] for k in r if k != "step"} == pytest.approx({k: v for k, v in r.items() if k != "step"})
    assert config["lr"] == 0.001 and config["steps"] == 4 and config["objective"] == "next_token"


def test_a_missing_tracker_package_is_one_clear_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    with pytest.raises(TrainError, match=r"--report-to wandb needs the wandb package"):
        tiny_run(tmp_path / "out", report_to="wandb")
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "config.json").exists()
