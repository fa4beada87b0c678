"""The ``gvpo-offline inspect`` summary: data stats, token-length stats and their rich tables.

Token lengths use the shared tokenization (tokenize.py) without truncation and count what the
configured limits would cut; summary_tables renders files, groups, rewards and tokens for the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from gvpo_offline.data.records import DataStats, FileInfo, GroupedData


@dataclass(frozen=True)
class LengthStats:
    """Token lengths of ``n`` texts, before truncation; ``truncated`` = how many exceed their limit."""

    n: int
    p50: int
    p90: int
    p99: int
    max: int
    truncated: int


@dataclass(frozen=True)
class TokenStats:
    """prompts: truncated if longer than max_prompt_length; responses: truncated if longer than
    max_length minus the (kept) prompt length."""

    max_length: int
    max_prompt_length: int
    prompts: LengthStats
    responses: LengthStats


@dataclass(frozen=True)
class Summary:
    """What ``gvpo-offline inspect`` reports."""

    layout: str
    files: list[FileInfo]
    stats: DataStats
    tokens: TokenStats | None = None

    def to_json(self) -> dict:
        """Stable keys: layout, files[{path,size,sha256}], stats{DataStats fields}, tokens (or null)."""
        return {
            "layout": self.layout,
            "files": [asdict(f) for f in self.files],
            "stats": asdict(self.stats),
            "tokens": None if self.tokens is None else asdict(self.tokens),
        }


def _percentile(sorted_values: np.ndarray, q: float) -> int:
    """Nearest-rank percentile of an ascending array (q in [0, 100])."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return int(sorted_values[rank - 1])


def _length_stats(lengths: list[int], truncated: int) -> LengthStats:
    values = np.sort(np.asarray(lengths, dtype=np.int64))
    return LengthStats(
        len(values),
        _percentile(values, 50),
        _percentile(values, 90),
        _percentile(values, 99),
        int(values[-1]),
        truncated,
    )


def token_stats(
    data: GroupedData, tokenizer, cfg, progress: Callable[[int], None] | None = None
) -> TokenStats:
    """Token lengths of every prompt and response with the shared tokenization (tokenize.py).

    cfg: a tokenize.TokenizeConfig. progress(n) is called after each group with its k responses.
    """
    from transformers.utils import logging as hf_logging

    from gvpo_offline.data.tokenize import TokenizeConfig, encode_prompt, encode_response

    unbounded = TokenizeConfig(2**62, 2**62 - 1, cfg.add_eos, cfg.prompt_template)
    prompt_lengths, response_lengths = [], []
    prompts_cut = responses_cut = 0
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence length is longer than the maximum": we measure exactly that
    try:
        for group in data.iter_groups():
            n_prompt = len(encode_prompt(tokenizer, group.prompt, unbounded)[0])
            prompt_lengths.append(n_prompt)
            prompts_cut += n_prompt > cfg.max_prompt_length
            room = cfg.max_length - min(n_prompt, cfg.max_prompt_length)
            for response in group.responses:
                n_response = len(encode_response(tokenizer, response, unbounded, group.prompt))
                response_lengths.append(n_response)
                responses_cut += n_response > room
            if progress is not None:
                progress(len(group.responses))
    finally:
        hf_logging.set_verbosity(verbosity)
    return TokenStats(
        cfg.max_length,
        cfg.max_prompt_length,
        _length_stats(prompt_lengths, prompts_cut),
        _length_stats(response_lengths, responses_cut),
    )


def summarize(data: GroupedData, tokens: TokenStats | None = None) -> Summary:
    return Summary(data.layout, data.files, data.stats, tokens)


def summary_tables(summary: Summary) -> list:
    """The summary as rich tables (files, groups, rewards, tokens) for ``gvpo-offline inspect``."""
    from rich.table import Table

    s = summary.stats
    files = Table(title="files", title_justify="left")
    for col in ("path", "size", "sha256"):
        files.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
    for f in summary.files:
        files.add_row(f.path, f"{f.size:,}", f.sha256[:16])

    groups = Table(title=f"groups ({summary.layout} layout)", title_justify="left", show_header=False)
    groups.add_column("what")
    groups.add_column("value")
    k_values = list(s.k_hist)
    for what, value in (
        ("rows read", s.n_rows),
        ("groups", s.n_groups),
        ("responses", s.n_responses),
        ("k (responses per group)", f"{min(k_values)}..{max(k_values)}, mean {s.n_responses / s.n_groups:.2f}"),
        ("k distribution", ", ".join(f"{k}: {n}" for k, n in s.k_hist.items())),
        ("dropped groups with k = 1", s.dropped_k1_groups),
        ("groups with duplicate responses", f"{s.groups_with_duplicates} ({s.duplicate_responses} duplicates, kept)"),
        ("groups with all-equal rewards (no signal)", s.all_equal_reward_groups),
    ):
        groups.add_row(what, f"{value:,}" if isinstance(value, int) else value)

    rewards = Table(title="rewards", title_justify="left")
    for col in ("mean", "std", "min", "max", "mean group std", "mean group spread"):
        rewards.add_column(col, justify="right")
    rewards.add_row(*(f"{v:.4g}" for v in (s.reward_mean, s.reward_std, s.reward_min, s.reward_max,
                                            s.mean_group_reward_std, s.mean_group_reward_spread)))
    tables = [files, groups, rewards]
    if summary.tokens is not None:
        t = summary.tokens
        tokens = Table(title="tokens (before truncation)", title_justify="left")
        for col in ("", "count", "p50", "p90", "p99", "max", "truncated", "limit (tokens)"):
            tokens.add_column(col, justify="right" if col not in ("", "limit") else "left")
        for name, stats, limit in (
            ("prompts", t.prompts, f"{t.max_prompt_length}"),
            ("responses", t.responses, f"{t.max_length} - prompt"),
        ):
            share = stats.truncated / stats.n if stats.n else 0.0
            numbers = (stats.n, stats.p50, stats.p90, stats.p99, stats.max)
            tokens.add_row(name, *(f"{v:,}" for v in numbers), f"{stats.truncated:,} ({share:.1%})", limit)
        tables.append(tokens)
    return tables
