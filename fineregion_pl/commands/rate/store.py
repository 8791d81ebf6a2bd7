"""A rating study in one SQLite file: the sampled regions, their blinded captions, raters and ratings.

Tables (``sqlite3``, foreign keys on, WAL journal, ``synchronous=FULL``)::

    study    (key, value)                          what made the study (JSON values)
    models   (id, name, file, sha256)              never shown to raters
    images   (id, image_id, width, height, data)   the image bytes: the file is the whole study
    items    (id, position, image, region_id, box, source, category, stratum)
    captions (id, item, slot, model, text)         slot = the caption's place in its item (random)
    raters   (id, name, token_sha256, created)
    ratings  (rater, caption, accuracy, relevance, fluency, saved)   one row per rater and caption
    skips    (rater, item, reason, saved)                            one row per rater and skipped item

Every write is one transaction, committed before the call returns, so whatever the page has shown
as saved is on disk and survives the server being killed. Raters are checked by a token whose
SHA-256 is stored (the token itself is printed once, when it is made).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fineregion_pl.model.errors import BadInputError

KIND = "fineregion-pl rating study"
FORMAT = 1
CRITERIA = ("accuracy", "relevance", "fluency")
SCALE = (1, 2, 3, 4, 5)

SCHEMA = """
CREATE TABLE study (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE models (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, file TEXT NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE images (id INTEGER PRIMARY KEY, image_id TEXT NOT NULL UNIQUE, width INTEGER NOT NULL, height INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE items (
    id INTEGER PRIMARY KEY, position INTEGER NOT NULL UNIQUE, image INTEGER NOT NULL REFERENCES images(id),
    region_id TEXT NOT NULL, box TEXT NOT NULL, source TEXT, category TEXT, stratum TEXT NOT NULL
);
CREATE TABLE captions (
    id INTEGER PRIMARY KEY, item INTEGER NOT NULL REFERENCES items(id), slot INTEGER NOT NULL,
    model INTEGER NOT NULL REFERENCES models(id), text TEXT NOT NULL, UNIQUE (item, slot), UNIQUE (item, model)
);
CREATE TABLE raters (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_sha256 TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE ratings (
    rater INTEGER NOT NULL REFERENCES raters(id), caption INTEGER NOT NULL REFERENCES captions(id),
    accuracy INTEGER NOT NULL CHECK (accuracy BETWEEN 1 AND 5), relevance INTEGER NOT NULL CHECK (relevance BETWEEN 1 AND 5),
    fluency INTEGER NOT NULL CHECK (fluency BETWEEN 1 AND 5), saved TEXT NOT NULL, PRIMARY KEY (rater, caption)
);
CREATE TABLE skips (
    rater INTEGER NOT NULL REFERENCES raters(id), item INTEGER NOT NULL REFERENCES items(id), reason TEXT NOT NULL,
    saved TEXT NOT NULL, PRIMARY KEY (rater, item)
);
"""

# the rater's queue: items in their (random) study order, each item's captions in their (random) slots
NEXT_TASK = """
SELECT c.id FROM captions c JOIN items i ON c.item = i.id
WHERE NOT EXISTS (SELECT 1 FROM ratings r WHERE r.rater = :rater AND r.caption = c.id)
  AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.rater = :rater AND s.item = i.id)
ORDER BY i.position, c.slot LIMIT 1
"""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass
class Task:
    """One caption of one region as a rater sees it (no model name)."""

    caption_id: int
    item_id: int
    position: int  # 1-based place of the item in the study
    slot: int  # 1-based place of the caption within its item
    captions_in_item: int
    text: str
    box: list[float]
    image: bytes


@dataclass
class Progress:
    """How far a rater is: captions rated (outside skipped items), captions of skipped items, captions in the study."""

    rated: int
    skipped: int
    total: int

    @property
    def left(self) -> int:
        return self.total - self.rated - self.skipped


def create_study(path: str | Path, settings: dict[str, Any], models: Sequence[dict], images: Sequence[dict], items: Sequence[dict]) -> Path:
    """Write a new study file (atomically: it appears under ``path`` only when complete).

    Args:
        path: the study file; must not exist (a study's ratings are never overwritten).
        settings: what made the study (seed, sample size, stratification, source files), kept in ``study``.
        models: ``{"name", "file", "sha256"}`` in the order given by the user.
        images: ``{"image_id", "width", "height", "data"}``.
        items: in study order, ``{"image_id", "region_id", "box", "source", "category", "stratum",
            "captions": [(model_index, text), ...]}`` with captions in the order raters see them.
    """
    path = Path(path)
    if path.exists():
        raise BadInputError(f"{path} already exists: a study is never overwritten (its ratings would be lost); choose another --study path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    try:
        conn.executescript(SCHEMA)
        meta = {"kind": KIND, "format": FORMAT, "created": _now(), "criteria": list(CRITERIA), "scale": list(SCALE), **settings}
        conn.executemany("INSERT INTO study VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        conn.executemany("INSERT INTO models (id, name, file, sha256) VALUES (?, ?, ?, ?)",
                         [(n + 1, m["name"], m["file"], m["sha256"]) for n, m in enumerate(models)])
        image_rows = {}
        for n, image in enumerate(images, 1):
            conn.execute("INSERT INTO images VALUES (?, ?, ?, ?, ?)", (n, str(image["image_id"]), image["width"], image["height"], image["data"]))
            image_rows[str(image["image_id"])] = n
        for position, item in enumerate(items, 1):
            cursor = conn.execute(
                "INSERT INTO items (position, image, region_id, box, source, category, stratum) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (position, image_rows[str(item["image_id"])], json.dumps(item["region_id"]), json.dumps(item["box"]), item.get("source"), item.get("category"), item["stratum"]),
            )
            conn.executemany("INSERT INTO captions (item, slot, model, text) VALUES (?, ?, ?, ?)",
                             [(cursor.lastrowid, slot, model + 1, text) for slot, (model, text) in enumerate(item["captions"], 1)])
        conn.commit()
    finally:
        conn.close()
    os.replace(tmp, path)
    return path


class Study:
    """An existing study file; every method opens its own connection (safe from any server thread)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise BadInputError(f"study not found: {self.path} (make one with `fineregion-pl rate prepare`)")
        try:
            with self._connect() as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                meta = dict(conn.execute("SELECT key, value FROM study").fetchall())
        except sqlite3.DatabaseError as err:
            raise BadInputError(f"{self.path} is not a rating study ({err})") from None
        self.settings = {k: json.loads(v) for k, v in meta.items()}
        if self.settings.get("kind") != KIND:
            raise BadInputError(f"{self.path} is not a rating study (no '{KIND}' record)")
        if self.settings.get("format") != FORMAT:
            raise BadInputError(f"{self.path} is a study of format {self.settings.get('format')}; this fineregion-pl reads format {FORMAT}")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # transactions are explicit
        try:
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=FULL")
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed (on disk) when the block ends without an error."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # ------------------------------------------------------------------ raters
    def add_raters(self, names: Sequence[str], reissue: bool = False) -> dict[str, str]:
        """Make a token for each new name (and, with ``reissue``, a new one for existing names).

        Returns ``{name: token}`` for the tokens made; the tokens are not stored, only their hashes.
        """
        tokens = {}
        with self._write() as conn:
            for raw in names:
                name = str(raw).strip()
                if not name or len(name) > 64 or any(ch in name for ch in "\n\r\t"):
                    raise BadInputError(f"rater name {raw!r} must be 1-64 characters on one line")
                exists = conn.execute("SELECT 1 FROM raters WHERE name = ?", (name,)).fetchone()
                if exists and not reissue:
                    continue
                token = secrets.token_urlsafe(12)
                if exists:
                    conn.execute("UPDATE raters SET token_sha256 = ? WHERE name = ?", (_token_hash(token), name))
                else:
                    conn.execute("INSERT INTO raters (name, token_sha256, created) VALUES (?, ?, ?)", (name, _token_hash(token), _now()))
                tokens[name] = token
        return tokens

    def check_rater(self, name: str, token: str) -> bool:
        """Whether ``token`` is ``name``'s token."""
        with self._connect() as conn:
            row = conn.execute("SELECT token_sha256 FROM raters WHERE name = ?", (str(name),)).fetchone()
        return row is not None and secrets.compare_digest(row[0], _token_hash(str(token)))

    def raters(self) -> list[str]:
        """Rater names, in the order they were added."""
        with self._connect() as conn:
            return [name for (name,) in conn.execute("SELECT name FROM raters ORDER BY id")]

    def _rater_id(self, conn: sqlite3.Connection, name: str) -> int:
        row = conn.execute("SELECT id FROM raters WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise BadInputError(f"no rater {name!r} in {self.path}")
        return row[0]

    # ------------------------------------------------------------------ a rater's queue
    def next_task(self, rater: str) -> Optional[Task]:
        """The first caption the rater has neither rated nor skipped, or None when they are done."""
        with self._connect() as conn:
            row = conn.execute(NEXT_TASK, {"rater": self._rater_id(conn, rater)}).fetchone()
        return None if row is None else self.task(row[0])

    def task(self, caption_id: int) -> Task:
        """The caption ``caption_id`` with its region and image, as raters see it."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT c.id, i.id, i.position, c.slot, (SELECT COUNT(*) FROM captions o WHERE o.item = i.id), c.text, i.box, m.data "
                "FROM captions c JOIN items i ON c.item = i.id JOIN images m ON i.image = m.id WHERE c.id = ?",
                (int(caption_id),),
            ).fetchone()
        if row is None:
            raise BadInputError(f"no caption {caption_id} in {self.path}")
        return Task(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]), row[7])

    def progress(self, rater: str) -> Progress:
        """Captions rated, captions in skipped items and captions in the study, for one rater."""
        with self._connect() as conn:
            rater_id = self._rater_id(conn, rater)
            rated = conn.execute(
                "SELECT COUNT(*) FROM ratings r JOIN captions c ON r.caption = c.id WHERE r.rater = ? "
                "AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.rater = r.rater AND s.item = c.item)", (rater_id,),
            ).fetchone()[0]
            skipped = conn.execute("SELECT COUNT(*) FROM captions c JOIN skips s ON s.item = c.item WHERE s.rater = ?", (rater_id,)).fetchone()[0]
            total = conn.execute("SELECT COUNT(*) FROM captions").fetchone()[0]
        return Progress(rated, skipped, total)

    # ------------------------------------------------------------------ writes
    def save_rating(self, rater: str, caption_id: int, scores: dict[str, Any]) -> dict[str, int]:
        """Store (or replace) the rater's scores for one caption; committed when this returns."""
        checked = {}
        for criterion in CRITERIA:
            value = scores.get(criterion)
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value not in SCALE:
                raise BadInputError(f"{criterion} must be a whole number from 1 to 5, got {value!r}")
            checked[criterion] = value
        with self._write() as conn:
            rater_id = self._rater_id(conn, rater)
            if conn.execute("SELECT 1 FROM captions WHERE id = ?", (int(caption_id),)).fetchone() is None:
                raise BadInputError(f"no caption {caption_id} in {self.path}")
            conn.execute(
                "INSERT INTO ratings VALUES (:rater, :caption, :accuracy, :relevance, :fluency, :saved) "
                "ON CONFLICT (rater, caption) DO UPDATE SET accuracy = :accuracy, relevance = :relevance, fluency = :fluency, saved = :saved",
                {"rater": rater_id, "caption": int(caption_id), "saved": _now(), **checked},
            )
        return checked

    def skip_item(self, rater: str, item_id: int, reason: str) -> None:
        """Leave out an item (all its captions) for this rater, with a reason; committed when this returns."""
        reason = " ".join(str(reason or "").split())
        if not reason:
            raise BadInputError("give a reason to skip this region")
        if len(reason) > 300:
            raise BadInputError(f"the reason is {len(reason)} characters long; at most 300")
        with self._write() as conn:
            rater_id = self._rater_id(conn, rater)
            if conn.execute("SELECT 1 FROM items WHERE id = ?", (int(item_id),)).fetchone() is None:
                raise BadInputError(f"no item {item_id} in {self.path}")
            conn.execute(
                "INSERT INTO skips VALUES (?, ?, ?, ?) ON CONFLICT (rater, item) DO UPDATE SET reason = excluded.reason, saved = excluded.saved",
                (rater_id, int(item_id), reason, _now()),
            )

    # ------------------------------------------------------------------ for the report (unblinded)
    def models(self) -> list[str]:
        """Model names in the order the study was made with."""
        with self._connect() as conn:
            return [name for (name,) in conn.execute("SELECT name FROM models ORDER BY id")]

    def ratings(self) -> list[dict]:
        """Every rating with its rater, item and model names: ``{rater, item, model, accuracy, relevance, fluency}``.

        Ratings of an item the rater skipped (possibly after rating some of its captions) are left
        out: the rater said the region cannot be judged."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT t.name, c.item, m.name, r.accuracy, r.relevance, r.fluency FROM ratings r "
                "JOIN raters t ON r.rater = t.id JOIN captions c ON r.caption = c.id JOIN models m ON c.model = m.id "
                "WHERE NOT EXISTS (SELECT 1 FROM skips s WHERE s.rater = r.rater AND s.item = c.item) ORDER BY r.rater, c.item, c.slot"
            ).fetchall()
        return [dict(zip(("rater", "item", "model", *CRITERIA), row)) for row in rows]

    def skips(self) -> list[dict]:
        """Every skip: ``{rater, item, reason}``."""
        with self._connect() as conn:
            rows = conn.execute("SELECT t.name, s.item, s.reason FROM skips s JOIN raters t ON s.rater = t.id ORDER BY s.rater, s.item").fetchall()
        return [{"rater": r, "item": i, "reason": reason} for r, i, reason in rows]

    def counts(self) -> dict[str, int]:
        """Items, captions and images in the study."""
        with self._connect() as conn:
            return {table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in ("items", "captions", "images")}
