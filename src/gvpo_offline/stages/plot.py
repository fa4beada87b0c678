"""`gvpo-offline plot WORKDIR`: PNG figures of a run (matplotlib, optional extra ``[plot]``, Agg backend).

Reads WORKDIR/metrics.jsonl (train) and, when present, the eval JSON (``eval --json``; default
WORKDIR/eval.json) and writes, atomically, into ``out_dir`` (default WORKDIR/plots/, only when WORKDIR
carries the workdir marker: the tool never writes into a folder of the user's, see workdir.py):

    loss.png        the GVPO loss per step and its eq. 16–17 parts: implicit-reward variance,
                    2 × implicit-reward/reward covariance, reward variance (loss = var − 2·cov + var_R);
                    for a `train --loss` other than gvpo, that objective's loss, and GVPO's beside its parts
    drift.png       mean ℓ = log πθ/πref per response token, per step (how far the policy moved)
    eval.png        held-out metrics, model vs reference, the model's 95% bootstrap interval as error bar
                    and the Δ interval in each title                                     (eval JSON only)
    rewards.png     the rewards of generated samples, model vs reference        (eval JSON with generation)

Several named runs (``plot WORKDIR --run A --run B``, train --run) are overlaid into WORKDIR/plots/:

    runs_loss.png   each run's loss per step (its own objective's), one line per run
    runs_drift.png  each run's mean ℓ per token per step

One ``--run NAME`` plots that run alone, from and into WORKDIR/runs/NAME/.

Raw per-step values are drawn thin, with a moving average (window ≈ steps/20) on top when there are
more than 20 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

from gvpo_offline.runtime.errors import DataError, GvpoError
from gvpo_offline.runtime.files import atomic_path

EVAL_METRICS = (  # eval JSON key, panel title
    ("pairwise_accuracy", "pairwise accuracy"),
    ("spearman", "Spearman ρ (implicit vs true reward)"),
    ("top1_agreement", "top-1 agreement"),
    ("gvpo_loss", "GVPO loss (eq. 16)"),
)
TERMS = (  # metrics.jsonl key, scale, label
    ("implicit_reward_variance", 1.0, "Var(β·ℓ)"),
    ("implicit_reward_covariance", 2.0, "2·Cov(β·ℓ, R)"),
    ("reward_variance", 1.0, "Var(R)"),
)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise GvpoError("plot needs matplotlib: pip install 'gvpo-offline[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl, checked for what the plots draw (:func:`plotted_keys`).

    A last line without its newline that does not parse is a write cut by a crash and is skipped; any
    other line that is not a JSON object with those keys as numbers is a DataError naming the line.
    """
    if not path.is_file():
        raise GvpoError(f"{path}: no such file; run `gvpo-offline train` first")
    lines = path.read_bytes().split(b"\n")  # the last item is b"" when the file ends with a newline
    records: list[tuple[int, dict]] = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            if number == len(lines):  # no newline after it: a line cut by a crash
                continue
            detail = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else "not JSON"
            raise DataError(str(path), f"{detail}: not a line written by `gvpo-offline train`", line=number) from None
        if not isinstance(record, dict):
            raise DataError(str(path), f"expected a JSON object, got {_kind(record)}", line=number)
        records.append((number, record))
    if not records:
        raise GvpoError(f"{path}: no training steps logged")
    needed = plotted_keys(records[0][1])
    for number, record in records:
        for key in needed:
            if key not in record:
                raise DataError(str(path), "missing (every line needs the fields of the first)", line=number, field=key)
            value = record[key]
            if key == "step" and not _is_int(value):
                raise DataError(str(path), f"expected an integer, got {_show(value)}", line=number, field=key)
            if not _is_number(value):
                raise DataError(str(path), f"expected a number, got {_show(value)}", line=number, field=key)
    return [record for _, record in records]


