"""The rating page end to end, in one test and one headless Chromium: real predictions of a tiny model and its
no-region control, ``rate prepare``, ``rate serve`` (Gradio) driven by two scripted raters, the server killed
with SIGKILL mid-session and restarted (each rater resuming where they stopped), then ``rate report``.

The scripted raters are not people: each rates a caption from its words and the region's true shape
(read from the study file), see :func:`scripted_scores`. Their numbers test the kit, nothing else.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from front_doors import CHROMIUM, CHROMIUM_FLAGS, INSTALL  # the browser every front-door test drives

from fineregion_pl.commands.rate.store import CRITERIA, Study

ROOT = Path(__file__).resolve().parents[2]
MODELS = ["model", "no_region_control"]


@pytest.fixture(scope="module")
def browser_stack():
    """Skips (naming what is missing) unless chromium, gradio and playwright are installed."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium is not installed ({INSTALL})")
    for module in ("gradio", "playwright"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f'{module} is not installed (pip install -e ".[rate]"; {INSTALL})')


@pytest.fixture(scope="module")
def browser(browser_stack):
    """One headless Chromium for the module's tests (each rater gets a fresh context: cookies of their own)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def predictions(tmp_path_factory, stage2_checkpoint, synthetic_data) -> list[Path]:
    """``fineregion-pl predict`` on the synthetic test shards: the tiny model, then its no-region control."""
    from fineregion_pl.model.checkpoint_files import read_checkpoint
    from fineregion_pl.train.cli import run_lightning

    out = tmp_path_factory.mktemp("rate-predictions")
    hparams = read_checkpoint(stage2_checkpoint)["hyper_parameters"]
    config = {
        "model": {"class_path": "fineregion_pl.Stage2Module", "init_args": {k: hparams[k] for k in ("language_model", "init_from", "prompt_tokens", "prompt_hidden", "max_new_tokens")}},
        "data": {"data_dirs": [str(synthetic_data)], "image_size": 64, "eval_batch_size": 4, "num_workers": 0},
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "default_root_dir": str(out), "limit_predict_batches": 2},
    }
    (out / "predict.yaml").write_text(yaml.safe_dump(config))
    files = []
    for name, ignore in zip(MODELS, ("false", "true")):
        run_lightning(["predict", "--config", str(out / "predict.yaml"), "--ckpt_path", str(stage2_checkpoint),
                       "--model.init_args.ignore_regions", ignore, "--writer.output_dir", str(out / name)])
        files.append(out / name / "predictions.jsonl")
    return files


def scripted_scores(rater: int, caption: str, truth: dict) -> dict[str, int]:
    """What scripted rater 0 or 1 gives a caption of a region whose true record is ``truth``.

    Accuracy counts the caption's right words among size, colour and shape; relevance weighs the
    shape most; fluency loses a point for each flaw (leading punctuation, a question mark, a
    repeated word, a dangling last word). Rater 1 is stricter on accuracy and does not mind '?'.
    """
    words = caption.replace("?", " ").replace(":", " ").split()
    right = {"size": truth["attributes"]["size"] in words, "colour": truth["attributes"]["colour"] in words, "shape": truth["category"] in words}
    matches = sum(right.values())
    flaws = {"punctuation": caption[:1] in ":;,.?", "question": "?" in caption, "repeat": any(a == b for a, b in zip(words, words[1:])),
             "dangling": bool(words) and words[-1] in {"the", "on", "of", "below", "above", "a"}}
    if rater == 1:
        flaws["question"] = False
    accuracy = 1 + matches + (matches == 3) - (rater == 1 and 0 < matches < 3)
    relevance = 1 + 2 * right["shape"] + right["colour"] + right["size"]
    return {"accuracy": accuracy, "relevance": relevance, "fluency": max(1, 5 - sum(flaws.values()))}


def _outside_address() -> str | None:
    """A non-loopback address of this machine (None when it has none); a UDP connect sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RatingServer:
    """``python -m fineregion_pl rate serve STUDY`` in a subprocess."""

    def __init__(self, study: Path, port: int, log: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "a")
        self.log_path = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fineregion_pl", "rate", "serve", str(study), "--port", str(port)], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=self.log, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.process.stdout], daemon=True).start()

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if urllib.request.urlopen(self.url, timeout=2).status == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.log.flush()
        pytest.fail(f"rate serve did not start (exit code {self.process.poll()}):\n{self.log_path.read_text()[-3000:]}")

    def printed(self, wanted: str, timeout: float = 10) -> str:
        """What the server has printed, once it contains ``wanted`` (or after ``timeout`` seconds)."""
        text, deadline = "", time.monotonic() + timeout
        while wanted not in text and time.monotonic() < deadline:
            try:
                text += self.lines.get(timeout=0.5)
            except queue.Empty:
                pass
        return text

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def _truth(study: Path) -> dict[int, dict]:
    """The true region record (shape, colour, size) of each region position of a study, from its shards."""
    import webdataset as wds

    from fineregion_pl.data.shards import split_shards

    with sqlite3.connect(study) as conn:
        shards = Path(json.loads(conn.execute("SELECT value FROM study WHERE key = 'images'").fetchone()[0]))
        where = conn.execute("SELECT i.position, m.image_id, i.region_id FROM items i JOIN images m ON i.image = m.id").fetchall()
    records = {}
    for sample in wds.DataPipeline(wds.SimpleShardList(split_shards(shards, "test")), wds.tarfile_to_samples()):
        record = json.loads(sample["json"])
        records[record["image_id"]] = {r["id"]: r for r in record["regions"]}
    return {position: records[image_id][json.loads(region_id)] for position, image_id, region_id in where}


