"""Reading the JSON and JSONL files users give (annotations, predictions, proposals, boxes, manifests, converter inputs) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fineregion_pl.model.errors import BadInputError


def read_json_file(path: str | Path, what: str) -> Any:
    """A JSON (or JSONL, by suffix) file, with one line naming it when it is missing, not UTF-8, not
    JSON (truncated), or has an object naming a key twice (JSON would keep the last one silently)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as err:
        raise BadInputError(f"{path}: cannot read the {what} ({str(err).splitlines()[0]})") from None
    hook = _no_duplicate_keys(path)
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line, object_pairs_hook=hook))
                except json.JSONDecodeError as err:
                    raise BadInputError(f"{path}: line {number} is not JSON ({err.msg})") from None
        return rows
    try:
        return json.loads(text, object_pairs_hook=hook)
    except json.JSONDecodeError as err:
        raise BadInputError(f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}; truncated?)") from None


def _no_duplicate_keys(path: Path):
    """A ``json`` hook refusing an object that names a key twice (JSON keeps the last one silently)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise BadInputError(f"{path}: key {key!r} appears twice in one object (the first one would be lost)")
            out[key] = value
        return out

    return hook
