"""``--config FILE``: load a TOML file of options and validate it against the CLI's commands.

Top-level keys apply to every command that takes the option; a ``[command-name]`` table applies to
one command and wins over the top level. Keys are option names, spelled ``num-train`` or
``num_train``. Everything is checked when the file is loaded, before any work starts: an unknown
table or key is an error suggesting the closest valid name, and each value must have its option's
type (a string, an integer, a number, true/false, or an array for a repeatable option) and pass the
option's own conversion. Every error is one line naming the file, the table and the key.

The valid keys and their types come from the click commands themselves, so the file always
accepts exactly what the command line does.
"""

from __future__ import annotations

import difflib
import json
import tomllib
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from iumask.errors import IumaskError

# kind -> (test of a TOML value, description, plural description)
_KINDS = {
    "integer": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", "integers"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number", "numbers"),
    "boolean": (lambda v: isinstance(v, bool), "true or false", "true/false values"),
    "string": (lambda v: isinstance(v, str), "a string", "strings"),
    "path": (lambda v: isinstance(v, str), "a path (a string)", "paths (strings)"),
    # A choice (an Enum option): its value as a string, or a number for numeric choices (connectivity = 8).
    "choice": (lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), "one of the option's choices",
               "choices"),
}
_CLICK_TYPE_KINDS = {"integer": "integer", "integer range": "integer", "float": "number", "float range": "number",
                     "boolean": "boolean", "text": "string", "path": "path", "directory": "path", "file": "path"}


