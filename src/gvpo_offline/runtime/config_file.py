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

Precedence: command-line options > ``key=value`` overrides > the command's section > top-level keys > the
option's default. A top-level
key that is an option of another command only is ignored (it is for that command); a key no command
knows, or a section key the command does not have, is an error naming the key and the file, with the
closest option name as a suggestion. Relative paths in the file are relative to the current directory,
as on the command line.

Overrides (LLaMA-Factory style): ``gvpo-offline train --config run.yaml lr=1e-5 beta=0.2`` — a
``key=value`` argument whose key is one of the command's config keys (or an alias: ``learning_rate``)
sets that option as the file would; lists comma-separated (``report_to=tensorboard,wandb``), switches as
``true``/``false``. A ``key=value`` naming no option is an error with the closest key (on commands with
DATA arguments, an existing file called ``a=b`` stays a file).

Keys may be any of an option's long names (``learning_rate`` for ``--lr``); the first is canonical.

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
import os
import re
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
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise GvpoError(f"--config {path}: {path.stat().st_size} bytes; a config file holds at most "
                        f"{MAX_CONFIG_BYTES} (is this the right file?)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise GvpoError(f"--config {path}: line {line}: not UTF-8 text (byte {raw[err.start]:#04x})") from None
    try:
        if path.suffix.lower() == ".toml":
            import tomllib  # Python >= 3.11

            data = tomllib.loads(text)
        else:  # YAML is a superset of JSON
            import yaml

            _check_yaml_size(path, yaml.compose(text, Loader=yaml.SafeLoader))
            data = yaml.safe_load(text)
    except RecursionError:
        raise GvpoError(f"--config {path}: nested too deeply to read") from None
    except GvpoError:
        raise
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


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; anything near this is not one
MAX_CONFIG_NODES = 100_000  # values in the document once every alias is expanded


def _check_yaml_size(path: Path, root) -> None:
    """GvpoError unless the YAML node graph ``root`` expands (aliases followed) to at most
    MAX_CONFIG_NODES values and has no alias that contains itself: a "billion laughs" file of a few
    hundred bytes would otherwise expand to gigabytes when its values are read. Counted without expanding:
    each distinct node's expanded size is computed once."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            raise GvpoError(f"--config {path}: a YAML alias that contains itself (a recursive document)")
        visiting.add(key)
        total = 1
        if isinstance(node.value, list):
            for item in node.value:
                for child in (item if isinstance(item, tuple) else (item,)):  # mapping: (key, value) pairs
                    total += size(child)
                    if total > MAX_CONFIG_NODES:
                        raise GvpoError(f"--config {path}: expands to more than {MAX_CONFIG_NODES} values (YAML "
                                        "aliases nested in aliases); not read")
        visiting.discard(key)
        sizes[key] = total
        return total

    if root is not None:
        size(root)


def config_key(param) -> str:
    """The key of a click parameter in a config file: its long option name, or an argument's name."""
    if param.param_type_name == "argument":
        return (param.metavar or param.name).lower().replace("-", "_")
    longs = [o for o in param.opts if o.startswith("--")]
    return (longs[0] if longs else param.opts[0]).lstrip("-").replace("-", "_")


def _norm(key: Any) -> str:
    return str(key).replace("-", "_")


def _command_keys(command) -> dict[str, Any]:
    """config key -> click parameter, for the command's settings; aliases (every other long option
    name, ``learning_rate`` for ``--lr``) map to the same parameter."""
    keys = {}
    for p in command.params:
        if p.name in _SKIP:
            continue
        for opt in getattr(p, "opts", ()):
            if opt.startswith("--"):
                keys.setdefault(_norm(opt.lstrip("-")), p)
        keys[config_key(p)] = p
    return keys


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
        check_value(key, value, param, path)
        result[param.name] = value
    return result


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _option_type(param) -> type | None:
    """bool, int, float or str: the type of one value of ``param`` (typer's annotation, unwrapping
    Optional[...] and list[...]); None when it cannot be told."""
    import typing

    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if annotation is None:  # older typer: the click type's name
        name = getattr(getattr(param, "type", None), "name", None)
        return {"boolean": bool, "integer": int, "float": float, "text": str}.get(name)
    while typing.get_origin(annotation) is not None:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if not args:
            return None
        annotation = args[0]
    return annotation if annotation in _EXPECTED else str if isinstance(annotation, type) else None


def _fits(value: Any, kind: type | None) -> bool:
    if value is None:
        return True
    if isinstance(value, (dict, list, tuple)):
        return False
    if kind is bool or kind is None:
        return kind is None or isinstance(value, bool)
    if isinstance(value, bool):  # `lr: true`, `groups_per_step: yes` are not numbers (nor strings)
        return False
    if kind is str:
        return isinstance(value, (str, int, float))
    if isinstance(value, str):  # as typed on the command line: "1e-6", "8"
        try:
            (int if kind is int else float)(value)
        except ValueError:
            return False
        return True
    return isinstance(value, int) if kind is int else isinstance(value, (int, float))


def check_value(key: str, value: Any, param, path: str | Path) -> None:
    """GvpoError naming the file, the key and the expected type unless ``value`` has the option's type
    (click would coerce ``true`` to 1.0 or 1 silently). Strings that parse as the number are accepted, as
    on the command line (YAML reads ``1e-6`` as a string)."""
    kind = _option_type(param)
    many = getattr(param, "multiple", False) or param.nargs == -1
    items = value if many and isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not _fits(item, kind):
            expected = _EXPECTED.get(kind, "a value") + (" (or a list of them)" if many else "")
            raise GvpoError(f"--config {path}: key '{key}': expected {expected}, got {item!r}")


def _load_into_context(ctx, param, value) -> None:
    """Eager ``--config`` callback: runs before the other options are read. ``key=value`` overrides
    (kept in ``ctx.meta``) stay on top of the file's values."""
    if not value or ctx.resilient_parsing:
        return
    mapping = default_map(load_file(value), ctx.command, _all_commands(ctx), value)
    ctx.default_map = {**(ctx.default_map or {}), **mapping, **ctx.meta.get(_OVERRIDES, {})}


_OVERRIDES = "gvpo_offline.overrides"  # ctx.meta key: param name -> the value of a key=value override
_OVERRIDE = re.compile(r"([A-Za-z][A-Za-z0-9_-]*)=(.*)", re.DOTALL)


def split_overrides(command, args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Take the ``key=value`` overrides out of a command's arguments: (the other arguments, {param
    name: value}). An argument that is an option's value (``--prompt-template a=b``) is never one;
    a ``key=value`` naming no option is a GvpoError, unless the command takes DATA arguments and a
    file of that name exists."""
    keys = _command_keys(command)
    takes_value = {opt: not getattr(p, "is_flag", False) and not getattr(p, "count", False)
                   for p in command.params if p.param_type_name == "option" for opt in p.opts}
    positional = any(p.param_type_name == "argument" for p in command.params)
    rest: list[str] = []
    overrides: dict[str, Any] = {}
    expect_value = False
    for n, arg in enumerate(args):
        if expect_value:
            rest.append(arg)
            expect_value = False
            continue
        if arg == "--":
            return rest + args[n:], overrides
        if arg.startswith("-"):
            rest.append(arg)
            expect_value = "=" not in arg and takes_value.get(arg, False)
            continue
        match = _OVERRIDE.fullmatch(arg)
        if match is None or (positional and os.path.exists(arg)):
            rest.append(arg)
            continue
        key, value = _norm(match[1]), match[2]
        if key not in keys:
            if positional and any(c in arg for c in "*?[/."):
                rest.append(arg)  # a path or a glob (DATA), not an override
                continue
            close = difflib.get_close_matches(key, sorted(keys), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}={value}'?)" if close else ""
            raise GvpoError(f"'{arg}': `{command.name}` has no option '{match[1]}' to set{hint}")
        param = keys[key]
        if getattr(param, "multiple", False) or param.nargs == -1:
            overrides[param.name] = [*overrides.get(param.name, []), *value.split(",")]
        else:
            overrides[param.name] = value
    return rest, overrides


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

    def parse_args(self, ctx, args):
        args, overrides = split_overrides(self, list(args))
        if overrides:  # lower than the command line, higher than --config (see _load_into_context)
            ctx.meta[_OVERRIDES] = overrides
            ctx.default_map = {**(ctx.default_map or {}), **overrides}
        return super().parse_args(ctx, args)

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
