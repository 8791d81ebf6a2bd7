"""The Gradio demo: its checks and messages without a browser, then end to end in headless Chromium.

The end-to-end test starts ``python -m fineregion_pl demo`` on a loopback port with a tiny trained
stage-2 checkpoint, opens the page in Debian's Chromium through Playwright, picks an example,
draws two boxes with the mouse, presses Describe and reads the two captions back: they must be the
captions ``RegionCaptioner.describe`` gives for the same image and boxes. A bad box and a bad
image each give their one-line message, and the page keeps working. Every request the page makes
goes to the demo's own address (no CDN, no telemetry).
"""

from __future__ import annotations

import time

import pytest
from front_doors import CHROMIUM, CHROMIUM_FLAGS, StubCaptioner, VerbProcess, browser_stack_missing, draw_box, png
from PIL import Image

from fineregion_pl.commands.demo import DemoService, drawing_copy, results_table
from fineregion_pl.commands.inputs import NO_MODEL, load_captioner, parse_boxes, read_image
from fineregion_pl.data.synthetic import make_scene
from fineregion_pl.model.errors import BadInputError


@pytest.fixture(scope="module")
def scene():
    return make_scene(0, "test", 0)


def drawn(*boxes):
    """Annotator boxes as the component hands them over: newest first."""
    return [{"xmin": b[0], "ymin": b[1], "xmax": b[2], "ymax": b[3], "label": "", "color": (0, 0, 0)} for b in reversed(boxes)]


def message_of(call) -> str:
    with pytest.raises(BadInputError) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


# ---------------------------------------------------------------- checks and messages, no browser


def test_missing_model_is_a_message(scene):
    assert message_of(lambda: DemoService(None).describe(scene[0], drawn([1, 1, 20, 20]))) == NO_MODEL
    assert "--ckpt_path" in NO_MODEL and "--export_dir" in NO_MODEL
    service = DemoService(None, model_error="checkpoint not found: /nowhere.ckpt")
    assert message_of(lambda: service.describe(scene[0], drawn([1, 1, 20, 20]))) == "checkpoint not found: /nowhere.ckpt"


def test_loading_failures_are_messages_not_crashes(tmp_path):
    assert load_captioner() == (None, NO_MODEL)
    assert load_captioner(str(tmp_path / "missing.ckpt")) == (None, f"checkpoint not found: {tmp_path / 'missing.ckpt'}")
    assert load_captioner(export_dir=str(tmp_path / "nothing")) == (None, f"export folder not found: {tmp_path / 'nothing'}")
    assert load_captioner("a.ckpt", "b")[1] == "give either --ckpt_path or --export_dir, not both"
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint")
    captioner, error = load_captioner(str(garbage))
    assert captioner is None and error.startswith(f"could not load the model from {garbage}: ") and "\n" not in error


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", "no image: the image is empty (0 bytes)"),
        (b"this is not an image", "the file is not an image this server can read; use a PNG, JPEG"),
        ("truncated", "the image could not be read (OSError: "),
    ],
)
def test_unreadable_image_is_a_message(scene, data, expected):
    data = png(scene[0])[:200] if data == "truncated" else data
    assert message_of(lambda: DemoService(StubCaptioner()).open_image(data)).startswith(expected)


def test_too_many_pixels_is_a_message_before_decoding(scene):
    assert message_of(lambda: read_image(png(scene[0]), 100 * 100)) == "the image is too large: 128x128 pixels (at most 10,000 pixels)"


