"""benchmarks/gpu_acceptance.sh, the first thing to run on a CUDA machine: without a GPU it stops at once
with one line; its plumbing (precompute-ref and train, full and LoRA, packed and padded, the table) runs
on CPU with a tiny model (--cpu-smoke)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: the script would run in full")
def test_without_a_gpu_it_stops_with_one_line():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_acceptance.sh")], env=ENV, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "gpu_acceptance: no CUDA GPU here (torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU"]


def test_its_runs_and_table_on_cpu_with_a_tiny_model(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_acceptance.py"), "--cpu-smoke",
                           "--groups", "10", "--steps", "2", "--out", str(tmp_path)], env=ENV, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    runs = [(r[0], r[-7]) if r[0] == "precompute-ref" else (" ".join(r[:-7]), r[-7]) for r in rows
            if r and (r[0] in ("precompute-ref", "train"))]
    assert runs == [("precompute-ref", "off"), ("train full", "off"), ("train LoRA r=16", "off"),
                    ("precompute-ref", "on"), ("train full", "on"), ("train LoRA r=16", "on")]
    for r in rows:
        if r and r[0] == "train":
            assert float(r[-6]) < 1e-3  # max |ℓ| at step 0: the policy starts at the reference (fp32 on CPU)
    assert any(line.startswith("varlen kernel first-call check:") for line in done.stdout.splitlines())