def plotted_keys(first: dict) -> tuple[str, ...]:
    """The metrics.jsonl fields the plots draw, decided by the first record (older runs lack some)."""
    keys = ["step", "loss", "log_ratio_per_token" if "log_ratio_per_token" in first else "log_ratio"]
    if all(key in first for key, _, _ in TERMS):
        keys += [key for key, _, _ in TERMS]
        if first.get("objective", "gvpo") != "gvpo":
            keys.append("gvpo_loss")
    return tuple(keys)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A JSON number (NaN and infinities included: matplotlib draws gaps), not a bool or a numeric string."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_report(report, path: Path) -> dict:
    """The eval JSON (``eval --json``) as the plots read it; a DataError naming the first field that has
    another shape (metrics: numbers or null; intervals: [low, high] or null; generation rewards: lists of
    lists of numbers)."""
    def fail(field: str, expected: str, value) -> DataError:
        return DataError(str(path), f"expected {expected}, got {_show(value)}", field=field)

    def section(parent: dict, key: str, prefix: str = "") -> dict:
        value = parent.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise fail(prefix + key, "an object", value)
        return value

    def interval(value, field: str) -> None:
        if value is not None and not (isinstance(value, list) and len(value) == 2 and all(map(_is_number, value))):
            raise fail(field, "[low, high] numbers or null", value)

    if not isinstance(report, dict) or "model" not in report:
        raise GvpoError(f"{path}: not an eval JSON (written by `gvpo-offline eval --json`)")
    for name in ("model", "reference"):
        values = section(report, name)
        for key, _ in EVAL_METRICS:
            if values.get(key) is not None and not _is_number(values[key]):
                raise fail(f"{name}.{key}", "a number or null", values[key])
    intervals = section(report, "intervals")
    for name in ("model", "delta"):
        for key, _ in EVAL_METRICS:
            interval(section(intervals, name, "intervals.").get(key), f"intervals.{name}.{key}")
    section(report, "counts")
    gen = section(report, "generation")
    if gen.get("model_rewards") is not None and gen.get("reference_rewards") is not None:
        for key in ("model_rewards", "reference_rewards"):
            rows = gen[key]
            if not (isinstance(rows, list) and rows and all(isinstance(r, list) and all(map(_is_number, r)) for r in rows)
                    and any(rows)):
                raise fail(f"generation.{key}", "a non-empty list of lists of numbers", rows)
        for key in ("model_mean_reward", "reference_mean_reward"):
            if not _is_number(gen.get(key)):
                raise fail(f"generation.{key}", "a number", gen.get(key))
        interval(gen.get("difference_interval"), "generation.difference_interval")
    return report


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _series(ax, steps, values, label, color=None):
    """Raw values thin; their moving average on top when there are many steps."""
    if len(values) > 20:
        ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
        ax.plot(steps, _moving_average(values, max(2, len(values) // 20)), color=color, label=label, linewidth=1.6)
    else:
        ax.plot(steps, values, color=color, label=label, marker="o", markersize=3)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def plot_training(records: list[dict], out_dir: Path, plt) -> list[Path]:
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_terms) = plt.subplots(1, 2, figsize=(10, 3.8))
    objective = records[0].get("objective", "gvpo")  # metrics written before --loss existed: GVPO
    _series(ax_loss, steps, [r["loss"] for r in records], "loss", "C0")
    title = "GVPO loss per step" if objective == "gvpo" else f"--loss {objective}: loss per step"
    ax_loss.set(title=title, xlabel="optimizer step", ylabel="loss")
    if all(key in records[0] for key, _, _ in TERMS):
        terms = TERMS if objective == "gvpo" else (("gvpo_loss", 1.0, "GVPO loss"), *TERMS)
        for n, (key, scale, label) in enumerate(terms):
            _series(ax_terms, steps, [scale * r[key] for r in records], label, f"C{n + 1}")
        ax_terms.set(title="eq. 17 terms: GVPO loss = Var(β·ℓ) − 2·Cov + Var(R)", xlabel="optimizer step")
        ax_terms.legend(fontsize=8)
    else:
        ax_terms.text(0.5, 0.5, "this run's metrics.jsonl has no\nimplicit-reward variance/covariance",
                      ha="center", va="center", transform=ax_terms.transAxes)
        ax_terms.set_axis_off()
    written = [_save(fig, out_dir / "loss.png", plt)]

    fig, ax = plt.subplots(figsize=(6, 3.8))
    if "log_ratio_per_token" in records[0]:
        _series(ax, steps, [r["log_ratio_per_token"] for r in records], "mean ℓ per token", "C4")
        ax.set(title="drift: mean ℓ = log πθ/πref per response token", ylabel="ℓ per token")
    else:  # metrics of an older run: per sequence only
        _series(ax, steps, [r["log_ratio"] for r in records], "mean ℓ per response", "C4")
        ax.set(title="drift: mean ℓ = log πθ/πref per response", ylabel="ℓ per response")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("optimizer step")
    written.append(_save(fig, out_dir / "drift.png", plt))
    return written


def plot_eval(report: dict, out_dir: Path, plt) -> list[Path]:
    """eval.png (held-out metrics with intervals) and, with a generation eval, rewards.png."""
    model, ref = report.get("model") or {}, report.get("reference") or {}
    intervals = report.get("intervals") or {}
    fig, axes = plt.subplots(1, len(EVAL_METRICS), figsize=(3.2 * len(EVAL_METRICS), 3.6))
    for ax, (key, title) in zip(axes, EVAL_METRICS):
        m, r = model.get(key), ref.get(key)
        ax.bar([0, 1], [r if r is not None else 0.0, m if m is not None else 0.0], color=["C7", "C0"], width=0.6)
        ax.set_xticks([0, 1], ["reference", "model"])
        ci = (intervals.get("model") or {}).get(key)
        if ci is not None and m is not None:
            ax.errorbar([1], [m], yerr=[[m - ci[0]], [ci[1] - m]], color="black", capsize=6, linewidth=1.2)
        delta = (intervals.get("delta") or {}).get(key)
        note = f"\nΔ 95% CI [{delta[0]:.3g}, {delta[1]:.3g}]" if delta else ""
        ax.set_title(f"{title}{note}", fontsize=9)
    counts = report.get("counts") or {}
    fig.suptitle(f"held-out groups: {counts.get('groups', '?')} (error bar: model's 95% bootstrap interval)",
                 fontsize=10)
    written = [_save(fig, out_dir / "eval.png", plt)]

    gen = report.get("generation") or {}
    if gen.get("model_rewards") is not None and gen.get("reference_rewards") is not None:
        flat = lambda rows: [x for row in rows for x in row]  # noqa: E731
        m_rewards, r_rewards = flat(gen["model_rewards"]), flat(gen["reference_rewards"])
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        lo, hi = min(m_rewards + r_rewards), max(m_rewards + r_rewards)
        bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
        ax.hist(r_rewards, bins=bins, alpha=0.55, color="C7",
                label=f"reference (mean {gen['reference_mean_reward']:.3g})")
        ax.hist(m_rewards, bins=bins, alpha=0.55, color="C0", label=f"model (mean {gen['model_mean_reward']:.3g})")
        d = gen.get("difference_interval")
        ci = f", Δ 95% CI [{d[0]:.3g}, {d[1]:.3g}]" if d else ""
        ax.set(title=f"rewards of generated samples: {gen.get('prompts', '?')} prompts × {gen.get('samples_per_prompt', '?')}{ci}",
               xlabel="reward", ylabel="samples")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / "rewards.png", plt))
    return written


