"""Which base language model a stage-2 checkpoint was trained on, beyond its name.

A stage-2 checkpoint leaves the frozen base LM out and reloads it from ``name_or_path``; a
different LM of the same shape at that path (re-downloaded, fine-tuned in place, another
revision) would load without a word and give other captions. :func:`lm_fingerprint` records what
the weights are: for a local folder the SHA-256 of its weight files (names and bytes), for a hub
name the revision (commit) transformers resolved. :func:`check_fingerprint` compares.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from fineregion_pl.model.errors import BadInputError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@lru_cache(maxsize=8)
def _folder_digest(folder: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        digest.update(str(path.relative_to(folder)).encode("utf-8") + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def lm_fingerprint(name_or_path: str, model: Optional[Any] = None) -> dict[str, str]:
    """``{"sha256": ...}`` of a local folder's weight files, else ``{"revision": commit}`` from
    ``model.config._commit_hash`` (hub models), else ``{}`` (nothing to compare)."""
    folder = Path(name_or_path)
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)  # re-hash only when files change
        return {"sha256": _folder_digest(str(folder.resolve()), stamp)}
    config = getattr(model, "config", None)
    revision = getattr(config, "_commit_hash", None)
    return {"revision": str(revision)} if revision else {}


def check_fingerprint(recorded: Optional[dict], name_or_path: str, model: Optional[Any], source: str, allow_other: bool) -> Optional[str]:
    """Compare a checkpoint's recorded fingerprint with the base LM loaded now.

    Returns a warning text when nothing can be compared (an older checkpoint without one);
    raises a one-line :class:`BadInputError` on a mismatch unless ``allow_other``.
    """
    if not recorded:
        return f"{source} records no fingerprint of its base LM (older checkpoint): cannot check that {name_or_path} is the LM it was trained on"
    current = lm_fingerprint(name_or_path, model)
    common = set(recorded) & set(current)
    if not common or all(recorded[k] == current[k] for k in common) or allow_other:
        return None
    key = sorted(common)[0]
    raise BadInputError(
        f"{source} was trained on a different base LM than the one at {name_or_path} ({key} {recorded[key][:12]}... vs {current[key][:12]}...): "
        "its captions would be wrong; point language_model.name_or_path at the original, or allow_other_base_lm=True to load anyway"
    )
