"""One command line for every entry point, generated from its config dataclass.

    cfg = parse_config(CollectConfig, description=__doc__)           # --field value ...
    cfg, tracking_uri = parse_job(EvalConfig, description=__doc__)   # ... and --tracking-uri URI

Each field of the dataclass becomes one flag, and its docstring (the string literal under the
field, inherited fields included) becomes the flag's `--help` text, followed by its default:

- `--field-name VALUE` (`--field_name` is accepted too); int, float and str fields take their type,
  `X | None` fields take X;
- booleans: `--flag` / `--no-flag`;
- tuples: space-separated values (`--horizons 1 2 4`; the flag alone = an empty tuple); a
  fixed-length tuple takes exactly that many; a tuple of tuples takes each inner tuple
  comma-separated (`--agent-conv-filters 16,8,4 32,4,2 256,11,1`). A tuple flag given twice
  collects both lists;
- dicts: one JSON object (`--dit '{"steps": 12}'`, `--overrides '{"horizon": [1, 2]}'`); a value
  that is not a JSON object is a usage error naming the flag;
- a nested dataclass field (collect's `agent`) gives its own fields as prefixed flags
  (`--agent-seed`).

A field's metadata may rename its flag (`{"flag": "--set"}`), list its allowed values
(`{"choices": [...]}`) or name them in the help (`{"metavar": "SECTION.FIELD=VALUE"}`). An unknown
flag, or an abbreviated one, fails naming it; a value the config refuses (its `__post_init__`)
fails as a usage error with the config's message.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import sys
import textwrap
import types
import typing
from typing import Any, Callable, Sequence


# -- docstrings ------------------------------------------------------------------------------------
@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass and of its dataclass bases, as one line (a
    subclass's own docstring wins); fields without one are left out."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (made in a REPL or by exec): no help text
            continue
        body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
        for stmt, after in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


# -- field types -----------------------------------------------------------------------------------
def _without_none(kind: Any) -> Any:
    """X for `X | None`, else `kind`."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def _is_variadic(kind: Any) -> bool:
    args = typing.get_args(kind)
    return typing.get_origin(kind) is tuple and len(args) == 2 and args[1] is Ellipsis


def _element_types(kind: Any) -> tuple[Any, ...]:
    """The element types of a tuple type: one for `tuple[X, ...]`, each for `tuple[X, Y]`."""
    args = typing.get_args(kind)
    return args[:1] if _is_variadic(kind) else args


class _CommaTuple:
    """Converts one token "16,8,4" to a tuple of `kinds` (the elements of a tuple of tuples)."""

    def __init__(self, kinds: tuple[Any, ...], variadic: bool):
        self.kinds, self.variadic = kinds, variadic
        self.__name__ = ",".join(_metavar(k) for k in kinds)  # argparse names the type in its errors

    def __call__(self, token: str) -> tuple:
        parts = [p for p in token.split(",") if p]
        if not self.variadic and len(parts) != len(self.kinds):
            raise argparse.ArgumentTypeError(f"{token!r}: expected {len(self.kinds)} comma-separated values")
        kinds = self.kinds * len(parts) if self.variadic else self.kinds
        try:
            return tuple(k(p) for k, p in zip(kinds, parts))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{token!r}: expected comma-separated {self.__name__}") from None


def _json_object(token: str) -> dict[str, Any]:
    """One token holding a JSON object -> that dict (argparse prefixes the flag to the error)."""
    try:
        value = json.loads(token)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{token!r} is not JSON ({exc}); expected a JSON object, "
                                         f"e.g. '{{\"steps\": 12}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{token!r} is not a JSON object ({{\"name\": value, ...}}) but a "
                                         f"{type(value).__name__}")
    return value


_json_object.__name__ = "JSON object"  # argparse names the type in its errors


def _is_dict(kind: Any) -> bool:
    return kind is dict or typing.get_origin(kind) is dict


def _converter(kind: Any, where: str) -> Callable[[str], Any]:
    """What turns one command-line token into a value of `kind`."""
    if kind in (int, float, str):
        return kind
    if _is_dict(kind):
        return _json_object
    if typing.get_origin(kind) is tuple and all(k in (int, float, str) for k in _element_types(kind)):
        return _CommaTuple(_element_types(kind), _is_variadic(kind))
    raise TypeError(f"{where}: the command line has no syntax for fields of type {kind!r}")


def _metavar(kind: Any) -> str:
    if _is_dict(kind):
        return "JSON"
    if typing.get_origin(kind) is tuple:
        return ",".join(_metavar(k) for k in _element_types(kind))
    return getattr(kind, "__name__", str(kind)).upper()


