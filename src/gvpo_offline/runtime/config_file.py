"""`--config FILE` for every command: options kept in a YAML (or TOML / JSON) file.

File format: keys are the long option names without the dashes (``groups_per_step`` or ``groups-per-step``;
positional arguments by their name: ``data``, ``prompts``, ``source``, ``input``), values as on the
command line (lists for repeatable options). Sections named after a command (``train:``,
``precompute-ref:``) hold options for that command only and win over the top-level keys::

    workdir: runs/qs            # shared: every command that has --workdir uses it
    precompute-ref:
      data: [sample_data/groups.jsonl]
      model: sample_data/stories260K
    train:
      beta: 0.1

Precedence: command line > the command's section > top-level keys > the option's default. A top-level
key that is an option of another command only is ignored (it is for that command); a key no command
knows, or a section key the command does not have, is an error naming the key and the file, with the
closest option name as a suggestion. Relative paths in the file are relative to the current directory,
as on the command line.

Mechanism: :class:`ConfigCommand` (the ``cls`` of every typer command) adds an eager ``--config`` option
whose callback loads the file into click's ``ctx.default_map`` before the other options are read, so a
required option (``train --beta``, ``precompute-ref --model``, the DATA argument) may come from the file.
While the command runs, :func:`resolved_options` returns every option's final value under its config
key: written out (``train`` writes ``WORKDIR/train_config.json``), it is a config file that repeats the run.
"""

from __future__ import annotations

import contextvars
import difflib
import functools
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import typer.core
import typer.main

from gvpo_offline.runtime.errors import GvpoError

_RESOLVED: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("resolved_options", default=None)
_SKIP = {"help", "config"}  # params that are not run settings


def load_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a .yaml/.yml/.json/.toml file; GvpoError (one line) when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise GvpoError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib  # Python >= 3.11

            data = tomllib.loads(text)
        else:  # YAML is a superset of JSON
            import yaml

            data = yaml.safe_load(text)
    except ImportError as exc:
        need = "Python >= 3.11 (tomllib)" if path.suffix.lower() == ".toml" else "PyYAML (pip install pyyaml)"
        raise GvpoError(f"--config {path}: reading it needs {need}") from exc
    except Exception as exc:  # yaml.YAMLError, tomllib.TOMLDecodeError
        detail = " ".join(str(exc).split())
        raise GvpoError(f"--config {path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GvpoError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def config_key(param) -> str:
    """The key of a click parameter in a config file: its long option name, or an argument's name."""
    if param.param_type_name == "argument":
        return (param.metavar or param.name).lower().replace("-", "_")
    longs = [o for o in param.opts if o.startswith("--")]
    return (longs[0] if longs else param.opts[0]).lstrip("-").replace("-", "_")


def _norm(key: Any) -> str:
    return str(key).replace("-", "_")


def _command_keys(command) -> dict[str, Any]:
    """config key -> click parameter, for the command's settings."""
    return {config_key(p): p for p in command.params if p.name not in _SKIP}


def _all_commands(ctx) -> dict[str, Any]:
    """Normalised command name -> click command, for every command of the app (ctx's parent group)."""
    group = ctx.parent.command if ctx.parent is not None else None
    commands = getattr(group, "commands", None) or {ctx.info_name: ctx.command}
    return {_norm(name): cmd for name, cmd in commands.items()}


def _unknown(key: str, known: list[str], path: str | Path, where: str) -> GvpoError:
    close = difflib.get_close_matches(_norm(key), known, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return GvpoError(f"--config {path}: unknown key '{key}'{where}{hint}")


def default_map(data: dict[str, Any], command, commands: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The click ``default_map`` (param name -> value) for ``command`` from a loaded config file.

    ``commands``: every command of the app by normalised name (decides what a section is and which
    top-level keys belong to another command). Raises GvpoError on an unknown key.
    """
    own = _command_keys(command)
    anyone = {k for cmd in commands.values() for k in _command_keys(cmd)}
    this = next((name for name, cmd in commands.items() if cmd is command), None)
    values: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for key, value in data.items():
        norm = _norm(key)
        if norm in commands and isinstance(value, dict):
            sections[norm] = value
        elif norm in own:
            values[norm] = value
        elif norm not in anyone:
            raise _unknown(key, sorted(anyone | set(commands)), path, "")
    for key, value in (sections.get(this) or {}).items():
        if _norm(key) not in own:
            raise _unknown(key, sorted(own), path, f" in section '{this}'")
        values[_norm(key)] = value
    result = {}
    for key, value in values.items():
        param = own[key]
        many = getattr(param, "multiple", False) or param.nargs == -1
        if many and value is not None and not isinstance(value, (list, tuple)):
            value = [value]
        result[param.name] = value
    return result


def _load_into_context(ctx, param, value) -> None:
    """Eager ``--config`` callback: runs before the other options are read."""
    if not value or ctx.resilient_parsing:
        return
    mapping = default_map(load_file(value), ctx.command, _all_commands(ctx), value)
    ctx.default_map = {**(ctx.default_map or {}), **mapping}


@functools.lru_cache(maxsize=1)
def _config_option():
    """The click ``--config`` option, built by typer itself (its click option classes vary by version)."""
    holder = typer.Typer()

    @holder.command()
    def _holder(config: Annotated[Optional[str], typer.Option(
        "--config", metavar="FILE", is_eager=True, expose_value=False, callback=_load_into_context,
        help="YAML/TOML file of options (keys = long option names; command-line options win).",
    )] = None) -> None:
        pass

    return next(p for p in typer.main.get_command(holder).params if p.name == "config")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class ConfigCommand(typer.core.TyperCommand):
    """A typer command with ``--config FILE`` (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.append(_config_option())

    def invoke(self, ctx):
        resolved = {config_key(p): _jsonable(ctx.params.get(p.name)) for p in self.params
                    if p.name not in _SKIP and p.expose_value}
        token = _RESOLVED.set(resolved)
        try:
            return super().invoke(ctx)
        finally:
            _RESOLVED.reset(token)


def resolved_options() -> dict[str, Any]:
    """Every option of the running command with its final value (file, command line or default)."""
    resolved = _RESOLVED.get()
    if resolved is None:
        raise RuntimeError("resolved_options() is only available while a ConfigCommand runs")
    return dict(resolved)


def set_resolved(key: str, value: Any) -> None:
    """Replace one resolved option with its parsed form (e.g. ``report_to`` split into backends)."""
    resolved = _RESOLVED.get()
    if resolved is None:
        raise RuntimeError("set_resolved() is only available while a ConfigCommand runs")
    resolved[key] = _jsonable(value)


def write_resolved(path: str | Path) -> Path:
    """Write the running command's resolved options as JSON (a valid ``--config`` file), atomically."""
    from gvpo_offline.runtime.files import atomic_write_json

    atomic_write_json(path, resolved_options())
    return Path(path)
