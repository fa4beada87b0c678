"""Convert public preference/solution datasets to grouped-layout JSONL (one prompt per line).

    oasst: OpenAssistant message trees (one tree per line: {"message_tree_id", "tree_state", "prompt": message},
           a message = {"message_id", "text", "role": prompter|assistant, "rank", "replies": [message], ...}).
           A group = a prompter message with the conversation from the root as chat messages
           (prompter -> "user", assistant -> "assistant") plus its ranked assistant replies;
           reward = -rank (0 = best). Prompter messages with fewer than 2 ranked replies are skipped.
    gsm8k: OpenAI grade-school-math example_model_solutions.jsonl: {"question", "ground_truth",
           "6b_finetuning" | "6b_verification" | "175b_finetuning" | "175b_verification":
           {"is_correct", "solution"}}. A group = the question, its 4 solutions (duplicates kept),
           reward = 1.0 if correct else 0.0; the question's ``ground_truth`` solution is kept as a field
           (a reward such as ``gvpo_offline.rewards:gsm8k_correct`` receives it when sampling).
    ultrafeedback: openbmb/UltraFeedback rows {"source", "instruction", "models", "completions": [{"model",
           "response", "overall_score", "fine-grained_score", "annotations": {aspect: {"Rating", ...}}, ...}],
           ...}. A group = the instruction and its (usually 4) completions; reward = the ``score_field``:
           overall_score (default), fine-grained_score (the mean of the four aspect ratings), or one aspect's
           Rating (helpfulness, honesty, instruction_following, truthfulness). Completions without a
           numeric score ("N/A") are left out; instructions with fewer than 2 scored completions skipped.
    helpsteer2: nvidia/HelpSteer2 flat rows {"prompt", "response", "helpfulness", "correctness",
           "coherence", "complexity", "verbosity"} (int 0..4), several rows per prompt. A group = the rows
           of one prompt (exact text, in order of first appearance); reward = Σ weight·attribute with
           HELPSTEER2_WEIGHTS unless ``weights`` says otherwise. Prompts with a single response skipped.
    nectar: berkeley-nest/Nectar rows {"prompt", "answers": [{"answer", "model", "rank"}], "turns",
           "num_responses", "source", "good_natured"}. A group = the prompt (as published: the
           "\n\nHuman: ... \n\nAssistant:" transcript) and its (7) answers; reward = −rank (1 = best).

Input: a .jsonl / .jsonl.gz / .parquet file, or with ``from_hub`` a Hugging Face datasets name (read
through ``datasets.load_dataset``; offline it comes from the local HF datasets cache), a local dataset
folder (data files, or a ``save_to_disk`` folder) and a ``split``.

Output rows: {"id", "prompt", "responses", "rewards"} (+ "ground_truth" for gsm8k), written to a
temporary file then renamed, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from gvpo_offline.runtime.errors import TOO_DEEP, DataError, GvpoError
from gvpo_offline.runtime.files import atomic_write_jsonl

GSM8K_MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
ULTRAFEEDBACK_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
ULTRAFEEDBACK_SCORES = ("overall_score", "fine-grained_score") + ULTRAFEEDBACK_ASPECTS
# The weights NVIDIA recommends to turn the five HelpSteer2 attributes into one scalar reward (model card
# of nvidia/Nemotron-4-340B-Reward, trained on HelpSteer2: [0, 0, 0, 0, 0.3, 0.74, 0.46, 0.47, -0.33],
# the last five = helpfulness, correctness, coherence, complexity, verbosity).
HELPSTEER2_WEIGHTS = {"helpfulness": 0.3, "correctness": 0.74, "coherence": 0.46, "complexity": 0.47, "verbosity": -0.33}


class Source(str, Enum):
    oasst = "oasst"
    gsm8k = "gsm8k"
    ultrafeedback = "ultrafeedback"
    helpsteer2 = "helpsteer2"
    nectar = "nectar"


SOURCES = tuple(s.value for s in Source)
SKIPPED = {
    Source.oasst: "prompter messages with fewer than 2 ranked replies",
    Source.gsm8k: "questions",
    Source.ultrafeedback: "instructions with fewer than 2 scored completions",
    Source.helpsteer2: "prompts with a single response",
    Source.nectar: "prompts with fewer than 2 answers",
}


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion wrote: groups (lines), responses in them, and input items it skipped."""

    output: str
    groups: int
    responses: int
    skipped: int
    skipped_reason: str


