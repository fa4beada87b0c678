"""Benchmark: load + summarise 1M responses (flat Parquet) and 125k groups of 8 (grouped Parquet).

    python benchmarks/inspect_1m.py [--groups 125000] [--k 8] [--dir /tmp/gvpo-bench]

Each measurement runs in a fresh (spawned) process so that its peak RSS (resource.getrusage) is its own.
Prints a rich table: file size, rows, seconds for load_groups + summarize, peak RSS. Not a test.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

WORDS = np.array(
    "the a of to and in is it you that he was for on are with as I his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an each "
    "she which do their time if will way about many then them write would like so these her long make "
    "thing see him two has look more day could go come did number sound no most people my over know "
    "water than call first who may down side been now find".split()
)


def _texts(rng: np.random.Generator, n: int, n_words: int) -> pa.Array:
    """n random texts of n_words words each (vectorised: no Python loop per text)."""
    words = pa.array(WORDS).take(pa.array(rng.integers(0, len(WORDS), size=n * n_words)))
    lists = pa.ListArray.from_arrays(pa.array(np.arange(0, n * n_words + 1, n_words, dtype=np.int32)), words)
    return pc.binary_join(lists, " ")


def generate(folder: str, n_groups: int, k: int) -> tuple[str, str]:
    """Write flat.parquet (n_groups * k rows) and grouped.parquet (n_groups rows) once."""
    os.makedirs(folder, exist_ok=True)
    flat, grouped = os.path.join(folder, "flat.parquet"), os.path.join(folder, "grouped.parquet")
    if os.path.exists(flat) and os.path.exists(grouped):
        return flat, grouped
    rng = np.random.default_rng(0)
    prompts = pc.binary_join_element_wise(
        pa.array([f"Question {i}: " for i in range(n_groups)]), _texts(rng, n_groups, 30), ""
    )
    n = n_groups * k
    responses = _texts(rng, n, 50)
    rewards = pa.array(rng.normal(size=n))
    offsets = pa.array(np.arange(0, n + 1, k, dtype=np.int32))
    pq.write_table(
        pa.table(
            {
                "prompt": prompts,
                "responses": pa.ListArray.from_arrays(offsets, responses),
                "rewards": pa.ListArray.from_arrays(offsets, rewards),
            }
        ),
        grouped + ".tmp",
    )
    os.replace(grouped + ".tmp", grouped)
    pq.write_table(
        pa.table({"prompt": prompts.take(pa.array(np.repeat(np.arange(n_groups), k))), "response": responses, "reward": rewards}),
        flat + ".tmp",
    )
    os.replace(flat + ".tmp", flat)
    return flat, grouped


def measure(path: str, queue) -> None:
    """(in a fresh process) load_groups + summarize one file; report seconds and peak RSS."""
    from gvpo_offline.data import DataConfig, load_groups, summarize

    start = time.perf_counter()
    data = load_groups(DataConfig((path,)))
    summary = summarize(data)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    queue.put((seconds, peak_mib, summary.stats.n_rows, summary.stats.n_groups, summary.stats.n_responses))


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=125_000)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--dir", default="/tmp/gvpo-bench")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    flat, grouped = generate(args.dir, args.groups, args.k)
    print(f"data ready in {time.perf_counter() - t0:.1f} s in {args.dir}")
    table = Table(title="load_groups + summarize (fresh process each)")
    table.add_column("file", no_wrap=True)
    for col in ("size MiB", "rows", "groups", "responses", "seconds", "peak RSS MiB", "RSS / size"):
        table.add_column(col, justify="right")
    for path in (flat, grouped):
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(path, queue))
        proc.start()
        seconds, peak, rows, groups, responses = queue.get()
        proc.join()
        table.add_row(
            os.path.basename(path),
            f"{os.path.getsize(path) / 2**20:.0f}",
            f"{rows:,}",
            f"{groups:,}",
            f"{responses:,}",
            f"{seconds:.1f}",
            f"{peak:.0f}",
            f"{peak / (os.path.getsize(path) / 2**20):.1f}x",
        )
    Console(width=max(Console().width, 110)).print(table)


if __name__ == "__main__":
    main()
