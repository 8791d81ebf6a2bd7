"""Validation at the boundaries, with pydantic: a value of the wrong type or range becomes one line
naming the file, the record and the field (:func:`validated`), never a traceback or a guess.

Models are strict (pydantic's ``strict=True``): no string is read as a number and no number as a
string, so ``"5599"`` is never a box. The schemas of the package's files live in
:mod:`fineregion_pl.data.schemas`; the options with a range in :func:`check_options`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from fineregion_pl.model.errors import BadInputError

M = TypeVar("M", bound=BaseModel)


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be finite")
    return value


FiniteFloat = Annotated[float, AfterValidator(_finite)]
Box4 = Annotated[list[FiniteFloat], Field(min_length=4, max_length=4)]
RegionId = Annotated[Any, AfterValidator(lambda v: _region_id(v))]


def _region_id(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("must be an integer or a string")
    return value


class Strict(BaseModel):
    """Base of the schemas: strict types, unknown fields kept (files grow fields over versions)."""

    model_config = ConfigDict(strict=True, extra="allow")


def _field(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def problem_of(error: ValidationError) -> str:
    """The first problem of a pydantic error as ``field a.b.0: <message> (got <value>)``."""
    return problem(error.errors(include_url=False)[0])


def problem(first: dict) -> str:
    """One pydantic error entry (``loc``, ``msg``, ``input``) as ``field a.b.0: <message> (got <value>)``."""
    got = repr(first.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    field = f"field {_field(first['loc'])}: " if first["loc"] else ""
    return f"{field}{first['msg'].removeprefix('Value error, ')} (got {got})"


def validated(model: type[M], value: Any, where: str) -> M:
    """``model.model_validate(value)``, or a one-line :class:`BadInputError` ``"<where>: field ...: ..."``."""
    try:
        return model.model_validate(value)
    except ValidationError as error:
        raise BadInputError(f"{where}: {problem_of(error)}") from None


def check_options(where: str, **rules: tuple[Any, str]) -> None:
    """Check option values against simple range rules, one line naming the first bad option.

    ``rules`` maps an option name to ``(value, rule)`` where ``rule`` is ``">=1"``, ``">=0"``,
    ``">0"`` (finite) or ``"0..1"``; ``None`` passes (an option left unset).
    """
    for name, (value, rule) in rules.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadInputError(f"{where}.{name} must be a finite number, not {value!r}")
        bad = {">=1": value < 1, ">=0": value < 0, ">0": value <= 0, "0..1": not 0 <= value <= 1}[rule]
        if bad:
            wanted = {">=1": "at least 1", ">=0": "at least 0", ">0": "greater than 0", "0..1": "between 0 and 1"}[rule]
            raise BadInputError(f"{where}.{name} must be {wanted}, not {value!r}")
