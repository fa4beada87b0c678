"""`gvpo-offline plot WORKDIR`: the PNGs exist and draw exactly the logged numbers."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

pytest.importorskip("matplotlib")

from gvpo_offline.stages import plot


def _records(n):
    return [{"step": s, "epoch": 0, "loss": 3.0 / s, "log_ratio": -0.1 * s, "log_ratio_per_token": -0.01 * s,
             "implicit_reward_variance": 0.02 * s, "implicit_reward_covariance": 0.05 * s, "reward_variance": 2.0,
             "grad_norm": 1.0, "lr": 1e-4, "tokens": 100, "seconds": 0.1} for s in range(1, n + 1)]


REPORT = {
    "model": {"pairwise_accuracy": 0.7, "spearman": 0.4, "top1_agreement": 0.6, "gvpo_loss": 1.5},
    "reference": {"pairwise_accuracy": 0.5, "spearman": 0.0, "top1_agreement": 0.3, "gvpo_loss": 2.0},
    "intervals": {"model": {"pairwise_accuracy": [0.6, 0.8], "spearman": [0.2, 0.55], "top1_agreement": None,
                            "gvpo_loss": [1.2, 1.9]},
                  "delta": {"pairwise_accuracy": [0.05, 0.35]}},
    "counts": {"groups": 33},
    "generation": {"prompts": 3, "samples_per_prompt": 2, "model_mean_reward": 1.0, "reference_mean_reward": 0.5,
                   "difference_interval": [0.1, 0.9], "model_rewards": [[1, 2], [0, 1], [1, 1]],
                   "reference_rewards": [[0, 1], [0, 0], [1, 1]]},
}


@pytest.fixture
def figures(monkeypatch):
    """The figures plot.py saves, by file name (saved for real as well)."""
    saved = {}
    real_save = plot._save

    def keep(fig, path, plt):
        saved[path.name] = fig
        return real_save(fig, path, plt)

    monkeypatch.setattr(plot, "_save", keep)
    return saved


def test_plot_draws_the_logged_numbers(tmp_path, figures, run_cli):
    import matplotlib.image

    from gvpo_offline.runtime.workdir import claim

    claim(tmp_path)  # WORKDIR/plots is written only into a gvpo-offline workdir
    records = _records(5)
    write_jsonl(tmp_path / "metrics.jsonl", records)
    (tmp_path / "eval.json").write_text(json.dumps(REPORT))
    result = run_cli("plot", tmp_path)
    assert result.code == 0, result.err
    names = ["loss.png", "drift.png", "eval.png", "rewards.png"]
    for name in names:
        image = matplotlib.image.imread(tmp_path / "plots" / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert sorted(figures) == sorted(names)

    loss_ax, terms_ax = figures["loss.png"].axes
    assert list(loss_ax.lines[0].get_ydata()) == [r["loss"] for r in records]
    drawn = {line.get_label(): list(line.get_ydata()) for line in terms_ax.lines}
    assert drawn["2·Cov(β·ℓ, R)"] == [2 * r["implicit_reward_covariance"] for r in records]
    assert drawn["Var(β·ℓ)"] == [r["implicit_reward_variance"] for r in records]
    assert list(figures["drift.png"].axes[0].lines[0].get_ydata()) == [r["log_ratio_per_token"] for r in records]

    panels = figures["eval.png"].axes
    for ax, (key, _) in zip(panels, plot.EVAL_METRICS):
        assert [bar.get_height() for bar in ax.patches] == [REPORT["reference"][key], REPORT["model"][key]]
    assert "Δ 95% CI [0.05, 0.35]" in panels[0].get_title()
    drawn_y = sorted(float(y) for line in panels[0].lines for y in line.get_ydata())  # error bar: centre, caps
    assert (drawn_y[0], drawn_y[-1]) == pytest.approx((0.6, 0.8))
    hist = figures["rewards.png"].axes[0]
    heights = [bar.get_height() for bar in hist.patches]
    assert sum(heights) == 12  # 3 prompts × 2 samples, for each model


def test_plot_long_run_smooths_and_needs_metrics(tmp_path, figures, run_cli):
    records = _records(60)
    write_jsonl(tmp_path / "metrics.jsonl", records)
    result = run_cli("plot", tmp_path, "--out-dir", tmp_path / "figs")
    assert result.code == 0, result.err
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["drift.png", "loss.png"]  # no eval yet
    raw, smooth = figures["loss.png"].axes[0].lines
    assert list(raw.get_ydata()) == [r["loss"] for r in records]
    window = 3  # 60 steps // 20
    assert smooth.get_ydata()[-1] == pytest.approx(sum(r["loss"] for r in records[-window:]) / window)

    result = run_cli("plot", tmp_path / "empty")
    assert result.code == 2 and "metrics.jsonl: no such file" in result.err
    result = run_cli("plot", tmp_path, "--eval", tmp_path / "nope.json")
    assert result.code == 2 and "nope.json: no such file" in result.err
