"""The ``gvpo-offline sample`` stage: read prompts, generate k responses each with a model
(:func:`gvpo_offline.stages.generate.generate_responses`), score them with the user's reward, and append
one grouped JSON line per prompt (``{"id", "prompt", "responses", "rewards"}``), resumable after an
interruption. Determinism: see :mod:`gvpo_offline.stages.generate`.
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from gvpo_offline.data.tokenize import Prompt, TokenizeConfig
from gvpo_offline.runtime.errors import TOO_DEEP, DataError, GvpoError
from gvpo_offline.runtime.files import append_durably
from gvpo_offline.stages.generate import (  # noqa: F401 (SamplingConfig, generate_responses re-exported)
    SamplingConfig,
    quiet_transformers,
    generate_responses,
    stable_int,
)

# ---- the `sample` stage --------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleConfig:
    """Settings of ``gvpo-offline sample``.

    k: responses per prompt (when k_range is None). k_range: (low, high) inclusive; each prompt's k
    is drawn from it deterministically from the seed and the prompt's position in the file.
    """

    prompts_path: str
    model_path: str
    reward: str
    output: str
    k: int | None = None
    k_range: tuple[int, int] | None = None
    sampling: SamplingConfig = SamplingConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    reward_timeout: float | None = None  # seconds per reward call (--reward-timeout)

    def __post_init__(self):
        if (self.k is None) == (self.k_range is None):
            raise GvpoError("give exactly one of --k and --k-range")
        if self.k is not None and self.k < 2:
            raise GvpoError(f"--k must be >= 2 (GVPO compares responses within a group), got {self.k}")
        if self.k_range is not None:
            low, high = self.k_range
            if low < 2 or high < low:
                raise GvpoError(f"--k-range {low}:{high}: need 2 <= A <= B")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt to sample for: its id, its position in the file (for seeding), the prompt, and the
    line's other fields (e.g. ``ground_truth``; passed to a reward that accepts them, kept in the output)."""

    id: str
    index: int
    prompt: Prompt
    fields: dict = field(default_factory=dict)


@dataclass
class SampleResult:
    written: int  # groups written by this run
    skipped: int  # prompts already in the output (resumed)
    total: int  # prompts in the input
    empty_responses: int  # responses dropped because they decoded to whitespace (groups left with
    # fewer than two are not written)
    unscorable: int = 0  # prompts the reward could not score (rewards.Unscorable): skipped, not written
    first_unscorable: str = ""  # the first of them, and why
    equal_rewards: int = 0  # groups written whose rewards are all equal (no signal for GVPO)


def parse_k_range(value: str) -> tuple[int, int]:
    """``"2:6"`` -> (2, 6)."""
    low, sep, high = value.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(low), int(high)
    except ValueError:
        raise GvpoError(f"--k-range {value!r}: expected A:B, e.g. 2:6") from None


def k_for(config: SampleConfig, index: int) -> int:
    """The number of responses for the prompt at ``index``: fixed, or drawn from the seed and index."""
    if config.k is not None:
        return config.k
    low, high = config.k_range
    return random.Random(stable_int("k", config.sampling.seed, index)).randint(low, high)


def _check_prompt(path: str, line: int, prompt: object) -> Prompt:
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    if (
        isinstance(prompt, list) and prompt
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt)
    ):
        return prompt
    raise DataError(path, "expected a non-empty string or a list of {\"role\", \"content\"} messages",
                    line=line, field="prompt")


MAX_FIELD_DEPTH = 100  # nesting levels of a prompts-file row (lists and objects)


