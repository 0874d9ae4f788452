"""benchmarks/gpu.py runs unedited on CPU with the tiny preset (so that its first GPU run needs no
edits) and prints one JSON object with every section: training (plain, compiled, FSDP2 on a
1-process group, transformers) with tokens/s, peak memory and the FLOP formula; prefill and
decode at batch 1 and 32 for ours (eager and compiled) and transformers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_with_the_tiny_preset_and_prints_one_json_object():
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--preset", "tiny", "--steps", "3", "--warmup", "1",
           "--batch", "2", "--seq-len", "32", "--prompt-len", "16", "--new-tokens", "4", "--peak-tflops", "1",
           "--budget", "600"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["flop_formula"].startswith("6 * matrix_weights") and result["flops_per_token"] > 0
    assert result["skipped"] == []
    for mode in ("plain", "compiled", "fsdp2", "transformers"):
        run = result["training"][mode]
        assert "error" not in run, (mode, run)
        assert run["tokens_per_s"] > 0 and run["peak_memory_gib"] > 0 and 0 < run["mfu"] < 1
        assert len(run["losses"]) == 3
    # same weights, same batches, same bf16 autocast: our three runs start from the same loss
    first = [result["training"][m]["losses"][0] for m in ("plain", "compiled", "fsdp2")]
    assert max(first) - min(first) < 0.05
    for batch in ("batch_1", "batch_32"):
        inf = result["inference"][batch]
        assert inf["lmfoundry"]["prefill_tok_s"] > 0 and inf["lmfoundry"]["decode_tok_s"] > 0
        assert inf["lmfoundry_compiled"]["decode_tok_s"] > 0 and not inf["lmfoundry_compiled"]["fell_back"]
        assert inf["transformers"]["decode_tok_s"] > 0 and inf["ratio_decode_tok_s"] > 0
