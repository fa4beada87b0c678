"""The ``eval`` report as a terminal table (rich): metric, model, reference, Δ and the 95% intervals."""

from __future__ import annotations

from gvpo_offline.math.metrics import METRICS, format_interval, format_value

_LABELS = {
    "gvpo_loss": "GVPO loss (eq. 16)",
    "pairwise_accuracy": "pairwise ranking accuracy",
    "spearman": "Spearman ρ (within groups)",
    "top1_agreement": "top-1 agreement",
    "mean_log_ratio": "mean ℓ per response",
    "mean_log_ratio_per_token": "mean ℓ per token",
    "implicit_reward_variance": "Var(β·ℓ) (eq. 17)",
    "implicit_reward_covariance": "Cov(β·ℓ, R) (eq. 17)",
    "reward_variance": "Var(R)",
}


def report_table(report):
    """The report (heldout.EvalReport) as a rich Table: metric, model, reference, Δ, 95% bootstrap intervals."""
    from rich.table import Table
    from rich.text import Text

    c = report.counts
    table = Table(
        title=Text(f"eval of {report.model_path} (β = {report.beta:g}"  # Text: no markup, paths may hold []
                   + (f", trained with --loss {report.objective})" if report.objective else ")")),
        caption=(
            f"{c['groups']} groups, {c['responses']} responses, {c['tokens']} tokens; "
            f"{c['skipped_groups']} groups with all-equal rewards skipped by the ranking metrics "
            f"({c['pairs']} pairs). Intervals: 95% bootstrap over groups"
            + (f", {report.bootstrap} resamples." if report.bootstrap else " (off).")
        ),
    )
    for name, justify in (("metric", "left"), ("model", "right"), ("reference", "right"), ("Δ", "right"),
                          ("model 95% CI", "right"), ("Δ 95% CI", "right")):
        table.add_column(name, justify=justify)
    iv_m, iv_d = report.intervals.get("model", {}), report.intervals.get("delta", {})
    for m in METRICS:
        table.add_row(_LABELS[m], format_value(report.model[m]), format_value(report.reference[m]), format_value(report.delta[m]),
                      format_interval(iv_m.get(m)), format_interval(iv_d.get(m)))
    g = report.generation
    if g:
        table.add_section()
        table.add_row(f"mean sampled reward ({g['prompts']} prompts × {g['samples_per_prompt']})",
                      format_value(g["model_mean_reward"]), format_value(g["reference_mean_reward"]),
                      format_value(g["mean_reward_difference"]), "", format_interval(g["difference_interval"]))
    return table