def _stored(study: Path) -> dict[tuple[str, int, int], dict[str, int]]:
    """``{(rater, region position, caption slot): scores}`` as in the file."""
    with sqlite3.connect(study) as conn:
        rows = conn.execute("SELECT t.name, i.position, c.slot, r.accuracy, r.relevance, r.fluency FROM ratings r JOIN raters t ON r.rater = t.id "
                            "JOIN captions c ON r.caption = c.id JOIN items i ON c.item = i.id").fetchall()
    return {(name, position, slot): dict(zip(CRITERIA, values)) for name, position, slot, *values in rows}


def login(page, url: str, name: str, token: str) -> None:
    page.goto(url)
    page.get_by_label("username").fill(name)
    page.get_by_label("password").fill(token)
    page.get_by_role("button", name="Login").click()
    page.locator("#caption .rate-caption").wait_for()


def on_page(page) -> tuple[int, int, str]:
    """``(region position, caption slot, caption text)`` the page shows."""
    from playwright.sync_api import expect

    expect(page.locator("#caption .rate-where")).to_have_text(re.compile(r"Region \d+, caption \d+ of \d+"))
    where = re.search(r"Region (\d+), caption (\d+)", page.inner_text("#caption .rate-where"))
    return int(where.group(1)), int(where.group(2)), page.inner_text("#caption .rate-caption")


def rate_on_page(page, scores: dict[str, int], keyboard: bool) -> None:
    """Rate the caption on the page (keys 1-5 and Enter, or mouse clicks) and wait until the page says saved."""
    from playwright.sync_api import expect

    position, slot, _ = on_page(page)
    if keyboard:
        page.locator("body").click(position={"x": 5, "y": 5})  # focus the page, not a text field
        for criterion in CRITERIA:
            page.keyboard.press(str(scores[criterion]))
        for criterion in CRITERIA:  # the keys reached the right radios before saving
            expect(page.locator(f"#{criterion} input[value='{scores[criterion]}']")).to_be_checked()
        page.keyboard.press("Enter")
    else:
        for criterion in CRITERIA:
            page.locator(f"#{criterion} input[value='{scores[criterion]}']").click()
        page.click("#save")
    values = ", ".join(f"{c} {scores[c]}" for c in CRITERIA)
    expect(page.locator("#status")).to_have_text(f"Saved: region {position}, caption {slot} ({values}).")


