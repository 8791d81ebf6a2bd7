"""The web demo, a Gradio app: open an image, draw or type boxes, read each region's caption.

    pip install -e ".[demo]"
    fineregion-pl demo --ckpt_path runs/quickstart/stage2/checkpoints/last.ckpt
    # or: fineregion-pl demo --export_dir exports/quickstart      (then open http://127.0.0.1:7860)

Boxes are drawn on the image with ``gradio_image_annotation``'s annotator, or typed one per line;
all of them go through :meth:`~fineregion_pl.model.captioner.RegionCaptioner.describe` as one
batch, and the answer is the picture with every box, caption, category and score, and a table.
It works offline: Gradio's front end is served from the package (local fonts, no CDN),
telemetry is off and there is no share link. What a user gets wrong comes back as one line in
the page (:class:`DemoService` holds the checks, without Gradio, so they are unit-tested).
"""

import html
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from fineregion_pl.commands.inputs import NO_MODEL, check_count, first_line, load_captioner, parse_boxes, pick_device, read_image
from fineregion_pl.data.drawing import PALETTE, draw_regions
from fineregion_pl.model.boxes import check_box
from fineregion_pl.model.errors import BadInputError

INSTALL_HINT = 'the demo needs its extra: pip install -e ".[demo]"'
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
DISPLAY_SIDE = 1024  # result pictures are at most this many pixels wide or high
DRAWING_SIDE = 384  # smaller images are shown this large (integer zoom) to draw on


def colour(index: int) -> str:
    """The colour :func:`~fineregion_pl.data.drawing.draw_regions` gives region ``index``, as ``#rrggbb``."""
    return "#%02x%02x%02x" % PALETTE[index % len(PALETTE)]


def drawing_copy(image: Image.Image) -> tuple[Image.Image, int]:
    """The image to draw boxes on and its integer zoom: the annotator never enlarges an image, so a small one is."""
    zoom = max(1, DRAWING_SIDE // max(image.size))
    if zoom == 1:
        return image, 1
    return image.resize((image.width * zoom, image.height * zoom), Image.NEAREST), zoom


def _fit(image: Image.Image, side: int) -> tuple[Image.Image, float]:
    factor = min(1.0, side / max(image.size))
    if factor == 1.0:
        return image, 1.0
    return image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.BILINEAR), factor


class DemoService:
    """What the demo does with what a user gives, without Gradio: every problem is a one-line
    :class:`~fineregion_pl.model.errors.BadInputError`.

    Args:
        captioner: a :class:`~fineregion_pl.api.RegionCaptioner` (anything with its ``describe``), or None.
        model_error: why there is no captioner.
        max_regions: most boxes in one request.
        max_pixels: largest image accepted.
    """

    def __init__(self, captioner: Any = None, model_error: Optional[str] = None, max_regions: int = 32, max_pixels: int = 40_000_000):
        self.captioner = captioner
        self.model_error = None if captioner is not None else (model_error or NO_MODEL)
        self.max_regions, self.max_pixels = max_regions, max_pixels

    def open_image(self, data: Optional[bytes]) -> Image.Image:
        """An uploaded file as the RGB image the model will see."""
        return read_image(data, self.max_pixels)

    def boxes(self, image: Image.Image, drawn: Sequence[dict], typed: str, zoom: float = 1) -> list[list[float]]:
        """The drawn boxes (annotator dicts ``xmin, ymin, xmax, ymax`` in pixels of the image shown
        ``zoom`` times larger), then the typed ones, checked, in pixels of ``image``."""
        boxes = []
        # the annotator lists the newest box first: number them in the order they were drawn
        for number, box in enumerate(reversed(list(drawn or [])), 1):
            where = f"box {number} (drawn)"
            values = check_box([box.get(k) for k in ("xmin", "ymin", "xmax", "ymax")], where)
            values = [min(max(v / zoom, 0.0), float(side)) for v, side in zip(values, (image.width, image.height) * 2)]
            boxes.append(check_box(values, where))
        boxes += parse_boxes(typed, image.width, image.height, first=len(boxes) + 1)
        if not boxes:
            raise BadInputError("no boxes: draw boxes on the image, or type x0,y0,x1,y1 (image pixels) one per line")
        check_count(len(boxes), self.max_regions)
        return boxes

    def describe(self, image: Optional[Image.Image], drawn: Sequence[dict] = (), typed: str = "", zoom: float = 1) -> dict:
        """Every box through the model as one batch: ``regions`` (index, colour, box, caption,
        category, score), ``picture`` (the regions drawn on the image) and ``seconds``."""
        if self.captioner is None:
            raise BadInputError(self.model_error)
        if image is None:
            raise BadInputError("no image: open an image file or pick an example")
        image = image.convert("RGB")
        boxes = self.boxes(image, drawn, typed, zoom)
        start = time.perf_counter()
        rows = {row["region_id"]: row for row in self.captioner.describe(image, boxes)}
        seconds = time.perf_counter() - start
        regions = [{"index": i, "colour": colour(i), "box": [round(float(v), 2) for v in rows.get(i, {}).get("box", box)],
                    "caption": rows.get(i, {}).get("caption", ""), "category": rows.get(i, {}).get("category"),
                    "score": rows.get(i, {}).get("score")} for i, box in enumerate(boxes)]
        shown, factor = _fit(image, DISPLAY_SIDE)
        picture = draw_regions(shown, [dict(r, box=[v * factor for v in r["box"]]) for r in regions])
        return {"regions": regions, "picture": picture, "seconds": seconds}


