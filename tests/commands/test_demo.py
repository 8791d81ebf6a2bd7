"""The web demo: its request handling and messages without a browser, then end to end in headless Chromium.

The end-to-end test starts ``python -m fineregion_pl.commands.demo`` (the function ``fineregion-pl demo``
runs) on a loopback port with a tiny trained stage-2 checkpoint, opens the page in Debian's
Chromium through Playwright, uploads an image, types two boxes, presses Describe and reads the two
captions back; they must be the captions the Python API gives for the same image and boxes.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_trainer
from learning import first_batch, fixed_batch_loader
from PIL import Image

from fineregion_pl.commands.demo import NO_MODEL, DemoService, load_captioner, parse_boxes, synthetic_examples
from fineregion_pl.data.image_folder import BadInputError
from fineregion_pl.data.synthetic import make_scene

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
INSTALL = "bash .ci/install-demo.sh installs it"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class StubCaptioner:
    """Stands in for RegionCaptioner: records each describe call, answers one row per box."""

    def __init__(self, error: Exception | None = None):
        self.calls: list[tuple[tuple[int, int], list]] = []
        self.error = error

    def describe(self, image, boxes, ids=None):
        self.calls.append((image.size, [list(b) for b in boxes]))
        if self.error is not None:
            raise self.error
        return [{"region_id": i, "box": list(b), "caption": f"region {i}", "category": "circle", "category_id": 0, "score": 0.5 + i / 100}
                for i, b in enumerate(boxes)]


@pytest.fixture(scope="module")
def scene():
    return make_scene(0, "test", 0)


@pytest.fixture
def service():
    return DemoService(StubCaptioner(), examples=synthetic_examples(2))


# ---------------------------------------------------------------- request handling, no browser


def test_missing_model_is_a_message_in_the_page(scene):
    service = DemoService(None)
    answer = service.describe(_png(scene[0]), "1,1,20,20")
    assert answer == {"ok": False, "error": NO_MODEL}
    assert "--ckpt_path" in NO_MODEL and "--export_dir" in NO_MODEL
    status = service.status()
    assert status["ok"] is False and status["model"] is None and status["error"] == NO_MODEL
    # a failed load says why, and that is what the page shows
    service = DemoService(None, model_error="checkpoint not found: /nowhere.ckpt")
    assert service.describe(_png(scene[0]), "1,1,20,20") == {"ok": False, "error": "checkpoint not found: /nowhere.ckpt"}


def test_loading_failures_are_messages_not_crashes(tmp_path):
    assert load_captioner() == (None, NO_MODEL)
    assert load_captioner(str(tmp_path / "missing.ckpt")) == (None, f"checkpoint not found: {tmp_path / 'missing.ckpt'}")
    assert load_captioner(export_dir=str(tmp_path / "nothing")) == (None, f"export folder not found: {tmp_path / 'nothing'}")
    assert load_captioner("a.ckpt", "b")[1] == "give either --ckpt_path or --export_dir, not both"
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint")
    captioner, error = load_captioner(str(garbage))
    assert captioner is None and error.startswith(f"could not load the model from {garbage}: ") and "\n" not in error
    captioner, error = load_captioner(export_dir=str(tmp_path))  # a folder that is not an export
    assert captioner is None and error.startswith(f"could not load the model from {tmp_path}: ")


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", "no image: open an image file or pick an example"),
        (b"this is not an image", "the file is not an image this demo can read; use a PNG, JPEG"),
        ("truncated", "the image could not be read (OSError: "),
    ],
)
def test_unreadable_image_is_a_message(service, scene, data, expected):
    if data == "truncated":
        data = _png(scene[0])[:200]
    for answer in (service.describe(data, "1,1,20,20"), service.image_info(data)):
        assert answer["ok"] is False and answer["error"].startswith(expected), answer
    assert service.captioner.calls == []


def test_too_many_pixels_is_a_message(scene):
    service = DemoService(StubCaptioner(), max_pixels=100 * 100)
    answer = service.describe(_png(scene[0]), "1,1,20,20")
    assert answer == {"ok": False, "error": "the image is too large: 128x128 pixels (at most 10,000 pixels)"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0,0,200,10", "box 1 (line 1) [0, 0, 200, 10] is outside the 128x128 image: x1 = 200 is not within 0..128 (the image width)"),
        ("10,10,20,20\n-1,5,20,20", "box 2 (line 2) [-1, 5, 20, 20] is outside the 128x128 image: x0 = -1 is not within 0..128 (the image width)"),
        ("5,5,20,128.5", "box 1 (line 1) [5, 5, 20, 128.5] is outside the 128x128 image: y1 = 128.5 is not within 0..128 (the image height)"),
        ("1,2,3", "box 1 (line 1) is not four numbers [x0, y0, x1, y1]: '1,2,3'"),
        ("# a comment\n\n1,2,x,4", "box 1 (line 3) is not four numbers [x0, y0, x1, y1]: '1,2,x,4'"),
        ("nan,1,5,5", "box 1 (line 1) has a non-finite value: 'nan,1,5,5'"),
        ("30,1,5,5", "box 1 (line 1) has x1 <= x0 (5.0 <= 30.0)"),
        ("1,30,5,30", "box 1 (line 1) has y1 <= y0 (30.0 <= 30.0)"),
        ("", "no boxes: type x0,y0,x1,y1 (image pixels) one per line, or drag on the image to draw one"),
        ("\n".join(["1,1,5,5"] * 4), "4 boxes is more than this demo takes at once (3; see --max_regions)"),
    ],
)
def test_malformed_or_outside_boxes_are_one_line_messages(scene, text, expected):
    service = DemoService(StubCaptioner(), max_regions=3)
    answer = service.describe(_png(scene[0]), text)
    assert answer == {"ok": False, "error": expected}
    assert service.captioner.calls == []  # checked before the model runs


def test_box_formats_and_one_batch_for_all_boxes(service, scene):
    image = scene[0]
    text = "[1, 2, 30, 40]\n  5 5 20 20  \n# ignored\n0;0;128;128\n(10.5,3,11,4)"
    assert parse_boxes(text, 128, 128, 10) == [[1, 2, 30, 40], [5, 5, 20, 20], [0, 0, 128, 128], [10.5, 3, 11, 4]]
    answer = service.describe(_png(image), text)
    assert answer["ok"] is True, answer
    assert service.captioner.calls == [((128, 128), [[1, 2, 30, 40], [5, 5, 20, 20], [0, 0, 128, 128], [10.5, 3, 11, 4]])]
    assert [r["caption"] for r in answer["regions"]] == ["region 0", "region 1", "region 2", "region 3"]
    assert [r["category"] for r in answer["regions"]] == ["circle"] * 4
    assert len({r["colour"] for r in answer["regions"]}) == 4
    picture = Image.open(io.BytesIO(base64.b64decode(answer["picture"].split(",", 1)[1])))
    assert picture.size == (512, 512)  # draw_regions upscales small images
    assert answer["width"] == answer["height"] == 128 and answer["seconds"] >= 0


def test_examples_and_model_errors(service, scene):
    answer = service.describe(None, "1,1,20,20", example="1")
    assert answer["ok"] is True and service.captioner.calls[-1][0] == make_scene(0, "test", 1)[0].size
    assert service.describe(None, "1,1,20,20", example="7") == {"ok": False, "error": "no example '7' (there are 2)"}
    assert Image.open(io.BytesIO(service.example_png(0))).size == (128, 128) and service.example_png(2) is None
    status = service.status()
    assert [e["url"] for e in status["examples"]] == ["examples/0.png", "examples/1.png"]
    assert status["examples"][0]["boxes"] == [r["box"] for r in scene[1]["regions"]]
    refusing = DemoService(StubCaptioner(BadInputError("image 0 region 0 has x1 <= x0 (1.0 <= 2.0)")))
    assert refusing.describe(_png(scene[0]), "1,1,5,5") == {"ok": False, "error": "image 0 region 0 has x1 <= x0 (1.0 <= 2.0)"}
    broken = DemoService(StubCaptioner(RuntimeError("boom\nsecond line")))
    answer = broken.describe(_png(scene[0]), "1,1,5,5")
    assert answer == {"ok": False, "error": "internal error (RuntimeError: boom); the server log has the details"}


def test_http_layer_answers_json_for_bad_requests_and_keeps_serving(service, scene):
    pytest.importorskip("aiohttp", reason='the demo extra is not installed (pip install -e ".[demo]")')
    from aiohttp import FormData
    from aiohttp.test_utils import TestClient, TestServer

    from fineregion_pl.commands.demo import make_app

    async def run():
        async with TestClient(TestServer(make_app(service, max_upload_bytes=200_000))) as client:
            page = await client.get("/")
            assert page.status == 200 and 'id="describe"' in await page.text()
            garbage = await client.post("/api/describe", data=b"garbage", headers={"Content-Type": "multipart/form-data; boundary=x"})
            assert (await garbage.json())["ok"] is False
            big = FormData()
            big.add_field("image", b"\0" * 300_000, filename="big.png", content_type="image/png")
            big.add_field("boxes", "1,1,5,5")
            answer = await (await client.post("/api/describe", data=big)).json()
            assert answer == {"ok": False, "error": "the upload is too large (at most 0.190735 MB)"}
            form = FormData()
            form.add_field("image", b"not an image", filename="x.png", content_type="image/png")
            assert (await (await client.post("/api/image", data=form)).json())["error"].startswith("the file is not an image")
            form = FormData()
            form.add_field("image", _png(scene[0]), filename="scene.png", content_type="image/png")
            form.add_field("boxes", "1,1,20,20\n30,30,60,60")
            answer = await (await client.post("/api/describe", data=form)).json()
            assert answer["ok"] is True and [r["caption"] for r in answer["regions"]] == ["region 0", "region 1"]
            assert (await client.get("/examples/5.png")).status == 404
            assert (await (await client.get("/api/status")).json())["ok"] is True

    asyncio.run(run())


# ---------------------------------------------------------------- end to end, in headless Chromium


def _browser_stack_missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"chromium is not installed ({INSTALL})"
    if importlib.util.find_spec("aiohttp") is None:
        return 'the demo extra is not installed (pip install -e ".[demo]"; ' + INSTALL + ")"
    if importlib.util.find_spec("playwright") is None:
        return f"playwright is not installed ({INSTALL})"
    return None


@pytest.fixture(scope="module")
def browser_stack():
    """Skips (naming what is missing) unless chromium, the demo extra and playwright are installed."""
    missing = _browser_stack_missing()
    if missing:
        pytest.skip(missing)


@pytest.fixture(scope="module")
def stage2_checkpoint(tmp_path_factory, synthetic_data, stage1_checkpoint, tiny_lm) -> Path:
    """A tiny stage-2 checkpoint after two real training steps."""
    import torch

    from fineregion_pl import RegionDataModule, Stage2Module
    from fineregion_pl.model.language_model import LanguageModelConfig, LoraSettings

    torch.manual_seed(0)
    lm = LanguageModelConfig(name_or_path=str(tiny_lm), lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    module = Stage2Module(init_from=str(stage1_checkpoint), language_model=lm, prompt_tokens=2, prompt_hidden=32, lr=3e-3, warmup_steps=1, max_new_tokens=6)
    data = RegionDataModule([str(synthetic_data)], image_size=64, batch_size=4, num_workers=0)
    out = tmp_path_factory.mktemp("demo-stage2")
    trainer = tiny_trainer(out, max_steps=2, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=fixed_batch_loader(first_batch(data), 2))
    path = out / "stage2.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture
def demo_server(stage2_checkpoint, tmp_path):
    """Starts ``python -m fineregion_pl.commands.demo --ckpt_path ... --port 0``; call the result for its address."""
    log_path = tmp_path / "demo-server.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "fineregion_pl.commands.demo", "--ckpt_path", str(stage2_checkpoint), "--host", "127.0.0.1", "--port", "0",
         "--examples", "2", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=log, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1"),
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()

    def url(timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            try:
                found = re.search(r"serving on (http://\S+)", lines.get(timeout=0.5))
            except queue.Empty:
                continue
            if found:
                return found.group(1)
        log.flush()
        pytest.fail(f"the demo did not start (exit code {process.poll()}):\n{log_path.read_text()[-3000:]}")

    try:
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.slow
def test_demo_end_to_end_in_headless_chromium(browser_stack, stage2_checkpoint, demo_server, tmp_path, scene):
    from playwright.sync_api import expect, sync_playwright

    from fineregion_pl.api import RegionCaptioner

    expect.set_options(timeout=30_000)
    started = time.monotonic()
    image, record = scene
    upload = tmp_path / "scene.png"
    image.save(upload)
    boxes = [r["box"] for r in record["regions"][:2]]
    expected = RegionCaptioner.from_checkpoint(stage2_checkpoint).describe(image, boxes)
    url = demo_server()  # it has been loading meanwhile
    print(f"reference captions and server start: {time.monotonic() - started:.1f} s")
    started = time.monotonic()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(url)
            expect(page.locator("body")).to_have_attribute("data-ready", "true")
            expect(page.locator("#model")).to_have_text(f"Model: {stage2_checkpoint}")
            expect(page.locator("#examples button")).to_have_count(2)

            # upload an image, type two boxes, describe: two rows, the API's captions
            page.set_input_files("#file", str(upload))
            expect(page.locator("#image-size")).to_have_text("128 × 128 pixels")
            page.fill("#boxes", "\n".join(",".join(f"{v:g}" for v in box) for box in boxes))
            page.click("#describe")
            rows = page.locator("#results tbody tr.region")
            expect(rows).to_have_count(2)
            expect(page.locator("#message")).to_contain_text("2 regions described in")
            captions = rows.locator("td.caption").all_inner_texts()
            assert captions == [r["caption"] for r in expected]
            assert rows.locator("td.category").all_inner_texts() == [r["category"] for r in expected]
            assert rows.locator("td.score").all_inner_texts() == [f"{r['score']:.2f}" for r in expected]
            colours = rows.locator(".swatch").evaluate_all("spans => spans.map(s => getComputedStyle(s).backgroundColor)")
            assert len(set(colours)) == 2
            assert page.locator("#picture").evaluate("img => img.complete && img.naturalWidth") == 512
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            assert (tmp_path / "demo.png").stat().st_size > 10_000

            # a box dragged on the canvas is added to the list in image pixels
            canvas = page.locator("#canvas").bounding_box()
            page.mouse.move(canvas["x"] + canvas["width"] * 0.25, canvas["y"] + canvas["height"] * 0.25)
            page.mouse.down()
            page.mouse.move(canvas["x"] + canvas["width"] * 0.5, canvas["y"] + canvas["height"] * 0.5, steps=4)
            page.mouse.move(canvas["x"] + canvas["width"] * 0.75, canvas["y"] + canvas["height"] * 0.75, steps=4)
            page.mouse.up()
            drawn = [float(v) for v in page.input_value("#boxes").splitlines()[-1].split(",")]
            assert drawn == pytest.approx([32, 32, 96, 96], abs=1.5)

            # a box outside the image: a message in the page, and the server still answers
            page.fill("#boxes", "10,10,40,40\n0,0,500,20")
            page.click("#describe")
            expect(page.locator("#message")).to_have_text(
                "box 2 (line 2) [0, 0, 500, 20] is outside the 128x128 image: x1 = 500 is not within 0..128 (the image width)")
            expect(page.locator("#message")).to_have_class("error")

            # an example picked with its boxes filled in goes through as one batch
            page.locator("#examples button").nth(1).click()
            count = len(make_scene(0, "test", 1)[1]["regions"])
            expect(page.locator("#boxes")).not_to_be_empty()
            page.click("#describe")
            expect(page.locator("#message")).to_contain_text(f"{count} regions described in")
            expect(rows).to_have_count(count)

            # an unreadable file: a message, the previous image stays
            bad = tmp_path / "broken.png"
            bad.write_bytes(b"not an image at all")
            page.set_input_files("#file", str(bad))
            expect(page.locator("#message")).to_contain_text("the file is not an image this demo can read")
        finally:
            browser.close()
    print(f"in the browser: {time.monotonic() - started:.1f} s")