def scripted_turn(page, rater: int, truth: dict[int, str], keyboard: bool, expected: dict, name: str) -> None:
    position, slot, caption = on_page(page)
    scores = scripted_scores(rater, caption, truth[position])
    rate_on_page(page, scores, keyboard)
    expected[(name, position, slot)] = scores


def _shards_of(predictions: list[Path]) -> Path:
    config = yaml.safe_load((predictions[0].parents[1] / "predict.yaml").read_text())
    return Path(config["data"]["data_dirs"][0])


def _rate(cli: list[str]) -> subprocess.CompletedProcess:
    """``python -m fineregion_pl rate ...`` from this checkout."""
    return subprocess.run([sys.executable, "-m", "fineregion_pl", "rate", *cli], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def _done(page) -> bool:
    return page.locator("#caption .rate-where").count() == 0


@pytest.mark.slow
def test_two_raters_through_the_page_survive_a_sigkill_resume_and_the_report_prints_their_table(browser, predictions, tmp_path):
    """One study, one Chromium, two scripted raters: rate, SIGKILL the server mid-session, restart, resume, finish, report."""
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    study = tmp_path / "study.sqlite"
    prepared = _rate(["prepare", json.dumps([str(p) for p in predictions]), str(_shards_of(predictions)), "--study", str(study),
                      "--names", json.dumps(MODELS), "--regions", "6", "--stratify", "category", "--raters", '["scripted-1", "scripted-2"]'])
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert "6 regions x 2 models = 12 captions to rate per rater" in prepared.stdout
    tokens = dict(re.findall(r"rater (\S+): token (\S+)", prepared.stdout))
    truth, port = _truth(study), _free_port()
    expected: dict = {}
    first, second = browser.new_context().new_page(), browser.new_context().new_page()
    turns = ((first, 0, "scripted-1", True), (second, 1, "scripted-2", False))  # one rater uses the keys, the other the mouse

    server = RatingServer(study, port, tmp_path / "serve.log")
    try:
        server.wait_ready()
        # loopback only by default: the page is not reachable on the machine's other address
        announced = f"rating page: http://127.0.0.1:{port}  (log in with a rater name and its token"
        assert announced in server.printed(announced)
        if (outside := _outside_address()) is not None:
            with pytest.raises(OSError):
                socket.create_connection((outside, port), timeout=2).close()
        # without logging in nothing of the study is served; a wrong token is a 4xx, and the server serves on
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"{server.url}/gradio_api/queue/join", data=b"{}", headers={"Content-Type": "application/json"}))
        assert refused.value.code == 401
        wrong = urllib.parse.urlencode({"username": "scripted-1", "password": "not-the-token"}).encode()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"{server.url}/login", data=wrong))
        assert refused.value.code == 400

        login(first, server.url, "scripted-1", tokens["scripted-1"])
        login(second, server.url, "scripted-2", tokens["scripted-2"])
        expect(first.locator("#progress")).to_have_text("scripted-1: 0 of 12 captions rated, 12 left")
        scripted_turn(first, 0, truth, True, expected, "scripted-1")
        scripted_turn(first, 0, truth, True, expected, "scripted-1")
        # the second rater's page knows nothing of the first's ratings: same first caption, nothing rated
        expect(second.locator("#progress")).to_have_text("scripted-2: 0 of 12 captions rated, 12 left")
        assert on_page(second)[:2] == (1, 1)
        second.reload()
        expect(second.locator("#progress")).to_have_text("scripted-2: 0 of 12 captions rated, 12 left")
        assert "scripted-1" not in second.inner_text("body")
        for _ in range(3):
            for page, rater, name, keyboard in turns:
                scripted_turn(page, rater, truth, keyboard, expected, name)
        # 5 and 3 saved; the first rater is half-way through the next caption (two criteria chosen) when the server dies
        first.locator("#accuracy input[value='1']").click()
        first.locator("#relevance input[value='1']").click()
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=20)
    finally:
        server.stop(signal.SIGKILL)
    assert server.process.returncode == -signal.SIGKILL
    assert _stored(study) == expected  # every rating the page showed as saved, and nothing else

    server = RatingServer(study, port, tmp_path / "serve.log")
    try:
        server.wait_ready()
        opened = Study(study)
        # 2 captions per region, in study order: one rater stopped after region 3's first caption, the other after region 2's
        for page, name, rated, resume in ((first, "scripted-1", 5, (3, 2)), (second, "scripted-2", 3, (2, 2))):
            login(page, server.url, name, tokens[name])  # the server forgot its sessions: log in again
            expect(page.locator("#progress")).to_have_text(f"{name}: {rated} of 12 captions rated, {12 - rated} left")
            task = opened.next_task(name)
            assert (task.position, task.slot) == resume and on_page(page) == (*resume, task.text)
            for criterion in CRITERIA:
                expect(page.locator(f"#{criterion} input:checked")).to_have_count(0)
        # both rate on to the end, turn by turn; the second rater skips region 3 with a reason
        while not (_done(first) and _done(second)):
            for page, rater, name, keyboard in turns:
                if _done(page):
                    continue
                if name == "scripted-2" and on_page(page)[0] == 3:
                    page.get_by_text("Skip this region").click()
                    page.locator("#skip-reason input").click()
                    page.get_by_role("option", name="the box does not mark a clear region").click()
                    page.click("#skip")
                    expect(page.locator("#status")).to_have_text("Skipped region 3 (the box does not mark a clear region).")
                    continue
                scripted_turn(page, rater, truth, keyboard, expected, name)
        for page, name, rated, skipped in ((first, "scripted-1", 12, ""), (second, "scripted-2", 10, ", 2 skipped")):
            expect(page.locator("#caption")).to_contain_text("All captions are rated. Thank you!")
            expect(page.locator("#progress")).to_have_text(f"{name}: {rated} of 12 captions rated{skipped}, 0 left")
    finally:
        server.stop()
        for page in (first, second):
            page.context.close()
    # exactly what the scripted raters entered is in the study
    assert _stored(study) == expected

    report = _rate(["report", str(study), "--reference", "no_region_control"])
    assert report.returncode == 0, report.stderr[-3000:]
    print(report.stdout)
    assert "## Table 3" in report.stdout and "| model | accuracy | relevance | fluency | ratings | raters |" in report.stdout
    with sqlite3.connect(study) as conn:
        model_of = dict(conn.execute("SELECT i.position || '/' || c.slot, m.name FROM captions c JOIN items i ON c.item = i.id JOIN models m ON c.model = m.id"))
    for model in MODELS:
        rows = [s for (name, position, slot), s in expected.items() if model_of[f"{position}/{slot}"] == model and not (name == "scripted-2" and position == 3)]
        line = next(line for line in report.stdout.splitlines() if line.startswith(f"| {model} | ") and "[" in line)
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for criterion, cell in zip(CRITERIA, cells[1:4]):
            assert float(cell.split(" [")[0]) == pytest.approx(sum(r[criterion] for r in rows) / len(rows), abs=0.005), (criterion, line)
        assert cells[4:] == [str(len(rows)), "2"], line
    assert "| the box does not mark a clear region | 1 |" in report.stdout
    assert "## Against the reference: no_region_control" in report.stdout
    saved = json.loads((tmp_path / "study_report" / "report.json").read_text())
    assert saved["raters"] == {"scripted-1": {"rated": 12, "skipped": 0, "left": 0}, "scripted-2": {"rated": 10, "skipped": 2, "left": 0}}
    assert (tmp_path / "study_report" / "distributions.png").stat().st_size > 10_000
