"""Reading the JSON and JSONL files users give (annotations, predictions, proposals, boxes) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fineregion_pl.model.errors import BadInputError


def read_json_file(path: Path, what: str) -> Any:
    """A JSON (or JSONL, by suffix) file, with one-line errors for a missing or malformed file."""
    if not path.is_file():
        raise BadInputError(f"{what} not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise BadInputError(f"{path}: line {number} is not JSON ({err.msg})") from None
        return rows
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BadInputError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from None
