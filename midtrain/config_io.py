"""Generic config plumbing: YAML files + dotted overrides -> validated pydantic models.

Every config in midtrain is a pydantic model with ``extra="forbid"``; this module turns pydantic's
errors into one message per problem that names the file and the dotted key path.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Strict, ValidationError

from midtrain.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def _absolute(path: str) -> str:
    # An empty path would silently become the current directory.
    if not path.strip():
        raise ValueError("an empty path")
    # Resolved once, at load time, so a job that runs elsewhere (Slurm, Ray) reads the same files.
    return os.path.abspath(os.path.expanduser(path))


AbsPath = Annotated[str, AfterValidator(_absolute)]
"""A filesystem path, made absolute against the current directory when the config is loaded."""


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a number is expected here, not a boolean")
    return value


# YAML reads yes/no/true/false (and on/off) as booleans, which pydantic would take as 1 and 0 (and
# a 1 as true): numbers refuse booleans, and flags are strict. Numbers stay lax otherwise: PyYAML
# reads `1e-3` (no dot) as a string, `2.0e+9` tokens as a float, and callers pass numpy ints.
Int = Annotated[int, BeforeValidator(_not_bool)]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, BeforeValidator(_not_bool)]


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, numbers are finite, values are
    validated on assignment."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False
    )

    def __eq__(self, other: object) -> bool:
        # Equal settings are equal configs: private bookkeeping (a mixture's source file) aside.
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  (mutable, as BaseModel)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML's default: the last wins)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Checked before the first flattening, which puts merged keys (`<<: *anchor`) beside the
        # node's own (these override them), also in an anchored node merged into another first.
        if id(node) not in self._checked:
            self._checked.add(id(node))
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if not isinstance(key, Hashable):
                    break  # SafeLoader's own error says so
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice", key_node.start_mark
                    )
                seen.add(key)
        super().flatten_mapping(node)


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader


def parse_yaml(text: str, source: str) -> Any:
    """``load_yaml_text``, with a YAML error as a ``ConfigError`` naming ``source`` and the line."""
    try:
        return load_yaml_text(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}{where}: not valid YAML: {problem}") from None


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file whose top level must be a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"
        )
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value); the value is parsed as YAML (``1e-3``, ``[1,2]``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key.path=value")
    raw = raw.strip()
    try:
        value = load_yaml_text(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    if "#" in raw and raw[0] not in "'\"[{":
        value = raw  # YAML would drop ` #...` as a comment: a plain value with `#` is text
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a nested mapping (in place) and return it.

    A numeric part indexes a list: ``mixture.sources.0.weight=0.5``.
    """
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path):
            where = ".".join(path[: i + 1])
            last = i == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {text!r}: {where} is not an item of the list")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(f"override {text!r}: {'.'.join(path[:i])} is not a section")
    return data


def format_validation_error(
    exc: ValidationError, source: str, sections: dict[str, str] | None = None
) -> str:
    """One line per error: ``SOURCE: key.path: problem``; ``sections`` names another source for
    the errors under a top-level key (a mixture read from its own file)."""
    lines = []
    for err in exc.errors():
        where = (sections or {}).get(str(err["loc"][0]), source) if err["loc"] else source
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        # A whole section as "input" is noise: the checks across keys name their keys themselves.
        section = isinstance(err.get("input"), (dict, list))
        if "input" in err and err["type"] not in ("missing", "extra_forbidden") and not section:
            shown = repr(err["input"])
            if len(shown) > 60:
                shown = shown[:57] + "..."
            msg = f"{msg} (got {shown})"
        lines.append(f"{where}: {loc}: {msg}" if loc else f"{where}: {msg}")
    return "\n".join(lines)


def validate(model: type[M], data: Any, source: str, sections: dict[str, str] | None = None) -> M:
    """Validate ``data`` as ``model``; errors name ``source`` (or, under a top-level key of
    ``sections``, the source given there) and each key path."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, sections)) from None


def load_config(model: type[M], path: str | Path, overrides: list[str] | None = None) -> M:
    """Load a YAML file as ``model`` after applying dotted overrides."""
    data = apply_overrides(load_yaml_mapping(path), overrides or [])
    return validate(model, data, str(path))


def dump_yaml(model: BaseModel) -> str:
    """The resolved form of a config, as YAML that ``load_config`` reads back to an equal model."""
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)
