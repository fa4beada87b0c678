"""The prompts of the generation eval (``eval --prompts``), each with its row's other fields.

``--prompts eval`` takes the held-out split of the workdir: the prompts of its cached ``eval`` groups, read
back from the data files precompute-ref read (the manifest's DATA and --eval-data, same layout and
columns), with the fields of their rows (e.g. ``ground_truth``), so a reward such as
``gsm8k_correct(prompt, response, ground_truth)`` gets them. Any other value is a prompts file
(generation.read_eval_prompt_rows; ``--prompt-col`` names its prompt field).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict
from pathlib import Path

from gvpo_offline.runtime.errors import GvpoError

HELDOUT = "eval"  # --prompts eval: the workdir's held-out split


def _canonical(prompt) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _raw_rows(path: Path) -> list[dict]:
    """The rows of a .jsonl(.gz)/.json/.parquet data file as dicts ([] for other kinds: no row fields)."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            return [row for line in fh if line.strip() and isinstance(row := json.loads(line), dict)]
    if name.endswith(".json"):
        rows = json.loads(path.read_text(encoding="utf-8"))
        return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []
    return []


def heldout_prompt_rows(workdir: str | Path) -> list[tuple]:
    """(prompt, row fields) of the workdir's held-out groups, in cache order, one per group."""
    from gvpo_offline.data import ColumnMap, DataConfig, load_groups
    from gvpo_offline.stages import reference

    manifest = reference.read_manifest(workdir)
    held_ids = list(dict.fromkeys(reference.load_split(workdir, "eval").column("group_id").to_pylist()))
    if not held_ids:
        raise GvpoError(f"--prompts eval: {workdir} has no held-out groups (precompute-ref --eval-fraction > 0 "
                        "or --eval-data)")
    columns = ColumnMap(**manifest.columns)
    layout = manifest.inputs.get("layout", manifest.layout)
    prompts: dict[str, object] = {}
    fields: dict[str, dict] = {}
    skip = {v for v in asdict(columns).values() if v} | {"prompt", "responses", "rewards", "response", "reward",
                                                         "id", "group_id"}
    for files in (manifest.data_files, manifest.eval_data_files):
        paths = tuple(f["path"] for f in files)
        if not paths:
            continue
        gone = next((p for p in paths if not Path(p).is_file()), None)
        if gone:
            raise GvpoError(f"--prompts eval reads the held-out prompts from the data precompute-ref read: {gone} "
                            "is gone (or pass --prompts FILE)")
        table = load_groups(DataConfig(paths, layout, columns)).table
        for gid, prompt in zip(table["group_id"].to_pylist(), table["prompt"].to_pylist()):
            prompts.setdefault(gid, json.loads(prompt))
        for path in paths:
            for row in _raw_rows(Path(path)):
                key = _canonical(row.get(columns.prompt or "prompt"))
                fields.setdefault(key, {k: v for k, v in row.items() if k not in skip})
    missing = [g for g in held_ids if g not in prompts]
    if missing:
        raise GvpoError(f"--prompts eval: held-out group {missing[0]!r} is not in the data files any more "
                        "(changed since precompute-ref); rerun precompute-ref or pass --prompts FILE")
    rows = [(prompts[g], fields.get(_canonical(prompts[g]), {})) for g in held_ids]
    seen, out = set(), []
    for prompt, extra in rows:  # deduplicated by prompt, as a prompts file is
        if _canonical(prompt) not in seen:
            seen.add(_canonical(prompt))
            out.append((prompt, extra))
    return out


def generation_prompt_rows(prompts: str, workdir: str | Path, prompt_col: str | None = None) -> list[tuple]:
    """(prompt, row fields) for ``eval --prompts PROMPTS``: the held-out split for ``eval``, else a file."""
    from gvpo_offline.stages.evaluate.generation import read_eval_prompt_rows

    if prompts == HELDOUT and not Path(prompts).exists():
        return heldout_prompt_rows(workdir)
    return read_eval_prompt_rows(prompts, prompt_col)
