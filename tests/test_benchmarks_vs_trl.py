"""benchmarks/vs_trl.py: the pairs DPO gets, the token counts, and a smoke run of --small when TRL is installed."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def load_benchmark():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("vs_trl", ROOT / "benchmarks" / "vs_trl.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_dpo_pairs_all_and_best_vs_worst():
    bench = load_benchmark()
    groups = [{"prompt": "p", "responses": ["a", "b", "c", "d"], "rewards": [1.0, 3.0, 0.0, 1.0]}]
    all_pairs = {(p["chosen"], p["rejected"]) for p in bench.dpo_pairs(groups, "all")}
    # every pair with different rewards, higher reward chosen: a-b, b-c, b-d, a-c, d-c (a-d tie left out)
    assert all_pairs == {("b", "a"), ("b", "c"), ("b", "d"), ("a", "c"), ("d", "c")}
    assert [(p["chosen"], p["rejected"]) for p in bench.dpo_pairs(groups, "best-vs-worst")] == [("b", "c")]


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed (pip install -e '.[bench]')")
def test_small_setting_runs_and_reports_every_row(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--small", "--pairs", "all",
                           "--json", str(out)],
                          env=ENV, cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    groups, k = 2, 4  # the --small setting
    # --pairs all: TRL's all-pairs run only (best-vs-worst left out)
    assert [r["tool"] for r in rows] == ["gvpo-offline", f"TRL DPO, all ({groups * k * (k - 1) // 2})"]
    assert rows[0]["steps"] == groups  # one group per step, one epoch
    for r in rows:
        assert r["epoch"] == pytest.approx(r["precompute"] + r["train"]) and r["epoch"] > 0
        assert r["tokens_per_cpu_s"] == pytest.approx(r["tokens"] / r["epoch"])
        # the rise is the peak above the VmRSS after the imports, which hold torch + transformers (> 100 MB)
        assert r["base_mb"] > 100 and 0 < r["rise_mb"] < r["peak_mb"]
        assert r["rise_mb"] == pytest.approx(r["peak_mb"] - r["base_mb"])
    # TRL's all-pairs input repeats each prompt twice per pair: more tokens than the groups hold once
    assert rows[1]["tokens"] > rows[0]["tokens"]
    assert f"| 4 | TRL DPO, all ({groups * k * (k - 1) // 2}) |" in done.stdout and "best-vs-worst (" not in done.stdout
    assert "RSS rise above the imports" in done.stdout


def test_table_and_verdict_read_the_ratios_off_the_rows():
    bench = load_benchmark()
    row = lambda tool, tokens, epoch, mb, base: {"k": 4, "tool": tool, "tokens": tokens, "epoch": epoch,
                                               "tokens_per_cpu_s": tokens / epoch, "precompute": epoch / 4,
                                               "train": epoch * 3 / 4, "steps": 8, "peak_mb": mb, "base_mb": base,
                                               "rise_mb": mb - base}
    rows = [row("gvpo-offline", 1000, 10.0, 500, 300), row("TRL DPO, all (48)", 6000, 300.0, 2000, 400),
            row("TRL DPO, best-vs-worst (8)", 1200, 18.0, 1000, 500)]
    # per token: (1000/10) / (6000/300) = 5; epoch 300/10 = 30; RSS 500/2000 = 0.25 -> all met; rise 200/1600
    # best-vs-worst: (1000/10) / (1200/18) = 1.5 (not met); epoch 1.8 (not met); RSS 0.5 (not met); rise 200/500
    text = bench.table(rows)
    assert "| 500 | 200 (300) | — | — | — | — |" in text  # ours: peak, rise (base), no ratios
    assert "| 2,000 | 1,600 (400) | **5.00×** | **30.00×** | **0.25×** | **0.12×** |" in text
    assert "**1.50×** | **1.80×** | **0.50×** | **0.40×** |" in text
    all_pairs, best_worst = bench.verdict(rows)
    assert "per token 5.00× (met" in all_pairs and "peak RSS 0.25× (met" in all_pairs and "one-epoch" not in all_pairs
    assert "RSS rise above the imports 0.12×" in all_pairs
    assert "1.50× (NOT met" in best_worst and "one-epoch time 1.80× (NOT met" in best_worst

    # rows saved before the rise was measured (--from-json of an older run): the rise columns read —
    old = [{k: v for k, v in r.items() if k not in ("base_mb", "rise_mb")} for r in rows]
    assert "| 2,000 | — | **5.00×** | **30.00×** | **0.25×** | — |" in bench.table(old)
    assert "RSS rise" not in bench.verdict(old)[0]


def test_the_verdict_gives_each_tools_flop_rate_and_the_models_matmul_rate(tmp_path):
    bench = load_benchmark()
    assert bench.epoch_flops_per_token(1000, 10, 50) == 4 * 2 * (1000 - 500)  # the input embedding is a lookup
    flops = {"flops_per_token": 1e9, "matmul_gflops": 40.0}  # 1 GFLOP per token; the machine: 40 GFLOP per CPU-s
    row = lambda tool, tokens, epoch: {"k": 8, "tool": tool, "tokens": tokens, "epoch": epoch, "peak_mb": 1.0,  # noqa: E731
                                      "tokens_per_cpu_s": tokens / epoch, **flops}
    ours, trl = row("gvpo-offline", 300, 10.0), row("TRL DPO, all (4)", 100, 10.0)  # 30 and 10 GFLOP per CPU-s
    (line,) = bench.verdict([ours, trl])
    assert "per token 3.00×" in line
    assert ("GFLOP per CPU-s: ours 30.0, TRL 10.0, the model's matmuls alone 40.0: per token ours / TRL would be "
            "4.00× with every FLOP at that rate (ours now at 75% of it)") in line
    (old,) = bench.verdict([{**ours, "flops_per_token": None}, trl])  # rows saved without the FLOPs
    assert "GFLOP" not in old
    config = {"hidden_size": 64, "intermediate_size": 128, "vocab_size": 500, "num_attention_heads": 2,
              "num_key_value_heads": 1, "num_hidden_layers": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert 0.1 < bench.matmul_gflops(tmp_path, threads=1, rows=64) < 10_000  # GFLOP per CPU-second, measured


def test_readme_gets_the_table_between_its_markers(tmp_path):
    bench = load_benchmark()
    rows = [{"k": 4, "tool": "gvpo-offline", "tokens": 600, "tokens_per_cpu_s": 500.0, "precompute": 0.3, "train": 0.9,
             "steps": 2, "epoch": 1.2, "peak_mb": 900.0, "base_mb": 400.0, "rise_mb": 500.0},
            {"k": 4, "tool": "TRL DPO, best-vs-worst (2)", "tokens": 700, "tokens_per_cpu_s": 100.0, "precompute": 2.0,
             "train": 5.0, "steps": 2, "epoch": 7.0, "peak_mb": 2000.0, "base_mb": 450.0, "rise_mb": 1550.0}]
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{bench.README_BEGIN}\nold table\n{bench.README_END}\nafter\n")
    bench.write_readme(readme, bench.report("header", rows))
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n") and text.endswith(f"{bench.README_END}\nafter\n")
    assert "old table" not in text and "| 4 | TRL DPO, best-vs-worst (2) |" in text
    assert "per token 5.00× (met: ≥ 4×)" in text and "one-epoch time 5.83× (met: ≥ 2×)" in text
    bench.write_readme(readme, bench.report("header", rows))  # again: the same file, nothing doubled
    assert readme.read_text() == text
    other = tmp_path / "other.md"
    other.write_text("no markers")
    with pytest.raises(SystemExit, match="no <!-- benchmarks/vs_trl.py: begin -->"):
        bench.write_readme(other, "x")
    assert other.read_text() == "no markers"
    assert bench.README_BEGIN in (ROOT / "README.md").read_text()  # the project's README has its place