def _shown(value: Any) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, dict):
        return json.dumps(value, default=list)
    if isinstance(value, (tuple, list)):
        items = [",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v) for v in value]
        return " ".join(items) or "empty"
    return "''" if value == "" else str(value)


class _Collect(argparse.Action):
    """A tuple flag's values: its first use replaces the default, a later use adds to them."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest)
        before = [] if current is self.default else list(current)
        setattr(namespace, self.dest, before + list(values))


# -- parsers ---------------------------------------------------------------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description (an entry point's module docstring) as written."""


class ConfigParser(argparse.ArgumentParser):
    """argparse without abbreviated flags, accepting `--field_name` for `--field-name`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        known = self._option_string_actions
        for i, arg in enumerate(args):
            if arg == "--":
                break
            name, eq, value = arg.partition("=")
            if name.startswith("--") and "_" in name and name.replace("_", "-") in known:
                args[i] = name.replace("_", "-") + eq + value
        return super().parse_known_args(args, namespace)


def _summary(cls: type) -> str | None:
    """The first paragraph of a class's docstring; None for the signature dataclasses write when
    there is none."""
    doc = inspect.getdoc(cls)
    return None if not doc or doc.startswith(f"{cls.__name__}(") else doc.split("\n\n")[0]


def _default(f: dataclasses.Field, owner_default: Any) -> Any:
    if owner_default is not None:  # a nested field: the enclosing field's default instance decides
        return getattr(owner_default, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_config(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "", default: Any = None) -> None:
    """One flag per field of the dataclass `cls`, in a group of its own (see the module docstring);
    `default`, an instance of `cls`, gives the defaults instead of the fields' own."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    title = cls.__name__ + (f" (--{prefix[:-1].replace('_', '-')}-...)" if prefix else "")
    group = parser.add_argument_group(title, _summary(cls))
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind, dest, where = _without_none(hints[f.name]), prefix + f.name, f"{cls.__name__}.{f.name}"
        value = _default(f, default)
        if dataclasses.is_dataclass(kind):
            add_config(parser, kind, prefix=f"{dest}.", default=None if value is dataclasses.MISSING else value)
            continue
        flag = f.metadata.get("flag") or "--" + dest.replace(".", "-").replace("_", "-")
        shown = "required" if value is dataclasses.MISSING else f"default: {_shown(value)}"
        doc = docs.get(f.name)
        kwargs: dict[str, Any] = {"dest": dest, "help": (f"{doc} ({shown})" if doc else f"({shown})").replace("%", "%%")}
        if value is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = list(value) if isinstance(value, tuple) else value
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_variadic(kind):
            element = _element_types(kind)[0]
            kwargs.update(action=_Collect, nargs="*", type=_converter(element, where), metavar=_metavar(element))
        elif typing.get_origin(kind) is tuple:
            elements = _element_types(kind)
            if len(set(elements)) != 1:
                raise TypeError(f"{where}: a fixed-length tuple flag needs one element type, got {kind!r}")
            kwargs.update(nargs=len(elements), type=_converter(elements[0], where),
                          metavar=tuple(_metavar(k) for k in elements))
        else:
            kwargs.update(type=_converter(kind, where), metavar=_metavar(kind))
        if "choices" in f.metadata:  # argparse lists them in place of a metavar
            kwargs.update(choices=list(f.metadata["choices"]), metavar=None)
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        action = group.add_argument(flag, **kwargs)
        action.help = kwargs["help"]  # as given: some Pythons' BooleanOptionalAction appends the default again


def build_config(cls: type, args: argparse.Namespace, *, prefix: str = ""):
    """The dataclass `cls` from flags parsed by `add_config`'s parser: lists become tuples, nested
    dataclasses are built from their prefixed flags."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind, dest = _without_none(hints[f.name]), prefix + f.name
        if dataclasses.is_dataclass(kind):
            values[f.name] = build_config(kind, args, prefix=f"{dest}.")
        else:
            value = getattr(args, dest)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class Tracking:
    """Where the job logs to MLflow."""

    tracking_uri: str | None = None
    """MLflow tracking server or store; unset = MLFLOW_TRACKING_URI, else the run folder's
    sqlite:///<run_dir>/mlflow.db"""


def config_parser(cls: type, *, description: str | None = None, tracking: bool = False) -> ConfigParser:
    """The parser of one config, with `--tracking-uri` when `tracking`; the description defaults
    to the config's docstring."""
    parser = ConfigParser(description=description or _summary(cls))
    add_config(parser, cls)
    if tracking:
        add_config(parser, Tracking)
    return parser


def _build(parser: argparse.ArgumentParser, cls: type, args: argparse.Namespace):
    try:
        return build_config(cls, args)
    except (ValueError, TypeError) as exc:  # the config's own checks, reported as a usage error
        parser.error(str(exc))


def parse_config(cls: type, argv: Sequence[str] | None = None, *, description: str | None = None):
    """The dataclass `cls` from the command line (`argv`, default sys.argv[1:])."""
    parser = config_parser(cls, description=description)
    return _build(parser, cls, parser.parse_args(argv))


def parse_job(cls: type, argv: Sequence[str] | None = None, *, description: str | None = None
              ) -> tuple[Any, str | None]:
    """A job's config and its MLflow tracking URI (`--tracking-uri`; None when not given)."""
    parser = config_parser(cls, description=description, tracking=True)
    args = parser.parse_args(argv)
    return _build(parser, cls, args), args.tracking_uri


def parse_command(commands: dict[str, type], argv: Sequence[str] | None = None, *,
                  description: str | None = None, tracking: bool = True) -> tuple[str, Any, str | None]:
    """An entry point with one sub-command per config (`train.py vae ...`): the command given, its
    config and the MLflow tracking URI (`--tracking-uri`, when `tracking`; else None)."""
    parser = ConfigParser(description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(commands) + "}")
    parsers = {}
    for name, cls in commands.items():
        parsers[name] = sub.add_parser(name, help=_summary(cls), description=_summary(cls))
        add_config(parsers[name], cls)
        if tracking:
            add_config(parsers[name], Tracking)
    args = parser.parse_args(argv)
    return (args.command, _build(parsers[args.command], commands[args.command], args),
            getattr(args, "tracking_uri", None))
