"""YAML run configs -> frozen dataclasses, with ``key=value`` overrides and errors that name the key.

A run config is a tree of frozen dataclasses. :func:`load_config` reads a YAML file, applies dotted
overrides (``objective.psi=2.0``, ``rl.num_generations=8``) and builds the dataclass tree; an unknown
key or a value of the wrong type fails at start with the full dotted key in the message.

Numeric fields declare their allowed range once, next to their default (:func:`ranged`);
:func:`check_ranges` walks a built tree and names the first value out of range.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gdsd_jax.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A run config key or value is wrong; the message names the dotted key."""


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field: finite, within the given bounds (None: unbounded)."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    why: str = ""

    def contains(self, value: float) -> bool:
        # Written so that NaN fails every comparison, and inf fails the finiteness test.
        return ((isinstance(value, int) or math.isfinite(value))   # an int is finite (and may not fit a float)
                and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self, integer: bool) -> str:
        def g(x: float) -> str:  # integers in full (a seed bound 4294967295, not 4.29497e+09)
            return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"

        lo = f"[{g(self.ge)}" if self.ge is not None else f"({g(self.gt)}" if self.gt is not None else None
        hi = f"{g(self.le)}]" if self.le is not None else f"{g(self.lt)})" if self.lt is not None else None
        kind = "an integer" if integer else "a finite number"
        if lo and hi:
            text = f"{kind} in {lo}, {hi}"
        elif lo or hi:
            op, bound = ((">=", self.ge) if self.ge is not None else (">", self.gt) if self.gt is not None
                         else ("<=", self.le) if self.le is not None else ("<", self.lt))
            text = f"{kind} {op} {g(bound)}"
        else:
            text = kind
        return f"{text} ({self.why})" if self.why else text


def ranged(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, why: str = "") -> Any:
    """A dataclass field with a default and an allowed range (None is always allowed for optional fields)."""
    return dataclasses.field(default=default, metadata={"range": Range(ge, gt, le, lt, why)})


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Raise :class:`ConfigError` naming the first numeric field of a dataclass tree outside its range."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            check_ranges(value, key)
            continue
        rng = f.metadata.get("range")
        if rng is None or value is None:
            continue
        integer = int in (hints[f.name], *typing.get_args(hints[f.name]))
        if (isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
                or not rng.contains(value)):
            raise ConfigError(f"{key}={value!r}: expected {rng.describe(integer)}")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3). Values are parsed as YAML scalars/lists (``1e-3``, ``true``, ``[q,k]``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad override {item!r}: expected KEY=VALUE, e.g. objective.psi=2.0")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"bad override {item!r}: value is not valid YAML ({e})") from None
    return key.strip().split("."), value


def apply_overrides(tree: dict, overrides: Sequence[str]) -> dict:
    """Return a copy of ``tree`` with dotted ``key=value`` overrides applied."""
    out = copy.deepcopy(tree)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return out


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (tuple, list, Sequence):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return tuple(_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def build(cls: type[T], data: Mapping | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursively, rejecting unknown keys by dotted name.

    A class with a ``select_class(mapping) -> subclass`` classmethod is a tagged union: the subclass it
    returns for the mapping is built (it raises ``ValueError`` for a mapping that fits none).
    """
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    data = dict(data or {})
    select = getattr(cls, "select_class", None)
    if select is not None:
        # A tagged union (the objective's settings): the class asks the mapping which subclass it describes.
        try:
            cls = select(data)
        except ValueError as e:
            raise ConfigError(f"{prefix or 'config'}: {e}") from None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    removed = sorted(set(data) & set(getattr(cls, "REMOVED_KEYS", {})))
    if removed:
        where = f"{prefix}." if prefix else ""
        raise ConfigError("; ".join(f"config key {where + k!r} was removed ({cls.REMOVED_KEYS[k]}): "
                                    f"delete it from the config" for k in removed))
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key(s) {[where + k for k in unknown]}; "
                          f"valid keys{' under ' + prefix if prefix else ''}: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_type(value, hints[name], key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:      # the class's own checks (__post_init__), named by section
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain YAML/JSON-able dict."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first.line + 1}; the last would win)",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file; unreadable, non-UTF-8 or malformed files (a key repeated in one mapping
    included) name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"config file {str(p)!r}, line {line}: not UTF-8 text (byte {raw[e.start]:#04x} "
                          f"at offset {e.start}); save the file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {str(p)!r}{where}: malformed YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: expected a mapping at top level")
    return data


#: The embedded default run (the tiny Sudoku GDSD run), as a path below ``configs/``.
DEFAULT_CONFIG = "configs/sudoku_tiny.yaml"


def shipped_configs() -> Path:
    """The run configs shipped with the package: ``gdsd_jax/configs`` (package data in a wheel; in the
    source tree a link to the top-level ``configs/``, the one copy of the files)."""
    from importlib import resources

    return Path(str(resources.files("gdsd_jax") / "configs"))


def resolve_config_path(path: str | Path | None) -> Path:
    """A run config's file: ``path`` if it exists, otherwise the shipped config with the same path below
    ``configs/`` (``configs/llada_8b_math.yaml`` or ``llada_8b_math.yaml``), so the documented commands work
    from any directory after ``pip install``. ``None`` is :data:`DEFAULT_CONFIG`."""
    p = Path(DEFAULT_CONFIG if path is None else path)
    if p.is_file():
        return p
    below = Path(*p.parts[1:]) if p.parts[:1] == ("configs",) else p
    shipped = shipped_configs() / below
    if not p.is_absolute() and shipped.is_file():
        return shipped
    names = sorted(str(f.relative_to(shipped_configs())) for f in shipped_configs().rglob("*.yaml"))
    raise ConfigError(f"config file {str(p)!r} not found, and no shipped config has that name; shipped: {names}")


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = (),
                base: Mapping | None = None) -> T:
    """Read ``path`` (or start from ``base``), apply overrides, build ``cls``."""
    tree = dict(base or {})
    if path is not None:
        tree = read_yaml(path)
    tree = apply_overrides(tree, overrides)
    return build(cls, tree)
