"""How a tree of frozen dataclasses is read from YAML and ``section.key=value`` overrides:
type checks with the field's dotted name, unknown keys rejected with the known ones, and
each field's documentation read from the docstring under it. The fields themselves, their
defaults and their allowed ranges are in ``config.py``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that does not match the schema."""


class _NoAliases(yaml.SafeLoader):
    """YAML without anchors and aliases: a config needs none, and nested aliases expand
    exponentially (a 401-byte file held the loader for minutes)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ConfigError(f"line {mark.line + 1}: YAML aliases (*name) are not accepted in a config; "
                              "write the values out")
        return super().compose_node(parent, index)


def load_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML (safe types only, no aliases); errors name ``where``."""
    try:
        return yaml.load(text, Loader=_NoAliases)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None


def plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


_SCALARS = {  # field type: (accepts the value, what the error says is expected)
    bool: (lambda v: isinstance(v, bool), "true/false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the field's type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, name)
            except ConfigError:
                pass
        raise ConfigError(f"{name}: expected {tp}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, (str, int, float)) \
                and not isinstance(value, bool):
            value = [value]  # one item given alone: eval.datasets=/data/vstar_bench
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{name}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp in _SCALARS:
        accepts, what = _SCALARS[tp]
        if tp is int and isinstance(value, float) and value.is_integer():
            value = int(value)  # a whole number written as a float: train.max_steps=1e3
        if accepts(value):
            return float(value) if tp is float else value
        raise ConfigError(f"{name}: expected {what}, got {value!r}")
    raise ConfigError(f"{name}: unsupported field type {tp}")


def build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {known}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a mapping, got {value!r}")
            kwargs[name] = build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=1e-5", "rollout.group_size=4"]`` into a nested dict.

    Values are parsed as YAML, so ``1e-5`` is a float, ``true`` a bool, ``[a, b]`` a list.

    >>> parse_overrides(["train.lr=2e-6", "rollout.template=grpo"])
    {'train': {'lr': 2e-06}, 'rollout': {'template': 'grpo'}}
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        value = fix_yaml_floats(load_yaml(raw, f"override {item!r}")) if raw.strip() else ""
        _set_dotted(tree, key.strip(), value)
    return tree


def merge_trees(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


_EXP_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def fix_yaml_floats(tree: Any) -> Any:
    """YAML 1.1 reads ``1e-6`` as a string; turn such strings back into numbers."""
    if isinstance(tree, dict):
        return {k: fix_yaml_floats(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [fix_yaml_floats(v) for v in tree]
    if isinstance(tree, str) and _EXP_FLOAT.match(tree):
        return float(tree)
    return tree


def field_docs(cls: type, prefix: str = "") -> dict[str, str]:
    """Dotted field name -> its docstring, read from this module's source."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[prefix + node.target.id] = str(nxt.value.value)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            docs.update(field_docs(hints[f.name], f"{prefix}{f.name}."))
    return docs


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys (tuples as lists, as YAML and JSON store them).

    >>> flatten({"train": {"lr": 1e-6, "betas": (0.9, 0.999)}, "seed": 0})
    {'train.lr': 1e-06, 'train.betas': [0.9, 0.999], 'seed': 0}
    """
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out
