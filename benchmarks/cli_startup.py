"""Fixed cost per command (issue 23.2): wall time of `--help`, `inspect` without a model and a
`precompute-ref` cache hit, for an older commit of this repository (``--old-ref``, default main) and
for the working tree, measured in the same run. Prints the median of ``--repeat`` runs and old / new.

    python benchmarks/cli_startup.py [--old-ref main] [--repeat 5]

The old code is extracted with ``git archive`` into a temp folder and run with PYTHONPATH pointing
there; each version builds its own small cache first (the first, untimed, precompute-ref run).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO / "sample_data" / "stories260K"


def run(src: Path, args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one command in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "gvpo_offline.cli", *args], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(f"{src}: {' '.join(args)} failed:\n{res.stderr}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-ref", default="main")
    parser.add_argument("--repeat", type=int, default=5)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "old"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", opts.old_ref, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        data = tmp / "groups.jsonl"
        data.write_text("".join((REPO / "sample_data" / "groups.jsonl").read_text().splitlines(True)[:20]))
        versions = {f"old ({opts.old_ref})": old / "src", "new (working tree)": REPO / "src"}
        cases = {
            "gvpo-offline --help": lambda wd: ["--help"],
            "train --help": lambda wd: ["train", "--help"],
            "eval --help": lambda wd: ["eval", "--help"],
            "inspect DATA (no --model)": lambda wd: ["inspect", str(data), "--json"],
            "precompute-ref cache hit": lambda wd: ["precompute-ref", str(data), "--model", str(STORIES),
                                                    "--workdir", str(wd), "--device", "cpu"],
        }
        times: dict[str, dict[str, tuple[float, float]]] = {case: {} for case in cases}
        for n, (name, src) in enumerate(versions.items()):
            workdir = tmp / f"w{n}"
            run(src, cases["precompute-ref cache hit"](workdir))  # builds the cache (not timed)
            for case, args in cases.items():
                runs = [run(src, args(workdir)) for _ in range(opts.repeat)]
                times[case][name] = tuple(statistics.median(r[i] for r in runs) for i in (0, 1))
        names = list(versions)
        print(f"median of {opts.repeat} runs, seconds (OMP_NUM_THREADS=1, {os.cpu_count()} CPUs); CPU = user + system")
        print(f"{'command':28} {'old wall':>9} {'old CPU':>8} {'new wall':>9} {'new CPU':>8} {'old/new CPU':>12}")
        for case, t in times.items():
            (ow, oc), (nw, nc) = t[names[0]], t[names[1]]
            print(f"{case:28} {ow:9.3f} {oc:8.3f} {nw:9.3f} {nc:8.3f} {oc / nc:11.2f}x")
        print(f"old = {names[0]}, new = {names[1]}")


if __name__ == "__main__":
    main()