@dataclass(frozen=True)
class ConvertOptions:
    """Source-specific choices: UltraFeedback's score field, HelpSteer2's attribute weights."""

    score_field: str = "overall_score"
    weights: dict[str, float] | None = None  # None = HELPSTEER2_WEIGHTS

    def __post_init__(self):
        if self.score_field not in ULTRAFEEDBACK_SCORES:
            raise GvpoError(f"--score-field {self.score_field!r}: expected one of {', '.join(ULTRAFEEDBACK_SCORES)}")
        unknown = sorted(set(self.weights or {}) - set(HELPSTEER2_WEIGHTS))
        if unknown:
            raise GvpoError(f"--weights: unknown attribute {unknown[0]!r}; expected {', '.join(HELPSTEER2_WEIGHTS)}")


def parse_weights(text: str) -> dict[str, float]:
    """'helpfulness=1,verbosity=-0.5' -> {'helpfulness': 1.0, 'verbosity': -0.5}; attributes left out weigh 0."""
    weights = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not math.isfinite(weights.get(name.strip(), 0.0)):
            raise GvpoError(f"--weights {text!r}: expected attribute=number pairs (finite numbers) separated by commas")
    return {**{k: 0.0 for k in HELPSTEER2_WEIGHTS}, **weights} if weights else {}


class Rows:
    """The rows of an input, each with its position for error messages (JSONL line or table row)."""

    def __init__(self, name: str, rows: Callable[[], Iterator[tuple[int, Any]]], unit: str):
        self.name, self._rows, self.unit = name, rows, unit

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        for pos, obj in self._rows():
            if not isinstance(obj, dict):
                raise self.error(pos, "expected a JSON object")
            yield pos, obj

    def error(self, pos: int, message: str, field: str | None = None) -> DataError:
        where = {"line": pos} if self.unit == "line" else {"row": pos}
        return DataError(self.name, message, field=field, **where)


