"""One typed config per service: a dataclass whose field names are also the CLI
flags (``--max-num-seqs``), the environment variables (``CLEAVE_MAX_NUM_SEQS``)
and the Helm values (``maxNumSeqs``). Precedence: flag, then environment, then default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

T = TypeVar("T")
ENV_PREFIX = "CLEAVE_"


def cleave_home() -> Path:
    """Where Cleave keeps built models, logs and pid files: ``$CLEAVE_HOME``, else
    ``~/.cache/cleave``."""
    return Path(os.environ.get("CLEAVE_HOME") or "~/.cache/cleave").expanduser()


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def helm_key(field_name: str) -> str:
    head, *rest = field_name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _base_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


def parse_value(tp: Any, raw: str) -> Any:
    """Parse a flag or environment string into the field's type."""
    base = _base_type(tp)
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (item,) = typing.get_args(base)[:1]
        items = [parse_value(item, part.strip()) for part in raw.split(",") if part.strip()]
        return items if origin is list else tuple(items)
    if base is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if base in (int, float, str):
        return base(raw)
    raise TypeError(f"unsupported config type {tp!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        help_text = field.metadata.get("help", "")
        parser.add_argument(
            flag_name(field.name),
            dest=field.name,
            default=None,
            metavar=field.name.upper(),
            help=f"{help_text} (env {env_name(field.name)})".strip(),
            type=lambda raw, tp=hints[field.name]: parse_value(tp, raw),
        )


def from_namespace(cls: type[T], namespace: argparse.Namespace | None = None, environ: dict | None = None) -> T:
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        flag_value = getattr(namespace, field.name, None) if namespace is not None else None
        if flag_value is not None:
            values[field.name] = flag_value
        elif env_name(field.name) in environ:
            raw = environ[env_name(field.name)]
            try:
                values[field.name] = parse_value(hints[field.name], raw)
            except ValueError as exc:
                raise ValueError(f"{env_name(field.name)}={raw!r}: {exc}") from None
    return cls(**values)


def load(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None) -> T:
    """Build ``cls`` from command-line flags and ``CLEAVE_*`` environment variables."""
    parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    add_arguments(parser, cls)
    return from_namespace(cls, parser.parse_args(argv))
