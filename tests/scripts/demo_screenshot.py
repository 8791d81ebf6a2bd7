"""The screenshot of docs/demo.md: the demo on a checkpoint, an example with every shape's box drawn.

    python tests/scripts/demo_screenshot.py runs/quickstart/stage2/checkpoints/last.ckpt docs/images/demo.png

It starts ``python -m fineregion_pl demo`` on a loopback port, opens it in headless Chromium
(Playwright), picks the first example, draws each shape's box with the mouse, presses Describe and
saves the page. The same steps as ``tests/commands/test_demo.py``, on a real checkpoint.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from front_doors import CHROMIUM, CHROMIUM_FLAGS, VerbProcess, draw_box  # noqa: E402


def main(checkpoint: str, out: str) -> None:
    """Describe every shape of the first example on ``checkpoint`` and save the page as ``out``."""
    from playwright.sync_api import expect, sync_playwright

    from fineregion_pl.data.synthetic import make_scene

    _, record = make_scene(0, "test", 0)
    boxes = [[round(v) for v in r["box"]] for r in record["regions"]]
    server = VerbProcess(["demo", "--ckpt_path", str(Path(checkpoint).resolve()), "--port", "0", "--examples", "4", "--device", "cpu"],
                         Path(tempfile.mkdtemp()) / "demo.log")
    try:
        url = server.wait_for(r"serving on (http://\S+)").group(1)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.locator("#examples button.thumbnail-item").first.click()
            expect(page.locator("#annotator canvas")).to_be_visible(timeout=30_000)
            for box in boxes:
                draw_box(page, box, zoom=3, image_side=128)
            page.click("#describe")
            expect(page.locator("#results tr.region")).to_have_count(len(boxes), timeout=60_000)
            page.screenshot(path=out, full_page=True)
            print("\n".join(page.locator("#results tr.region").all_inner_texts()))
            browser.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main(*sys.argv[1:3])
