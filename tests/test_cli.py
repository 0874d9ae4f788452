"""The command line: each verb works on a real checkpoint, and bad input gives one line on
stderr and a non-zero exit code."""
import json
import subprocess
import sys

import pytest

from lmfoundry.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_the_continuation(demo_dir, capsys):
    code, out, err = run(capsys, "generate", demo_dir, "Tom has 3 apples", "--max-new-tokens", 8)
    assert code == 0, err
    assert out.startswith("Tom has 3 apples") and "8 tokens" in err


def test_generate_is_greedy_and_reproducible(demo_dir, capsys):
    outs = [run(capsys, "generate", demo_dir, "hello", "--max-new-tokens", 6, "--chat")[1] for _ in range(2)]
    assert outs[0] == outs[1]


def test_generate_prompt_over_context_is_one_clear_error(demo_dir, capsys):
    code, out, err = run(capsys, "generate", demo_dir, "apples " * 400, "--max-new-tokens", 4)
    assert code == 1
    assert err.startswith("lmfoundry: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_chat_reads_turns_from_stdin(demo_dir):
    proc = subprocess.run([sys.executable, "-m", "lmfoundry", "chat", str(demo_dir), "--max-new-tokens", "5",
                           "--temperature", "0"], input="hello\nand again\n/exit\n", capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("> ") >= 2


def test_convert_and_info(demo_dir, tmp_path, capsys):
    code, out, err = run(capsys, "convert", demo_dir, tmp_path / "m", "--to", "mistral", "--dtype", "bfloat16")
    assert code == 0, err
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    assert (tmp_path / "m" / "tokenizer.json").exists()
    code, out, _ = run(capsys, "info", tmp_path / "m")
    assert code == 0 and "MistralForCausalLM" in out and "139,584" in out


def test_convert_refusal_exits_nonzero_with_one_line(demo_dir, tmp_path, capsys):
    code, out, err = run(capsys, "convert", demo_dir, tmp_path / "m", "--to", "openelm")
    assert code == 1 and "untied" in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("argv,match", [
    (["generate", "/no/such/dir", "hi"], "not a checkpoint directory"),
    (["info", "no-such-preset-or-dir"], "not a checkpoint directory"),
    (["generate", "{demo}", "hi", "--temperature", "-1"], "temperature"),
])
def test_bad_input_is_one_line_on_stderr(demo_dir, capsys, argv, match):
    code, out, err = run(capsys, *[a.format(demo=demo_dir) for a in argv])
    assert code == 1 and match in err and err.count("\n") == 1


def test_presets_lists_published_sizes(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and "6,738,415,616" in out and "3,036,647,424" in out
