"""Typed config groups: dataclasses on the command line, plain dicts inside checkpoints.

LightningCLI shows a dataclass argument as a nested group with its defaults. Checkpoints keep
hyper-parameters as plain dicts, so they load with ``torch.load(weights_only=True)`` and
``load_from_checkpoint`` hands the dicts back to ``__init__``, where :func:`as_config` turns them
into the dataclass again.
"""

from __future__ import annotations

from dataclasses import asdict, fields, is_dataclass
from typing import Any, Optional, TypeVar, get_type_hints

T = TypeVar("T")


def as_config(cls: type[T], value: Any) -> T:
    """``value`` as a ``cls`` dataclass: a ``cls`` is returned as is, a dict is checked and converted
    (nested dataclass fields too)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; known keys: {sorted(known)}")
        hints = get_type_hints(cls)
        converted = {}
        for key, item in value.items():
            kind = hints.get(key)
            converted[key] = as_config(kind, item) if isinstance(item, dict) and is_dataclass(kind) else item
        return cls(**converted)
    raise TypeError(f"expected a {cls.__name__} or a dict, got {type(value).__name__}")


def plain_hparams(hparams: dict) -> None:
    """Replace dataclass values of a module's ``hparams`` by dicts, in place."""
    for key, value in list(hparams.items()):
        if is_dataclass(value) and not isinstance(value, type):
            hparams[key] = asdict(value)


def optional_config(cls: type[T], value: Any) -> Optional[T]:
    """Like :func:`as_config` but ``None`` stays ``None``."""
    return None if value is None else as_config(cls, value)