def results_table(regions: Sequence[dict]) -> str:
    """The regions as an HTML table, each row with its box's colour."""
    rows = []
    for r in regions:
        score = "" if r["score"] is None else f"{r['score']:.2f}"
        rows.append(
            f'<tr class="region"><td><span class="swatch" style="background:{r["colour"]}"></span>{r["index"] + 1}</td>'
            f'<td class="box">{html.escape(", ".join(f"{v:g}" for v in r["box"]))}</td><td class="caption">{html.escape(r["caption"])}</td>'
            f'<td class="category">{html.escape(str(r["category"] or ""))}</td><td class="score">{score}</td></tr>'
        )
    return ('<table id="results-table"><thead><tr><th>#</th><th>box</th><th>caption</th><th>category</th><th>score</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def message(text: str, error: bool = False) -> str:
    """The page's one-line message."""
    return f'<p class="{"error" if error else "ok"}">{html.escape(text)}</p>'


CSS = """
#message p.error { color: #b00020; font-weight: 600; }
#results-table .swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em; border-radius: 2px; }
#results-table td, #results-table th { padding: 0.2em 0.6em; text-align: left; }
"""


def example_files(count: int, folder: Path) -> list[str]:
    """The first ``count`` test images of the synthetic benchmark (seed 0), written as PNGs in ``folder``."""
    from fineregion_pl.data.synthetic import make_scene

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"synthetic-test-{index}.png"
        make_scene(0, "test", index)[0].save(path)
        paths.append(str(path))
    return paths


def build_app(service: DemoService, model_name: str, examples: Sequence[str] = ()):
    """The Gradio Blocks app over ``service``; ``examples`` are image files offered as a gallery."""
    import gradio as gr
    from gradio_image_annotation import image_annotator

    def show(image: Image.Image, text: str):
        drawn, zoom = drawing_copy(image)
        return {"image": drawn, "boxes": []}, (image, zoom), message(text)

    def upload(data: Optional[bytes]):
        # the file box is emptied each time, ready for the next file; the image lives in the annotator
        if data is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            image = service.open_image(data)
        except BadInputError as err:
            return None, gr.skip(), gr.skip(), message(str(err), error=True)
        return None, *show(image, f"{image.width} × {image.height} pixels: draw boxes on it, or type them")

    def pick(event: gr.SelectData):  # a real annotation (no __future__ import here): Gradio reads it to pass the event
        image = Image.open(examples[event.index]).convert("RGB")
        return show(image, f"example {event.index + 1}, {image.width} × {image.height} pixels: draw boxes on it, or type them")

    def describe(annotated: Optional[dict], opened: Optional[tuple], typed: str):
        try:
            image, zoom = opened if annotated and opened else (None, 1)
            answer = service.describe(image, (annotated or {}).get("boxes") or [], typed, zoom)
        except BadInputError as err:
            return gr.skip(), gr.skip(), message(str(err), error=True)
        except Exception as err:  # a bug or a model failure: logged in full, one line in the page
            traceback.print_exc(file=sys.stderr)
            return gr.skip(), gr.skip(), message(f"internal error ({type(err).__name__}: {first_line(err)}); the server log has the details", error=True)
        count = len(answer["regions"])
        text = f"{count} region{'s' if count != 1 else ''} described in {answer['seconds']:.2f} s (one batch)"
        return answer["picture"], results_table(answer["regions"]), message(text)

    with gr.Blocks(title="fineregion-pl demo", analytics_enabled=False) as app:
        gr.Markdown("## fineregion-pl: captions for the regions of an image")
        status = f"Model: {model_name}" if service.captioner is not None else f"No model: {service.model_error}"
        gr.HTML(message(status, error=service.captioner is None), elem_id="model")
        opened = gr.State(None)  # (the image as opened, the zoom of the copy drawn on)
        with gr.Row():
            with gr.Column():
                file = gr.File(label="Open an image (PNG, JPEG, GIF, BMP, TIFF, WebP)", type="binary", height=120, elem_id="file")
                gallery = gr.Gallery(value=list(examples), label="Or pick an example (synthetic test images)", columns=max(1, len(examples)),
                                     height=140, allow_preview=False, elem_id="examples", visible=bool(examples))
                annotator = image_annotator(label="Draw boxes on the image", sources=[], image_type="pil", disable_edit_boxes=True,
                                            show_download_button=False, show_share_button=False, box_min_size=4, elem_id="annotator")
                typed = gr.Textbox(label="Or type boxes: x0,y0,x1,y1 in image pixels, one per line", lines=3, elem_id="boxes")
                button = gr.Button("Describe", variant="primary", elem_id="describe")
            with gr.Column():
                note = gr.HTML(message("open an image or pick an example, then draw boxes"), elem_id="message")
                picture = gr.Image(label="Regions", type="pil", interactive=False, buttons=["download", "fullscreen"], elem_id="picture")  # no "share": nothing leaves the machine
                table = gr.HTML(results_table([]), elem_id="results")
        file.upload(upload, inputs=[file], outputs=[file, annotator, opened, note])
        gallery.select(pick, outputs=[annotator, opened, note])
        button.click(describe, inputs=[annotator, opened, typed], outputs=[picture, table, note])
    return app


def free_port(host: str) -> int:
    """A port the OS says is free on ``host``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def demo(
    *,
    ckpt_path: Optional[str] = None,
    export_dir: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "auto",
    examples: int = 4,
    max_regions: int = 32,
    max_pixels: int = 40_000_000,
    share: bool = False,
) -> None:
    """A web page that captions the boxes you draw or type on an image (Gradio).

    Args:
        ckpt_path: a stage-2 checkpoint (its base LM must be reachable at the saved path).
        export_dir: a ``fineregion-pl export`` folder (instead of ``ckpt_path``).
        host: address to listen on (``0.0.0.0`` lets other machines in: there is no authentication).
        port: port to listen on (0: any free port; the address is printed).
        device: ``auto`` (a GPU when there is one, else the CPU), ``cpu``, ``cuda``, ``cuda:1``...
        examples: how many synthetic test images to offer as examples.
        max_regions: most boxes in one request.
        max_pixels: largest image accepted, in pixels.
        share: ask Gradio for a public share link (off: nothing leaves this machine).
    """
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check
    try:
        import gradio  # noqa: F401
        import gradio_image_annotation  # noqa: F401
    except ImportError:
        raise SystemExit(INSTALL_HINT) from None
    device = pick_device(device)
    source = ckpt_path or export_dir
    if source:
        print(f"fineregion-pl demo: loading {source} on {device} ...", flush=True)
    captioner, error = load_captioner(ckpt_path, export_dir, device)
    if error:
        print(f"fineregion-pl demo: {error} (the page will say so)", file=sys.stderr, flush=True)
    service = DemoService(captioner, error, max_regions=max_regions, max_pixels=max_pixels)
    folder = Path(tempfile.mkdtemp(prefix="fineregion-demo-"))
    app = build_app(service, str(source or ""), example_files(examples, folder))
    app.queue(default_concurrency_limit=1)  # one model call at a time; each is one batch
    port = port or free_port(host)
    app.launch(server_name=host, server_port=port, share=share, inbrowser=False, prevent_thread_lock=True, quiet=True,
               max_file_size=MAX_UPLOAD_BYTES, allowed_paths=[str(folder)], ssr_mode=False, footer_links=[], css=CSS)
    shown = f"[{host}]" if ":" in host else host
    print(f"fineregion-pl demo: serving on http://{shown}:{port}/  (Ctrl+C to stop)", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(demo)
