"""Where in the user's files a kind of prompt first occurs, for errors that arise after loading.

The canonical table (load.py) keeps no file or line per group, so an error found while tokenizing (chat
messages for a tokenizer without a chat template) is located afterwards by reading the inputs again, up
to the first such row: cheap, and only on the error path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from gvpo_offline.data.rows import _json_array, _json_lines
from gvpo_offline.data.sources import _JSON_KINDS, _resolve
from gvpo_offline.data.tables import _read_saved_dataset
from gvpo_offline.data.tokenize import NoChatTemplate
from gvpo_offline.runtime.errors import GvpoError


def first_chat_prompt(paths: tuple[str, ...], prompt_col: str | None = None) -> str | None:
    """"FILE: line N" (JSON files, 1-based) or "FILE: row N" (tables, 0-based) of the first row whose
    prompt is a list of chat messages, over ``paths`` (files, folders, globs as the data layer reads
    them); None when there is none or the inputs cannot be read (the caller's error stands as it is)."""
    col = prompt_col or "prompt"
    try:
        for src in _resolve(tuple(str(p) for p in paths)):
            if src.kind in _JSON_KINDS:
                rows = _json_array(src) if src.kind == "json" else _json_lines(src)
                for line, row in rows:
                    if isinstance(row, dict) and isinstance(row.get(col), list):
                        return f"{src.path}: line {line}"
                continue
            if src.kind == "parquet":
                import pyarrow.parquet as pq

                column = pq.read_table(src.path, columns=[col]).column(col)
            else:
                column = _read_saved_dataset(src).column(col)
            for row, value in enumerate(column.to_pylist()):
                if isinstance(value, list):
                    return f"{src.path}: row {row}"
    except (GvpoError, OSError, KeyError, ValueError):  # unreadable now: the error stays unlocated
        return None
    return None


@contextlib.contextmanager
def chat_prompts_located(paths: tuple[str, ...], prompt_col: str | None = None) -> Iterator[None]:
    """Re-raise a NoChatTemplate from the block with the file and line of the first chat prompt in front."""
    try:
        yield
    except NoChatTemplate as err:
        where = first_chat_prompt(paths, prompt_col)
        if where is None:
            raise
        raise NoChatTemplate(f"{where}: {err}") from None
