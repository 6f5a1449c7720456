"""benchmarks/gpu_check.py runs end to end in its --dry-run mode (tiny configs on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (SHARED / "data" / "tokenizers" / "r1-distill-qwen").exists(), reason="no real tokenizer")
@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MECHTHINK_PROGRESS": "0"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--json", str(out),
         "--tokenizer", str(SHARED / "data" / "tokenizers" / "r1-distill-qwen"),
         "--only", "hf_sdpa,hooked_forward,hooked_fast,lens_dla,atp,qkfix,eap,exact_per_node,fork_probes16,binned_attention,"
                   "mi_trajectory,gen_greedy,hfgen_greedy,gen_steered"],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"r1-distill-qwen-1.5b", "r1-distill-llama-8b"}
    for rows in report["models"].values():
        assert len(rows) == 2 * 14
        assert all(r["tokens_per_s"] > 0 for r in rows if r["technique"].startswith(("gen_", "hfgen_")))
        assert not [r for r in rows if r["error"]], [r for r in rows if r["error"]]