def _deeper_than(value: object, limit: int) -> bool:
    """Is ``value`` (parsed JSON) nested more than ``limit`` levels of lists/objects? Iterative."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def read_prompts(path: str | Path, unique_ids: bool = True, prompt_field: str = "prompt") -> list[PromptRecord]:
    """Prompts from a ``.txt`` file (one per line, blank lines skipped) or JSONL with a ``prompt`` field
    (a string or chat messages) and an optional ``id``; other fields are kept in ``PromptRecord.fields``
    (grouped and flat data files work as they are). Ids default to the 1-based line number; with
    ``unique_ids`` they must be unique."""
    path = Path(path)
    if not path.is_file():
        raise GvpoError(f"{path}: no such prompts file")
    records: list[PromptRecord] = []
    is_jsonl = path.suffix in (".jsonl", ".json")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line_no = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(str(path), f"not UTF-8 text (byte {err.object[err.start]:#04x})", line=line_no) from None
    for line_no, line in enumerate(io.StringIO(text, newline=None), 1):
        if not line.strip():
            continue
        if not is_jsonl:
            records.append(PromptRecord(str(line_no), len(records), line.rstrip("\r\n")))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(str(path), f"invalid JSON ({err.msg})", line=line_no) from None
        except RecursionError:
            raise DataError(str(path), TOO_DEEP, line=line_no) from None
        if not isinstance(obj, dict) or prompt_field not in obj:
            raise DataError(str(path), f"expected an object with a \"{prompt_field}\" field", line=line_no)
        if _deeper_than(obj, MAX_FIELD_DEPTH):  # copied for the reward and written back out: keep it shallow
            raise DataError(str(path), f"nested more than {MAX_FIELD_DEPTH} levels deep", line=line_no)
        raw_id = obj.get("id", line_no)
        if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
            raise DataError(str(path), f"expected a string or integer, got {raw_id!r}", line=line_no, field="id")
        prompt = _check_prompt(str(path), line_no, obj[prompt_field])
        fields = {k: v for k, v in obj.items() if k not in (prompt_field, "prompt", "id")}
        records.append(PromptRecord(str(raw_id), len(records), prompt, fields))
    if not records:
        raise GvpoError(f"{path}: no prompts")
    seen: set[str] = set()
    for r in records if unique_ids else ():
        if r.id in seen:
            raise GvpoError(f"{path}: duplicate prompt id {r.id!r}")
        seen.add(r.id)
    return records


def journal_path(output: str | Path) -> Path:
    """Where ``sample`` records what it is appending to ``output``: ``.gvpo-sample-NAME.json`` beside it,
    ``{"size": bytes of the output before the block, "pending": the block's text}``, written (atomically)
    before each block and removed when the run ends. It is what lets a resumed run tell its own torn
    write from a file of the user's whose last line lacks a newline."""
    output = Path(output)
    return output.parent / f".gvpo-sample-{output.name}.json"


def _own_torn_tail(path: Path, data: bytes) -> bool:
    """Is the unterminated end of ``data`` (the output's bytes) a piece of the block an interrupted
    ``sample`` was writing, as its journal records?"""
    try:
        journal = json.loads(journal_path(path).read_text(encoding="utf-8"))
        size, pending = int(journal["size"]), journal["pending"].encode("utf-8")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    written = data[size:] if 0 <= size <= len(data) else None
    return written is not None and len(written) < len(pending) and pending.startswith(written) and (
        size == 0 or data[size - 1 : size] == b"\n")


def read_done_ids(path: str | Path) -> set[str]:
    """Ids already in an output file, for resuming. Its last line may lack its newline only when it is a
    piece of what an interrupted run was writing (:func:`journal_path` says so): that piece is cut off.
    Any other unterminated last line (a file of the user's, e.g. notes without a final newline) or a bad
    line elsewhere is an error: the file is not ours to repair."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    good_end = len(data)
    if data and not data.endswith(b"\n"):
        line_no = data.count(b"\n") + 1
        if not _own_torn_tail(path, data):
            raise DataError(str(path), "the last line has no newline and is not a piece of a group this tool was "
                            "writing; not appending to it: end the file with a newline (or choose another -o)",
                            line=line_no)
        good_end = data.rfind(b"\n") + 1
    done: set[str] = set()
    for line_no, raw in enumerate(data[:good_end].split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            done.add(str(json.loads(raw)["id"]))
        except (ValueError, KeyError, TypeError, RecursionError):
            raise DataError(str(path), "not a complete group line; fix or remove the output file to resume",
                            line=line_no) from None
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done


def _append_block(out, text: str, journal: Path) -> None:
    """Append ``text`` (whole group lines) to the open output ``out``: first record it in the journal
    (with the output's size before it), then write and fsync (a full disk leaves no half group behind)."""
    from gvpo_offline.runtime.files import atomic_write_json

    out.flush()
    atomic_write_json(journal, {"size": os.fstat(out.fileno()).st_size, "pending": text})
    append_durably(out, text)
def settings_path(output: str | Path) -> Path:
    """The sidecar JSON next to a ``sample`` output that records what made it (``OUTPUT.settings.json``)."""
    return Path(f"{output}.settings.json")


def sample_settings(config: SampleConfig) -> dict:
    """What decides a ``sample`` output's content: model, reward (and its file's sha256), k, decoding and
    tokenization settings (not --batch-size: rows are seeded one by one)."""
    from dataclasses import asdict

    from gvpo_offline.runtime.files import sha256_file

    module = config.reward.rpartition(":")[0]
    return {"model": config.model_path, "reward": config.reward,
            "reward_file_sha256": sha256_file(module) if module.endswith(".py") and Path(module).is_file() else None,
            "k": config.k, "k_range": list(config.k_range) if config.k_range else None, "dtype": config.dtype,
            **{k: v for k, v in asdict(config.sampling).items() if k != "batch_size"},
            "tokenize": json.loads(json.dumps(asdict(config.tokenize), default=str))}


def check_resume_settings(output: Path, settings: dict) -> None:
    """Refuse to append to an output sampled with other settings (its sidecar differs); record them."""
    from gvpo_offline.runtime.files import atomic_write_json

    sidecar = settings_path(output)
    if output.is_file() and output.stat().st_size and sidecar.is_file():
        try:
            old = json.loads(sidecar.read_text())
        except ValueError:
            old = {}
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
        if changed:
            raise GvpoError(f"{output} was sampled with other settings ({'; '.join(changed)}; see {sidecar}): "
                            "resuming would mix them. Use another --output, or delete both files to start over")
    atomic_write_json(sidecar, settings)


def sample(config: SampleConfig, progress_console=None) -> SampleResult:
    """Run the ``sample`` stage: generate, score and append groups to ``config.output``.

    progress_console: the rich Console for the progress bar (default: a new one on stderr).

    Groups are appended in prompt order, one JSON line each, flushed and fsynced after every batch,
    so an interrupted run resumes where it stopped (prompts whose id is already in the output are
    skipped). Resuming needs the same settings: they are recorded in ``OUTPUT.settings.json``
    (:func:`sample_settings`) and an output made with others is refused. Each prompt's samples are seeded
    by its position in the prompts file, so a resumed run writes what an uninterrupted one would have.
    The reward's signature is checked against the prompt rows' fields before the model loads.
    """
    from gvpo_offline.data.locate import chat_prompts_located
    from gvpo_offline.data.rewards import (
        NOT_REWARD_FIELDS,
        Unscorable,
        check_reward_fields,
        check_reward_signature,
        load_reward_fn,
        score_responses,
    )
    from gvpo_offline.model.loading import load_model, load_tokenizer, resolve_device, resolve_dtype
    from gvpo_offline.runtime.progress import progress

    records = read_prompts(config.prompts_path)
    reward_fn = load_reward_fn(config.reward, config.reward_timeout)
    check_reward_fields(reward_fn, ((f"{config.prompts_path}: prompt id {r.id!r}", r.fields) for r in records))
    check_reward_signature(reward_fn, config.reward, [r.fields for r in records], config.prompts_path)
    output = Path(config.output)
    check_resume_settings(output, sample_settings(config))
    done = read_done_ids(output)
    todo = [r for r in records if r.id not in done]
    result = SampleResult(0, len(records) - len(todo), len(records), 0)
    if not todo:
        return result

    device = resolve_device(config.device)
    with quiet_transformers():
        tokenizer = load_tokenizer(config.model_path, config.trust_remote_code)
        model = load_model(config.model_path, device, resolve_dtype(config.dtype, device), config.trust_remote_code)

    # Blocks of whole prompts with about batch_size rows: written (and fsynced) one block at a time.
    blocks: list[list[PromptRecord]] = [[]]
    rows_in_block = 0
    for r in todo:
        if blocks[-1] and rows_in_block + k_for(config, r.index) > config.sampling.batch_size:
            blocks.append([])
            rows_in_block = 0
        blocks[-1].append(r)
        rows_in_block += k_for(config, r.index)

    output.parent.mkdir(parents=True, exist_ok=True)
    journal = journal_path(output)
    total = sum(k_for(config, r.index) for r in todo)
    with progress(progress_console, "sampling", total, unit="responses") as update, \
            chat_prompts_located((str(config.prompts_path),)), open(output, "a", encoding="utf-8") as out:
        for block in blocks:
            counts = [k_for(config, r.index) for r in block]
            responses = generate_responses(
                model, tokenizer, [r.prompt for r in block], counts, config.sampling, config.tokenize,
                seed_keys=[r.index for r in block], progress=lambda m: update(advance=m),
            )
            lines = []
            for record, group in zip(block, responses):
                kept = [t for t in group if t.strip()]
                result.empty_responses += len(group) - len(kept)
                if len(kept) < 2:  # rare: not a GVPO group any more (a resumed run retries it)
                    continue
                try:
                    rewards = score_responses(reward_fn, record.prompt, kept, f"prompt id {record.id!r}",
                                              record.fields)
                except Unscorable as err:  # e.g. no ground truth: skipped and counted, never written as 0s
                    result.unscorable += 1
                    result.first_unscorable = result.first_unscorable or str(err)
                    continue
                result.equal_rewards += len(set(rewards)) == 1
                extra = {k: v for k, v in record.fields.items() if k not in NOT_REWARD_FIELDS}
                lines.append(json.dumps(
                    {"id": record.id, "prompt": record.prompt, **extra, "responses": kept, "rewards": rewards},
                    ensure_ascii=False,
                ) + "\n")
            if lines:
                _append_block(out, "".join(lines), journal)
            result.written += len(lines)
    journal.unlink(missing_ok=True)
    return result