def plot_runs(workdir: str | Path, runs: list[str], out_dir: str | Path | None = None) -> list[Path]:
    """Overlay the named runs' loss and drift (WORKDIR/runs/NAME/metrics.jsonl) into runs_loss.png and
    runs_drift.png in ``out_dir`` (default WORKDIR/plots/)."""
    workdir = Path(workdir)
    records = {run: read_metrics(workdir / "runs" / run / "metrics.jsonl") for run in runs}
    if out_dir is None:
        _require_workdir(workdir)
    out_dir = Path(out_dir) if out_dir is not None else workdir / "plots"
    plt = _pyplot()
    written = []
    for name, key, fallback, title in (
        ("runs_loss.png", "loss", "loss", "loss per step (each run's --loss)"),
        ("runs_drift.png", "log_ratio_per_token", "log_ratio", "drift: mean ℓ = log πθ/πref per token"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4))
        for n, (run, recs) in enumerate(records.items()):
            field = key if key in recs[0] else fallback
            _series(ax, [r["step"] for r in recs], [r[field] for r in recs], run, f"C{n % 10}")
        ax.set(title=title, xlabel="optimizer step")
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / name, plt))
    return written


def _require_workdir(workdir: Path) -> None:
    """WORKDIR/plots is written only into a gvpo-offline workdir (it has the marker; a named run's
    folder WORKDIR/runs/NAME counts as its workdir's), else GvpoError."""
    from gvpo_offline.runtime import workdir as workdirs

    if workdir.parent.name == "runs" and workdirs.is_marked(workdir.parent.parent):
        workdir = workdir.parent.parent
    if not workdirs.is_marked(workdir):
        raise GvpoError(
            f"{workdir}: not a gvpo-offline workdir (no {workdirs.MARKER} marker); the tool never writes into a "
            "folder of yours: pass --output-dir for the plots"
        )
    workdirs.check_layout(workdir)
    workdirs.refuse_links(workdir, ("plots",))


def plot_run(workdir: str | Path, eval_path: str | Path | None = None, out_dir: str | Path | None = None) -> list[Path]:
    """Write the run's PNGs (see the module docstring); returns their paths."""
    workdir = Path(workdir)
    into_workdir = out_dir is None  # WORKDIR/plots: only into a workdir of ours; --out-dir is the user's choice
    out_dir = Path(out_dir) if out_dir is not None else workdir / "plots"
    records = read_metrics(workdir / "metrics.jsonl")
    report = None
    if eval_path is not None or (workdir / "eval.json").is_file():
        path = Path(eval_path) if eval_path is not None else workdir / "eval.json"
        if not path.is_file():
            raise GvpoError(f"--eval {path}: no such file")
        try:
            report = json.loads(path.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deep
            reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else f"{type(exc).__name__}: {exc}"
            raise GvpoError(f"{path}: not an eval JSON ({reason})") from None
        report = check_report(report, path)
    if into_workdir:
        _require_workdir(workdir)
    plt = _pyplot()
    written = plot_training(records, out_dir, plt)
    if report is not None:
        written += plot_eval(report, out_dir, plt)
    return written
