"""The study file: each rater's queue, saving, skipping, isolation between raters, durability, and the page's
behaviour (:class:`RatingSession`) without a browser."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rating_helpers import folder_predictions

from fineregion_pl.commands.rate.prepare import prepare
from fineregion_pl.commands.rate.store import Study
from fineregion_pl.model.errors import BadInputError

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"accuracy": 4, "relevance": 3, "fluency": 5}


@pytest.fixture
def study(tmp_path) -> Study:
    folder, files, _ = folder_predictions(tmp_path, images=3)
    prepare([str(f) for f in files], str(folder), study=str(tmp_path / "s.sqlite"), regions=4, raters=["ann", "ben"])
    return Study(tmp_path / "s.sqlite")


def test_each_rater_has_their_own_queue_in_study_order(study):
    order = []
    while (task := study.next_task("ann")) is not None:
        order.append((task.position, task.slot))
        study.save_rating("ann", task.caption_id, GOOD)
    assert order == [(p, s) for p in range(1, 5) for s in (1, 2)]
    assert study.progress("ann").rated == 8 and study.progress("ann").left == 0
    # ben has rated nothing and starts at the beginning; ann's ratings are not his
    assert study.progress("ben").rated == 0
    first = study.next_task("ben")
    assert (first.position, first.slot) == (1, 1)
    assert {r["rater"] for r in study.ratings()} == {"ann"}


def test_saving_again_replaces_the_raters_own_rating(study):
    task = study.next_task("ann")
    study.save_rating("ann", task.caption_id, GOOD)
    study.save_rating("ann", task.caption_id, {"accuracy": 1, "relevance": 1, "fluency": "2"})
    study.save_rating("ben", task.caption_id, GOOD)
    rows = sorted((r["rater"], r["accuracy"], r["relevance"], r["fluency"]) for r in study.ratings())
    assert rows == [("ann", 1, 1, 2), ("ben", 4, 3, 5)]


@pytest.mark.parametrize("scores, message", [
    ({"accuracy": 0, "relevance": 3, "fluency": 3}, "accuracy must be a whole number from 1 to 5, got 0"),
    ({"accuracy": 3, "relevance": 6, "fluency": 3}, "relevance must be a whole number from 1 to 5, got 6"),
    ({"accuracy": 3, "relevance": 3}, "fluency must be a whole number from 1 to 5, got None"),
    ({"accuracy": 3.5, "relevance": 3, "fluency": 3}, "accuracy must be a whole number from 1 to 5, got 3.5"),
    ({"accuracy": True, "relevance": 3, "fluency": 3}, "accuracy must be a whole number from 1 to 5, got True"),
])
def test_bad_scores_are_refused_and_nothing_is_written(study, scores, message):
    task = study.next_task("ann")
    with pytest.raises(BadInputError, match=message.replace("(", r"\(")):
        study.save_rating("ann", task.caption_id, scores)
    assert study.ratings() == []


def test_unknown_rater_caption_or_item_is_an_error(study):
    with pytest.raises(BadInputError, match="no rater 'eve'"):
        study.save_rating("eve", 1, GOOD)
    with pytest.raises(BadInputError, match="no caption 999"):
        study.save_rating("ann", 999, GOOD)
    with pytest.raises(BadInputError, match="no item 999"):
        study.skip_item("ann", 999, "why not")
    with pytest.raises(BadInputError, match="give a reason"):
        study.skip_item("ann", 1, "   ")
    assert not study.check_rater("eve", "anything")


def test_a_skipped_region_leaves_the_queue_and_the_report_with_its_reason(study):
    task = study.next_task("ann")
    study.save_rating("ann", task.caption_id, GOOD)  # rated one caption, then decided the region cannot be judged
    study.skip_item("ann", task.item_id, "the box does not mark a clear region")
    assert study.next_task("ann").position == 2
    progress = study.progress("ann")
    assert (progress.rated, progress.skipped, progress.left) == (0, 2, 6)
    assert study.ratings() == []
    assert study.skips() == [{"rater": "ann", "item": task.item_id, "reason": "the box does not mark a clear region"}]
    assert study.next_task("ben").position == 1  # ben's queue is his own


def test_tokens_are_checked_and_can_be_reissued(study):
    tokens = study.add_raters(["cat", "ann"])
    assert list(tokens) == ["cat"] and study.check_rater("cat", tokens["cat"])
    new = study.add_raters(["cat"], reissue=True)
    assert study.check_rater("cat", new["cat"]) and not study.check_rater("cat", tokens["cat"])
    with pytest.raises(BadInputError, match="rater name '' must be 1-64 characters"):
        study.add_raters([""])


def test_a_killed_writer_loses_no_committed_rating(study):
    """SIGKILL a process while it saves ratings: every rating it had reported as saved is in the file."""
    script = textwrap.dedent(f"""
        from fineregion_pl.commands.rate.store import Study
        study = Study({str(study.path)!r})
        for n in range(10_000):
            rater = ("ann", "ben")[n % 2]
            task = study.next_task(rater) or study.task(1 + n % 8)  # when done, keep re-saving
            study.save_rating(rater, task.caption_id, {{"accuracy": 1 + n % 5, "relevance": 2, "fluency": 3}})
            print(rater, task.caption_id, flush=True)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    reported = set()
    for line in process.stdout:
        rater, caption = line.split()
        reported.add((rater, int(caption)))
        if len(reported) == 11:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    with sqlite3.connect(study.path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = set(conn.execute("SELECT t.name, r.caption FROM ratings r JOIN raters t ON r.rater = t.id").fetchall())
    assert reported <= stored, f"reported as saved but not in the file: {reported - stored}"


# ---------------------------------------------------------------- the page's behaviour, no browser


def test_page_keeps_the_caption_until_all_three_criteria_are_rated(study):
    from fineregion_pl.commands.rate.page import RatingSession, caption_html

    session = RatingSession(study)
    view = session.view("ann")
    task = view["task"]
    assert view["progress"] == "**ann**: 0 of 8 captions rated, 8 left" and not view["done"]
    answer = session.save("ann", task.caption_id, {"accuracy": 4, "relevance": None, "fluency": 5})
    assert answer["status"] == "Not saved: rate relevance too (1-5)." and answer["keep"] and answer["task"].caption_id == task.caption_id
    answer = session.save("ann", task.caption_id, {"accuracy": 4, "relevance": 2, "fluency": 5})
    assert answer["status"] == f"Saved: region {task.position}, caption {task.slot} (accuracy 4, relevance 2, fluency 5)."
    assert answer["task"].caption_id != task.caption_id and answer["progress"].startswith("**ann**: 1 of 8")
    # a skip needs a reason; "other" takes the text under it
    assert session.skip("ann", answer["task"].caption_id, None, "")["status"].startswith("Not skipped: choose a reason")
    assert session.skip("ann", answer["task"].caption_id, "other (write it below)", "  ")["status"].startswith("Not skipped")
    skipped = session.skip("ann", answer["task"].caption_id, "other (write it below)", "caption is in French")
    assert skipped["status"] == f"Skipped region {task.position} (caption is in French)."
    assert study.skips()[0]["reason"] == "caption is in French"
    # model output is text, never markup
    assert "<script>" not in caption_html(study.task(1).__class__(**{**vars(study.task(1)), "text": "<script>x</script>"}))


def test_page_says_when_a_rater_is_done(study):
    from fineregion_pl.commands.rate.page import RatingSession

    session = RatingSession(study)
    while (task := study.next_task("ben")) is not None:
        session.save("ben", task.caption_id, GOOD)
    view = session.view("ben")
    assert view["done"] and view["task"] is None and view["progress"] == "**ben**: 8 of 8 captions rated, 0 left"


def test_serve_refuses_a_study_without_raters_and_a_busy_port(tmp_path, study):
    import socket

    from fineregion_pl.commands.rate.serve import serve

    folder, files, _ = folder_predictions(tmp_path / "other", images=2)
    prepare([str(f) for f in files], str(folder), study=str(tmp_path / "none.sqlite"), regions=2)
    with pytest.raises(BadInputError, match=r"has no raters yet: add them with --raters '\[alice, bob\]'"):
        serve(str(tmp_path / "none.sqlite"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(BadInputError, match=f"cannot listen on 127.0.0.1:{busy.getsockname()[1]}: the port is in use"):
            serve(str(study.path), port=busy.getsockname()[1])
    with pytest.raises(BadInputError, match="study not found"):
        serve(str(tmp_path / "missing.sqlite"))


def test_rate_is_a_verb_with_three_sub_verbs_and_one_line_errors(tmp_path, capsys):
    from fineregion_pl.commands.cli import main

    with pytest.raises(SystemExit) as done:
        main(["rate", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all(f"    {verb} " in out for verb in ("prepare", "serve", "report"))
    with pytest.raises(SystemExit) as failed:
        main(["rate", "report", str(tmp_path / "missing.sqlite")])
    assert failed.value.code == 1
    assert capsys.readouterr().err == f"fineregion-pl: error: study not found: {tmp_path / 'missing.sqlite'} (make one with `fineregion-pl rate prepare`)\n"