@pytest.mark.parametrize(
    "typed, expected",
    [
        ("0,0,200,10", "box 2 (line 1) [0, 0, 200, 10] is outside the 128x128 image: x1 = 200 is not within 0..128 (the image width)"),
        ("10,10,20,20\n-1,5,20,20", "box 3 (line 2) [-1, 5, 20, 20] is outside the 128x128 image: x0 = -1 is not within 0..128 (the image width)"),
        ("5,5,20,128.5", "box 2 (line 1) [5, 5, 20, 128.5] is outside the 128x128 image: y1 = 128.5 is not within 0..128 (the image height)"),
        ("1,2,3", "box 2 (line 1) is not four numbers [x0, y0, x1, y1]: '1,2,3'"),
        ("# a comment\n\n1,2,x,4", "box 2 (line 3) is not four numbers [x0, y0, x1, y1]: '1,2,x,4'"),
        ("nan,1,5,5", "box 2 (line 1) has a non-finite value: 'nan,1,5,5'"),
        ("30,1,5,5", "box 2 (line 1) has x1 <= x0 (5.0 <= 30.0)"),
        ("\n".join(["1,1,5,5"] * 3), "4 boxes is more than one request takes (3; see --max_regions)"),
    ],
)
def test_malformed_or_outside_boxes_are_one_line_messages(scene, typed, expected):
    service = DemoService(StubCaptioner(), max_regions=3)
    assert message_of(lambda: service.describe(scene[0], drawn([1, 1, 20, 20]), typed)) == expected
    assert service.captioner.calls == []  # checked before the model runs


def test_no_boxes_and_no_image_are_messages(scene):
    service = DemoService(StubCaptioner())
    assert message_of(lambda: service.describe(scene[0], [], "")).startswith("no boxes: draw boxes on the image")
    assert message_of(lambda: service.describe(None, drawn([1, 1, 5, 5]))) == "no image: open an image file or pick an example"


def test_drawn_boxes_in_drawing_order_then_typed_ones_in_one_batch(scene):
    image = scene[0]
    shown, zoom = drawing_copy(image)
    assert zoom == 3 and shown.size == (384, 384) and shown.getpixel((30, 30)) == image.getpixel((10, 10))
    assert drawing_copy(Image.new("RGB", (800, 600)))[1] == 1
    service = DemoService(StubCaptioner())
    answer = service.describe(image, drawn([30, 60, 90, 120], [3, 3, 384, 300]), "[1, 2, 30, 40]\n  5 5 20 20  \n# ignored\n(10.5;3;11;4)", zoom)
    assert service.captioner.calls == [((128, 128), [[10, 20, 30, 40], [1, 1, 128, 100], [1, 2, 30, 40], [5, 5, 20, 20], [10.5, 3, 11, 4]])]
    assert [r["caption"] for r in answer["regions"]] == [f"region {i}" for i in range(5)]
    assert len({r["colour"] for r in answer["regions"]}) == 5 and answer["picture"].size == (512, 512)  # draw_regions upscales small images
    table = results_table(answer["regions"])
    assert table.count('class="region"') == 5 and "<td class=\"caption\">region 4</td>" in table
    assert parse_boxes("1,2,3,4", 10, 10, first=7) == [[1, 2, 3, 4]]


def test_a_model_failure_is_one_line_and_the_refusals_of_the_model_are_shown(scene):
    refusing = DemoService(StubCaptioner(BadInputError("image 0 region 0 has x1 <= x0 (1.0 <= 2.0)")))
    assert message_of(lambda: refusing.describe(scene[0], drawn([1, 1, 5, 5]))) == "image 0 region 0 has x1 <= x0 (1.0 <= 2.0)"


# ---------------------------------------------------------------- end to end, in headless Chromium


@pytest.fixture(scope="module")
def browser_stack():
    """Skips (naming what is missing) unless chromium, gradio, the annotator and playwright are installed."""
    missing = browser_stack_missing("gradio", "gradio_image_annotation")
    if missing:
        pytest.skip(missing)


