"""Convert public preference/solution datasets to grouped-layout JSONL (one prompt per line).

    oasst: OpenAssistant message trees (one tree per line: {"message_tree_id", "tree_state", "prompt": message},
           a message = {"message_id", "text", "role": prompter|assistant, "rank", "replies": [message], ...}).
           A group = a prompter message with the conversation from the root as chat messages
           (prompter -> "user", assistant -> "assistant") plus its ranked assistant replies;
           reward = -rank (0 = best). Prompter messages with fewer than 2 ranked replies are skipped.
    gsm8k: OpenAI grade-school-math example_model_solutions.jsonl: {"question", "ground_truth",
           "6b_finetuning" | "6b_verification" | "175b_finetuning" | "175b_verification":
           {"is_correct", "solution"}}. A group = the question, its 4 solutions (duplicates kept),
           reward = 1.0 if correct else 0.0.

Output rows: {"id", "prompt", "responses", "rewards"}, written to a temporary file then renamed, so a
failed conversion leaves nothing behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from gvpo_offline.errors import DataError
from gvpo_offline.files import atomic_write_jsonl

GSM8K_MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


class Source(str, Enum):
    oasst = "oasst"
    gsm8k = "gsm8k"


SOURCES = tuple(s.value for s in Source)


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion wrote: groups (lines), responses in them, and input items it skipped."""

    output: str
    groups: int
    responses: int
    skipped: int
    skipped_reason: str


def convert(source: Source | str, input_path: str | Path, output_path: str | Path) -> ConvertResult:
    """Convert ``input_path`` (a ``source`` dataset) to grouped JSONL at ``output_path`` atomically."""
    source = Source(source)
    groups = oasst_groups(input_path) if source is Source.oasst else gsm8k_groups(input_path)
    counts = {"groups": 0, "responses": 0, "skipped": 0}

    def rows() -> Iterator[dict]:
        for row in groups:
            if row is None:
                counts["skipped"] += 1
                continue
            counts["groups"] += 1
            counts["responses"] += len(row["responses"])
            yield row

    atomic_write_jsonl(output_path, rows())
    reason = "prompter messages with fewer than 2 ranked replies" if source is Source.oasst else "questions"
    return ConvertResult(str(output_path), counts["groups"], counts["responses"], counts["skipped"], reason)


def _json_lines(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(1-based line, object) for each non-blank line; DataError on anything but a JSON object."""
    if not Path(path).is_file():
        raise DataError(str(path), "no such file")
    with open(path, "rb") as fh:
        for line, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError(str(path), "invalid UTF-8", line=line) from None
            except json.JSONDecodeError as exc:
                raise DataError(str(path), f"malformed JSON: {exc.msg} (column {exc.colno})", line=line) from None
            if not isinstance(obj, dict):
                raise DataError(str(path), "expected a JSON object", line=line)
            yield line, obj


def oasst_groups(path: str | Path) -> Iterator[dict | None]:
    """One grouped row per prompter message with >= 2 ranked assistant replies (None for the others)."""
    for line, tree in _json_lines(path):
        root = tree.get("prompt")
        if not isinstance(root, dict):
            raise DataError(str(path), "expected a message object", line=line, field="prompt")
        tree_id = tree.get("message_tree_id") or root.get("message_id")
        yield from _oasst_walk(root, [], str(tree_id), path, line)


def _oasst_walk(msg: dict, history: list[dict], tree_id: str, path, line: int) -> Iterator[dict | None]:
    role, text = msg.get("role"), msg.get("text")
    if role not in OASST_ROLES or not isinstance(text, str):
        raise DataError(str(path), f"a message needs a role in {sorted(OASST_ROLES)} and a text", line=line,
                        field=f"message {msg.get('message_id')}")
    if msg.get("deleted"):
        return
    conversation = history + [{"role": OASST_ROLES[role], "content": text}]
    replies = [r for r in msg.get("replies") or [] if isinstance(r, dict) and not r.get("deleted")]
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
        yield from _oasst_walk(reply, conversation, tree_id, path, line)


def _rank(msg: dict) -> int | None:
    rank = msg.get("rank")
    return rank if isinstance(rank, int) and not isinstance(rank, bool) else None


def gsm8k_groups(path: str | Path) -> Iterator[dict]:
    """One grouped row per question: its 4 model solutions, reward 1.0 if correct else 0.0."""
    for index, (line, row) in enumerate(_json_lines(path)):
        question = row.get("question")
        if not isinstance(question, str) or not question:
            raise DataError(str(path), "expected a non-empty string", line=line, field="question")
        responses, rewards = [], []
        for model in GSM8K_MODELS:
            item: Any = row.get(model)
            if not isinstance(item, dict):
                raise DataError(str(path), "expected {\"is_correct\", \"solution\"}", line=line, field=model)
            solution, correct = item.get("solution"), item.get("is_correct")
            if not isinstance(solution, str) or not solution or not isinstance(correct, bool):
                raise DataError(
                    str(path), "expected a non-empty 'solution' and a boolean 'is_correct'", line=line, field=model
                )
            responses.append(solution)
            rewards.append(1.0 if correct else 0.0)
        yield {"id": f"gsm8k-{index}", "prompt": question, "responses": responses, "rewards": rewards}