def open_rows(input_path: str | Path, from_hub: bool = False, split: str = "train") -> Rows:
    """Rows of a .jsonl/.jsonl.gz/.parquet file, or (``from_hub``) of a datasets name or local dataset folder."""
    if from_hub:
        return _hub_rows(str(input_path), split)
    path = Path(input_path)
    if not path.is_file():
        raise DataError(str(path), "no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        import pyarrow as pa

        def parquet_rows() -> Iterator[tuple[int, Any]]:
            pos = 0
            try:
                batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
                for batch in batches:
                    for row in batch.to_pylist():
                        yield pos, row
                        pos += 1
            except pa.ArrowException as exc:  # not Parquet, or a damaged one: one line, not pyarrow's traceback
                what = "not a Parquet file" if pos == 0 else f"corrupt Parquet file after {pos} rows"
                raise DataError(str(path), f"{what} ({str(exc).splitlines()[0]})") from None

        return Rows(str(path), parquet_rows, "row")
    return Rows(str(path), lambda: _json_lines(path), "line")


MAX_DATASET_FILES = 10_000  # a local --from-hub folder with more entries than this is not a dataset
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_hub_name(name: str) -> None:
    """GvpoError unless ``name`` is a hub dataset id (``org/name``) or a local dataset folder that neither
    contains the current folder (``..``, ``/``: datasets would scan the whole tree) nor holds more than
    MAX_DATASET_FILES entries (counted with an early stop, so the check itself is bounded)."""
    import os

    try:
        path = Path(name).expanduser()
    except RuntimeError:  # ~user that does not exist
        path = Path(name)
    if not path.exists():
        if not _HUB_ID.fullmatch(name) or any(part in (".", "..") for part in name.split("/")):
            raise GvpoError(f"--from-hub {name}: neither a hub dataset id (org/name) nor an existing local folder")
        return
    if not path.is_dir():
        return
    folder, here = path.resolve(), Path.cwd().resolve()
    if folder == Path(folder.anchor) or folder in here.parents:
        raise GvpoError(f"--from-hub {name}: {folder} contains the current folder; point it at the dataset's own "
                        "folder (reading it would scan the whole tree)")
    seen = 0
    for _, dirs, files in os.walk(folder):
        seen += len(dirs) + len(files)
        if seen > MAX_DATASET_FILES:
            raise GvpoError(f"--from-hub {name}: more than {MAX_DATASET_FILES} files and folders below {folder}; "
                            "point it at the dataset's own folder")


def _hub_rows(name: str, split: str) -> Rows:
    """``datasets.load_dataset(name, split=split)``; a ``save_to_disk`` folder via ``load_from_disk``."""
    check_hub_name(name)
    import datasets

    try:
        if (Path(name) / "dataset_info.json").is_file() or (Path(name) / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(name)
            dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            dataset = datasets.load_dataset(name, split=split)
    except KeyError:
        raise GvpoError(f"--from-hub {name}: no split {split!r}") from None
    except Exception as exc:  # offline without a cached copy, unknown name, bad folder, bad split
        detail = " ".join(str(exc).split())[:300]
        raise GvpoError(f"--from-hub {name} (split {split}): cannot load it: {detail}") from None
    return Rows(f"{name}[{split}]", lambda: enumerate(dataset), "row")


def convert(
    source: Source | str,
    input_path: str | Path,
    output_path: str | Path,
    options: ConvertOptions | None = None,
    *,
    from_hub: bool = False,
    split: str = "train",
) -> ConvertResult:
    """Convert ``input_path`` (a ``source`` dataset) to grouped JSONL at ``output_path`` atomically."""
    source, options = Source(source), options or ConvertOptions()
    rows = open_rows(input_path, from_hub, split)
    groups = {
        Source.oasst: oasst_groups,
        Source.gsm8k: gsm8k_groups,
        Source.ultrafeedback: lambda r: ultrafeedback_groups(r, options.score_field),
        Source.helpsteer2: lambda r: helpsteer2_groups(r, options.weights or HELPSTEER2_WEIGHTS),
        Source.nectar: nectar_groups,
    }[source](rows)
    counts = {"groups": 0, "responses": 0, "skipped": 0}

    def written() -> Iterator[dict]:
        for row in groups:
            if row is None:
                counts["skipped"] += 1
                continue
            counts["groups"] += 1
            counts["responses"] += len(row["responses"])
            yield row
        if not counts["groups"]:  # raised inside the atomic write: no output file is left behind
            what = f"skipped {counts['skipped']} {SKIPPED[source]}" if counts["skipped"] else "it has no rows"
            raise GvpoError(f"{input_path}: no groups to write ({what}); is this the {source.value} dataset? "
                            f"{output_path} was not written")

    atomic_write_jsonl(output_path, written())
    return ConvertResult(str(output_path), counts["groups"], counts["responses"], counts["skipped"], SKIPPED[source])


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based line, value) for each non-blank line of a .jsonl or .jsonl.gz file."""
    opener = gzip.open if path.suffix == ".gz" else open
    line = 0
    with opener(path, "rb") as fh:
        while True:
            try:
                raw = fh.readline()
            except (EOFError, gzip.BadGzipFile, zlib.error) as exc:  # EOFError would read as Ctrl-D to click
                raise DataError(str(path), f"truncated or corrupt gzip file after {line} lines ({exc})") from None
            if not raw:
                return
            line += 1
            if not raw.strip():
                continue
            try:
                yield line, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError(str(path), "invalid UTF-8", line=line) from None
            except json.JSONDecodeError as exc:
                raise DataError(str(path), f"malformed JSON: {exc.msg} (column {exc.colno})", line=line) from None
            except RecursionError:
                raise DataError(str(path), TOO_DEEP, line=line) from None


def _text(rows: Rows, pos: int, value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise rows.error(pos, "expected a non-empty string", field=field)
    return value


def _number(value: Any) -> float | None:
    """A finite number from a number or a numeric string ("4"); None for "N/A", null and the like."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def oasst_groups(rows: Rows) -> Iterator[dict | None]:
    """One grouped row per prompter message with >= 2 ranked assistant replies (None for the others)."""
    for line, tree in rows:
        root = tree.get("prompt")
        if not isinstance(root, dict):
            raise rows.error(line, "expected a message object", field="prompt")
        tree_id = tree.get("message_tree_id") or root.get("message_id")
        yield from _oasst_walk(root, [], str(tree_id), rows, line)


def _oasst_walk(msg: dict, history: list[dict], tree_id: str, rows: Rows, line: int) -> Iterator[dict | None]:
    role, text = msg.get("role"), msg.get("text")
    if role not in OASST_ROLES or not isinstance(text, str):
        raise rows.error(line, f"a message needs a role in {sorted(OASST_ROLES)} and a text",
                         field=f"message {msg.get('message_id')}")
    if msg.get("deleted"):
        return
    conversation = history + [{"role": OASST_ROLES[role], "content": text}]
    replies = msg.get("replies") or []
    if not isinstance(replies, list):
        raise rows.error(line, f"expected a list of messages, got {type(replies).__name__}",
                         field=f"message {msg.get('message_id')}.replies")
    replies = [r for r in replies if isinstance(r, dict) and not r.get("deleted")]
    if role == "prompter":
        ranked = sorted((r for r in replies if r.get("role") == "assistant" and _rank(r) is not None), key=_rank)
        if len(ranked) >= 2:
            yield {
                "id": f"{tree_id}/{msg.get('message_id')}",
                "prompt": conversation,
                "responses": [r["text"] for r in ranked],
                "rewards": [-_rank(r) for r in ranked],
            }
        else:
            yield None
    for reply in replies:
        yield from _oasst_walk(reply, conversation, tree_id, rows, line)


def _rank(msg: dict) -> int | None:
    rank = msg.get("rank")
    return rank if isinstance(rank, int) and not isinstance(rank, bool) else None


def gsm8k_groups(rows: Rows) -> Iterator[dict]:
    """One grouped row per question: its 4 model solutions, reward 1.0 if correct else 0.0, ground_truth."""
    for index, (line, row) in enumerate(rows):
        question = _text(rows, line, row.get("question"), "question")
        responses, rewards = [], []
        for model in GSM8K_MODELS:
            item: Any = row.get(model)
            if not isinstance(item, dict):
                raise rows.error(line, "expected {\"is_correct\", \"solution\"}", field=model)
            solution, correct = item.get("solution"), item.get("is_correct")
            if not isinstance(solution, str) or not solution or not isinstance(correct, bool):
                raise rows.error(line, "expected a non-empty 'solution' and a boolean 'is_correct'", field=model)
            responses.append(solution)
            rewards.append(1.0 if correct else 0.0)
        ground_truth = _text(rows, line, row.get("ground_truth"), "ground_truth")
        yield {"id": f"gsm8k-{index}", "prompt": question, "responses": responses, "rewards": rewards,
               "ground_truth": ground_truth}


def ultrafeedback_groups(rows: Rows, score_field: str = "overall_score") -> Iterator[dict | None]:
    """One grouped row per instruction: its completions with a numeric ``score_field`` (see the module doc)."""
    for index, (pos, row) in enumerate(rows):
        instruction = _text(rows, pos, row.get("instruction"), "instruction")
        completions = row.get("completions")
        if not isinstance(completions, list):
            raise rows.error(pos, "expected a list of completions", field="completions")
        responses, rewards = [], []
        for j, completion in enumerate(completions):
            field = f"completions[{j}]"
            if not isinstance(completion, dict):
                raise rows.error(pos, "expected an object", field=field)
            response = _text(rows, pos, completion.get("response"), f"{field}.response")
            if score_field in ULTRAFEEDBACK_ASPECTS:
                annotations = completion.get("annotations") or {}
                if not isinstance(annotations, dict):
                    raise rows.error(pos, f"expected an object of aspect ratings, got {type(annotations).__name__}",
                                     field=f"{field}.annotations")
                aspect = annotations.get(score_field)
                score = _number(aspect.get("Rating")) if isinstance(aspect, dict) else None
            else:
                score = _number(completion.get(score_field))
            if score is not None:
                responses.append(response)
                rewards.append(score)
        if len(responses) < 2:
            yield None
            continue
        yield {"id": f"ultrafeedback-{index}", "prompt": instruction, "responses": responses, "rewards": rewards}


def helpsteer2_groups(rows: Rows, weights: dict[str, float]) -> Iterator[dict | None]:
    """Gather HelpSteer2's flat rows by prompt; reward = Σ weights[a]·row[a] (see the module docstring)."""
    by_prompt: dict[str, tuple[list[str], list[float]]] = {}
    for pos, row in rows:
        prompt = _text(rows, pos, row.get("prompt"), "prompt")
        response = _text(rows, pos, row.get("response"), "response")
        reward = 0.0
        for attribute, weight in weights.items():
            value = row.get(attribute)
            if _number(value) is None or isinstance(value, str):
                raise rows.error(pos, "expected a number (0..4)", field=attribute)
            reward += weight * float(value)
        responses, rewards = by_prompt.setdefault(prompt, ([], []))
        responses.append(response)
        rewards.append(reward)
    for index, (prompt, (responses, rewards)) in enumerate(by_prompt.items()):
        yield ({"id": f"helpsteer2-{index}", "prompt": prompt, "responses": responses, "rewards": rewards}
               if len(responses) >= 2 else None)


def nectar_groups(rows: Rows) -> Iterator[dict | None]:
    """One grouped row per Nectar prompt: its answers best first, reward = −rank."""
    for index, (pos, row) in enumerate(rows):
        prompt = _text(rows, pos, row.get("prompt"), "prompt")
        answers = row.get("answers")
        if not isinstance(answers, list):
            raise rows.error(pos, "expected a list of answers", field="answers")
        ranked = []
        for j, answer in enumerate(answers):
            if not isinstance(answer, dict) or _number(answer.get("rank")) is None:
                raise rows.error(pos, "expected {\"answer\", \"model\", \"rank\"} with a numeric rank",
                                 field=f"answers[{j}]")
            ranked.append((_number(answer["rank"]), _text(rows, pos, answer.get("answer"), f"answers[{j}].answer")))
        ranked.sort(key=lambda item: item[0])
        if len(ranked) < 2:
            yield None
            continue
        yield {"id": f"nectar-{index}", "prompt": prompt, "responses": [a for _, a in ranked],
               "rewards": [-rank for rank, _ in ranked]}