@pytest.fixture
def demo_server(stage2_checkpoint, tmp_path):
    server = VerbProcess(["demo", "--ckpt_path", str(stage2_checkpoint), "--host", "127.0.0.1", "--port", "0", "--examples", "2", "--device", "cpu"],
                         tmp_path / "demo-server.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_demo_end_to_end_in_headless_chromium(browser_stack, stage2_checkpoint, demo_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from fineregion_pl.api import RegionCaptioner

    expect.set_options(timeout=30_000)
    started = time.monotonic()
    image, record = make_scene(0, "test", 0)  # the first example the demo offers
    boxes = [[round(v) for v in r["box"]] for r in record["regions"][:2]]
    captioner = RegionCaptioner.from_checkpoint(stage2_checkpoint)
    expected = captioner.describe(image, boxes)
    url = demo_server.wait_for(r"serving on (http://\S+)").group(1)
    print(f"reference captions and server start: {time.monotonic() - started:.1f} s")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(url)
            expect(page.locator("#model")).to_have_text(f"Model: {stage2_checkpoint}")
            thumbnails = page.locator("#examples button.thumbnail-item")
            expect(thumbnails).to_have_count(2)

            # an example, two boxes drawn with the mouse, Describe: two rows with the API's captions
            thumbnails.first.click()
            expect(page.locator("#message")).to_contain_text("example 1, 128 × 128 pixels")
            expect(page.locator("#annotator canvas")).to_be_visible()
            for box in boxes:
                draw_box(page, box, zoom=3, image_side=128)
            page.click("#describe")
            rows = page.locator("#results tr.region")
            expect(rows).to_have_count(2)
            expect(page.locator("#message")).to_contain_text("2 regions described in")
            shown_boxes = [[float(v) for v in text.split(",")] for text in rows.locator("td.box").all_inner_texts()]
            assert shown_boxes == boxes
            assert rows.locator("td.caption").all_inner_texts() == [r["caption"] for r in expected]
            assert rows.locator("td.category").all_inner_texts() == [r["category"] for r in expected]
            assert rows.locator("td.score").all_inner_texts() == [f"{r['score']:.2f}" for r in expected]
            colours = rows.locator(".swatch").evaluate_all("spans => spans.map(s => getComputedStyle(s).backgroundColor)")
            assert len(set(colours)) == 2
            expect(page.locator("#picture img")).to_be_visible()
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            assert (tmp_path / "demo.png").stat().st_size > 10_000

            # a bad box: its message, in the error style, and the results stay
            page.fill("#boxes textarea", "0,0,500,20")
            page.click("#describe")
            expect(page.locator("#message p.error")).to_have_text(
                "box 3 (line 1) [0, 0, 500, 20] is outside the 128x128 image: x1 = 500 is not within 0..128 (the image width)")
            expect(rows).to_have_count(2)

            # a bad image: its message, and the example stays open
            bad = tmp_path / "broken.png"
            bad.write_bytes(png(image)[:300])
            page.set_input_files("#file input[type=file]", str(bad))
            expect(page.locator("#message p.error")).to_contain_text("the image could not be read (OSError: ")

            # the page keeps working: an uploaded image with a typed box
            good = tmp_path / "scene.png"
            make_scene(0, "test", 1)[0].save(good)
            page.set_input_files("#file input[type=file]", str(good))
            expect(page.locator("#message")).to_contain_text("128 × 128 pixels: draw boxes on it")
            typed = [round(v) for v in make_scene(0, "test", 1)[1]["regions"][0]["box"]]
            page.fill("#boxes textarea", ",".join(str(v) for v in typed))
            page.click("#describe")
            expect(page.locator("#message")).to_contain_text("1 region described in")
            again = captioner.describe(make_scene(0, "test", 1)[0], [typed])
            expect(rows.locator("td.caption")).to_have_text([again[0]["caption"]])
        finally:
            browser.close()
    foreign = sorted({u for u in requested if not u.startswith(url.rstrip("/")) and not u.startswith(("data:", "blob:"))})
    assert not foreign, f"the page fetched from elsewhere: {foreign}"
    assert demo_server.alive()
    print(f"in the browser: {time.monotonic() - started:.1f} s")