def load_config(path: str | Path, group: Any) -> dict[str, dict[str, Any]]:
    """Read and validate the TOML file ``path`` against the commands of the click group ``group``
    (e.g. ``typer.main.get_command(app)``) and return click's ``default_map``: one dict of
    ``{parameter name: value}`` per command. Raises :class:`IumaskError` on any problem."""
    path = Path(path)
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IumaskError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise IumaskError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise IumaskError(f"{path}: cannot read the config file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise IumaskError(f"{path}: not valid TOML (not UTF-8 text); fix the file") from None
    except tomllib.TOMLDecodeError as exc:
        raise IumaskError(f"{path}: not valid TOML ({exc}); fix the file") from None
    return _Validator(path, group).default_map(config)


class _Validator:
    def __init__(self, path: Path, group: Any) -> None:
        self.path = path
        self.commands: dict[str, Any] = dict(group.commands)
        # command -> {normalized key -> parameter}; normalized keys use underscores.
        self.options = {name: _option_keys(command) for name, command in self.commands.items()}

    def default_map(self, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
        shared: dict[str, Any] = {}  # normalized key -> value
        tables: dict[str, dict[str, Any]] = {}
        seen_keys: dict[str, str] = {}
        seen_tables: dict[str, str] = {}
        for key, value in config.items():
            if isinstance(value, dict):
                command = self._command(key)
                if command in seen_tables:
                    raise IumaskError(f"{self.path}: table '{command}' given twice (as '{seen_tables[command]}' and "
                                      f"'{key}'); keep one")
                seen_tables[command] = key
                tables[command] = value
                continue
            norm = key.replace("-", "_")
            if key.replace("_", "-") in self.commands:
                raise IumaskError(f"{self.path}: '{key}' names a command, so it must be a table of that command's "
                                  "options, not a value")
            takers = [c for c, keys in self.options.items() if norm in keys]
            if not takers:
                raise IumaskError(self._unknown(key, None))
            self._check_twice(seen_keys, norm, key, None)
            for command in takers:
                value = self._check_value(command, self.options[command][norm], key, value, None)
            shared[norm] = value
        default_map: dict[str, dict[str, Any]] = {}
        for command, keys in self.options.items():
            own: dict[str, Any] = {}
            seen: dict[str, str] = {}
            for key, value in tables.get(command, {}).items():
                norm = key.replace("-", "_")
                if norm not in keys:
                    raise IumaskError(self._unknown(key, seen_tables[command]))
                self._check_twice(seen, norm, key, seen_tables[command])
                own[keys[norm].name] = self._check_value(command, keys[norm], key, value, seen_tables[command])
            default_map[command] = {**{keys[k].name: v for k, v in shared.items() if k in keys}, **own}
        return default_map

    def _command(self, table: str) -> str:
        command = table.replace("_", "-")
        if command in self.commands:
            return command
        names = list(self.commands)
        match = difflib.get_close_matches(command, names, n=1)
        hint = f"did you mean '{match[0]}'? " if match else ""
        raise IumaskError(f"{self.path}: unknown table '{table}'; {hint}tables name commands: {', '.join(names)}")

    def _unknown(self, key: str, table: str | None) -> str:
        norm = key.replace("-", "_")
        underscores = "_" in key
        spell = (lambda k: k) if underscores else (lambda k: k.replace("_", "-"))
        command = table.replace("_", "-") if table else None
        if command is None:
            candidates = sorted({k for keys in self.options.values() for k in keys})
            where = "at the top level (no command has an option --" + norm.replace("_", "-") + ")"
            fallback = "see `iumask COMMAND --help` for the options"
        else:
            candidates = sorted(self.options[command])
            where = f"in table '{table}' ({command} has no option --{norm.replace('_', '-')}"
            takers = [c for c, keys in self.options.items() if norm in keys]
            where += f"; {', '.join(takers)} take it)" if takers else ")"
            fallback = f"see `iumask {command} --help` for its options"
        match = difflib.get_close_matches(norm, candidates, n=1)
        hint = f"did you mean '{spell(match[0])}'?" if match else fallback
        return f"{self.path}: unknown key '{key}' {where}; {hint}"

    def _check_twice(self, seen: dict[str, str], norm: str, key: str, table: str | None) -> None:
        if norm in seen:
            raise IumaskError(f"{self.path}: key '{key}' {_where(table)} given twice (as '{seen[norm]}' and "
                              f"'{key}'); keep one")
        seen[norm] = key

    def _check_value(self, command: str, param: Any, key: str, value: Any, table: str | None) -> Any:
        """``value`` checked against the option; returned as the command line would spell it."""
        kind, is_list = _param_kind(param)
        given = value  # as written in the file, for the message (connectivity = 5, not "5")
        if kind == "choice" and _KINDS[kind][0](value):
            value = str(value)
        problem, applies = None, ""
        if kind is not None:
            test, one, many = _KINDS[kind]
            if is_list:
                expected = f"an array of {many}, e.g. {key} = [...]"
                if not isinstance(value, list) or not all(test(v) for v in value):
                    problem = f"must be {expected}"
            else:
                expected = one
                if not test(value):
                    problem = f"must be {expected}"
        if problem is None:
            try:
                _coerce(self.commands[command], param, value)
            except Exception as exc:  # the option's own conversion: click/typer raise their own types
                message = str(getattr(exc, "message", "") or exc).rstrip(".")
                problem = f"is not valid for --{param.name.replace('_', '-')} ({message})"
                applies = "" if table is not None else f" (for {command})"
        if problem is not None:
            raise IumaskError(f"{self.path}: key '{key}' {_where(table)}{applies} {problem}; got "
                              f"{_toml_repr(given)}")
        return value


def _where(table: str | None) -> str:
    return f"in table '{table}'" if table is not None else "at the top level"


def _toml_repr(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _option_keys(command: Any) -> dict[str, Any]:
    """``{normalized key: parameter}``: each option's name and its long flags (``--no-x`` excluded)."""
    keys = {}
    for param in command.params:
        if not param.name or not getattr(param, "expose_value", True):
            continue
        keys[param.name] = param
        for opt in param.opts:
            if opt.startswith("--"):
                keys.setdefault(opt[2:].replace("-", "_"), param)
    return keys


def _param_kind(param: Any) -> tuple[str | None, bool]:
    """The TOML kind a parameter's values must have and whether it takes an array."""
    if getattr(param, "name", None) == "workers":  # "auto" or a number: a string option that takes both
        return "choice", False
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:  # recent typer (its own click): the parameter's Python annotation
        annotation, is_list = descriptor.annotation, False
        if typing.get_origin(annotation) is list:
            (annotation,), is_list = typing.get_args(annotation), True
        if isinstance(annotation, type) and issubclass(annotation, Enum):
            return "choice", is_list
        for python_type, kind in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                                  (Path, "path")):
            if isinstance(annotation, type) and issubclass(annotation, python_type):
                return kind, is_list
        return None, is_list
    click_type = getattr(param, "type", None)  # click-based typer
    return _CLICK_TYPE_KINDS.get(getattr(click_type, "name", None)), bool(getattr(param, "multiple", False))


def _coerce(command: Any, param: Any, value: Any) -> Any:
    """Convert ``value`` the way the command line would (ranges, choices, paths)."""
    ctx = command.context_class(command)
    if hasattr(param, "get_runtime_param"):  # recent typer (its own click)
        return param.get_runtime_param().coerce(value, param=param, ctx=ctx)
    return param.type_cast_value(ctx, value)  # click
