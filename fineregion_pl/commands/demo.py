"""A local web demo: open an image, draw or type boxes, read each region's caption.

    pip install -e ".[demo]"
    fineregion-pl demo --ckpt_path runs/quickstart/stage2/checkpoints/last.ckpt
    # or: fineregion-pl demo --export_dir exports/quickstart      (then open http://127.0.0.1:7860)

A small aiohttp server and one plain HTML+JS page (``demo_page.html``, no CDN, nothing fetched
from the internet). All boxes of a request go through :class:`~fineregion_pl.api.RegionCaptioner`
as one batch. Everything a user can get wrong (no model, an unreadable image, a malformed box, a
box outside the image, too many boxes) comes back to the page as a one-line message; the server
keeps running.

The request handling lives in :class:`DemoService`, which needs neither aiohttp nor a browser, so
its messages are unit-tested directly; :func:`make_app` is the thin HTTP layer over it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from PIL import Image, ImageOps, UnidentifiedImageError

from fineregion_pl.data.drawing import PALETTE, draw_regions
from fineregion_pl.model.boxes import check_box
from fineregion_pl.model.errors import BadInputError

PAGE = Path(__file__).with_name("demo_page.html")
INSTALL_HINT = 'the demo needs its extra: pip install -e ".[demo]"'
NO_MODEL = "no model is loaded: start the demo with --ckpt_path STAGE2.ckpt or --export_dir EXPORT_FOLDER"
IMAGE_HINT = "use a PNG, JPEG, GIF, BMP, TIFF or WebP file"
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
DISPLAY_SIDE = 1024  # previews and result pictures are at most this many pixels wide or high


class DemoError(Exception):
    """A problem with what the user sent, shown as one line in the page."""


def load_captioner(ckpt_path: Optional[str] = None, export_dir: Optional[str] = None, device: str = "cpu") -> tuple[Any, Optional[str]]:
    """``(captioner, None)``, or ``(None, message)`` when there is no model to load or it does not load."""
    from fineregion_pl.api import RegionCaptioner

    if ckpt_path and export_dir:
        return None, "give either --ckpt_path or --export_dir, not both"
    if not ckpt_path and not export_dir:
        return None, NO_MODEL
    try:
        if ckpt_path:
            if not Path(ckpt_path).is_file():
                return None, f"checkpoint not found: {ckpt_path}"
            return RegionCaptioner.from_checkpoint(ckpt_path, device=device), None
        if not Path(export_dir).is_dir():
            return None, f"export folder not found: {export_dir}"
        return RegionCaptioner.from_export(export_dir, device=device), None
    except Exception as err:  # any failure to load is a message in the page, not a dead server
        source = ckpt_path or export_dir
        first_line = (str(err).strip().splitlines() or [""])[0]
        return None, f"could not load the model from {source}: {type(err).__name__}: {first_line}"


def read_image(data: Optional[bytes], max_pixels: int) -> Image.Image:
    """An RGB image from uploaded bytes (EXIF orientation applied, as browsers show it), or a :class:`DemoError`."""
    if not data:
        raise DemoError("no image: open an image file or pick an example")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > max_pixels:
                raise DemoError(f"the image is too large: {width}x{height} pixels (at most {max_pixels:,} pixels)")
            opened.load()
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except DemoError:
        raise
    except Image.DecompressionBombError:
        raise DemoError("the image is too large to read safely") from None
    except UnidentifiedImageError:
        raise DemoError(f"the file is not an image this demo can read; {IMAGE_HINT}") from None
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError... on bad files
        detail = (str(err).strip().splitlines() or [""])[0]
        raise DemoError(f"the image could not be read ({type(err).__name__}: {detail}); {IMAGE_HINT}") from None
    if image.width < 1 or image.height < 1:
        raise DemoError("the image is empty")
    return image


_SEPARATORS = re.compile(r"[\s,;]+")


def parse_boxes(text: str, width: int, height: int, max_regions: int) -> list[list[float]]:
    """Boxes from text, one ``x0,y0,x1,y1`` per line (pixels of a ``width`` x ``height`` image).

    Commas, spaces or semicolons separate the numbers; brackets and empty lines are ignored, and so
    are lines starting with ``#``. Each box must be four finite numbers with ``x0 < x1``,
    ``y0 < y1``, inside the image. Raises :class:`DemoError` naming the box and its line.
    """
    boxes: list[list[float]] = []
    for number, raw in enumerate((text or "").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"box {len(boxes) + 1} (line {number})"
        parts = [p for p in _SEPARATORS.split(line.strip("[]() \t")) if p]
        try:
            box = check_box(parts, where)
        except BadInputError as err:
            raise DemoError(str(err).replace(f"{parts!r}", repr(line))) from None
        x0, y0, x1, y1 = box
        for name, value, low, high in (("x0", x0, 0, width), ("y0", y0, 0, height), ("x1", x1, 0, width), ("y1", y1, 0, height)):
            if not low <= value <= high:
                side = "width" if name[0] == "x" else "height"
                raise DemoError(f"{where} {_format_box(box)} is outside the {width}x{height} image: {name} = {value:g} is not within 0..{high} (the image {side})")
        boxes.append(box)
    if not boxes:
        raise DemoError("no boxes: type x0,y0,x1,y1 (image pixels) one per line, or drag on the image to draw one")
    if len(boxes) > max_regions:
        raise DemoError(f"{len(boxes)} boxes is more than this demo takes at once ({max_regions}; see --max_regions)")
    return boxes


def _format_box(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _fit(image: Image.Image, side: int) -> tuple[Image.Image, float]:
    """``image`` shrunk to at most ``side`` pixels on its longer side, and the factor used."""
    factor = min(1.0, side / max(image.size))
    if factor == 1.0:
        return image, 1.0
    return image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.BILINEAR), factor


def _colour(index: int) -> str:
    return "#%02x%02x%02x" % PALETTE[index % len(PALETTE)]


class DemoService:
    """What the demo's HTTP endpoints do, as plain methods returning JSON-ready dicts.

    Every method answers ``{"ok": True, ...}`` or ``{"ok": False, "error": "one line"}``; none raises.

    Args:
        captioner: a :class:`~fineregion_pl.api.RegionCaptioner` (anything with its ``describe``), or None.
        model_error: why there is no captioner (shown in the page).
        model_name: what the page says is loaded.
        examples: ``(name, image, record)`` triples the page offers as built-in examples.
        max_regions: most boxes in one request.
        max_pixels: largest image accepted.
    """

    def __init__(
        self,
        captioner: Any = None,
        model_error: Optional[str] = None,
        model_name: str = "",
        examples: Sequence[tuple[str, Image.Image, dict]] = (),
        max_regions: int = 32,
        max_pixels: int = 40_000_000,
    ):
        self.captioner = captioner
        self.model_error = model_error if captioner is None else None
        if captioner is None and not self.model_error:
            self.model_error = NO_MODEL
        self.model_name = model_name
        self.examples = list(examples)
        self.max_regions = max_regions
        self.max_pixels = max_pixels
        self._lock = threading.Lock()  # one model call at a time; the event loop stays free meanwhile

    def status(self) -> dict:
        """The model's name or why it is missing, the examples and the limits."""
        examples = [
            {"index": i, "name": name, "width": image.width, "height": image.height, "url": f"examples/{i}.png",
             "boxes": [list(r["box"]) for r in record.get("regions", [])]}
            for i, (name, image, record) in enumerate(self.examples)
        ]
        return {"ok": self.captioner is not None, "model": self.model_name if self.captioner is not None else None,
                "error": self.model_error, "examples": examples, "max_regions": self.max_regions,
                "palette": [_colour(i) for i in range(len(PALETTE))]}

    def example_png(self, index: int) -> Optional[bytes]:
        """Example ``index`` as PNG bytes (None when there is no such example)."""
        if not 0 <= index < len(self.examples):
            return None
        buffer = io.BytesIO()
        self.examples[index][1].save(buffer, format="PNG")
        return buffer.getvalue()

    def _image(self, data: Optional[bytes], example: Optional[str]) -> Image.Image:
        if example not in (None, ""):
            try:
                index = int(example)
            except ValueError:
                raise DemoError(f"no example {example!r}") from None
            if not 0 <= index < len(self.examples):
                raise DemoError(f"no example {example!r} (there are {len(self.examples)})")
            return self.examples[index][1].convert("RGB")
        return read_image(data, self.max_pixels)

    def image_info(self, data: Optional[bytes]) -> dict:
        """Size and a display preview of an uploaded image, exactly as the model will see it."""
        return self._answer(self._image_info, data)

    def _image_info(self, data: Optional[bytes]) -> dict:
        image = read_image(data, self.max_pixels)
        preview, _ = _fit(image, DISPLAY_SIDE)
        return {"ok": True, "width": image.width, "height": image.height, "preview": _data_url(preview)}

    def describe(self, image_data: Optional[bytes] = None, boxes_text: str = "", example: Optional[str] = None) -> dict:
        """Captions for every box of ``boxes_text`` on the uploaded image (or example), as one batch.

        Returns ``regions`` (index, colour, box, caption, category, score), ``picture`` (a PNG data
        URL from :func:`~fineregion_pl.data.drawing.draw_regions`), ``width``, ``height`` and ``seconds``.
        """
        return self._answer(self._describe, image_data, boxes_text, example)

    def _describe(self, image_data: Optional[bytes], boxes_text: str, example: Optional[str]) -> dict:
        if self.captioner is None:
            raise DemoError(self.model_error or NO_MODEL)
        image = self._image(image_data, example)
        boxes = parse_boxes(boxes_text, image.width, image.height, self.max_regions)
        start = time.perf_counter()
        with self._lock:
            try:
                rows = self.captioner.describe(image, boxes)
            except BadInputError as err:
                raise DemoError(str(err)) from None
        seconds = time.perf_counter() - start
        by_id = {row["region_id"]: row for row in rows}
        regions = []
        for index, box in enumerate(boxes):
            row = by_id.get(index, {})
            regions.append({
                "index": index,
                "colour": _colour(index),
                "box": [round(float(v), 2) for v in row.get("box", box)],
                "caption": row.get("caption", ""),
                "category": row.get("category"),
                "category_id": row.get("category_id"),
                "score": row.get("score"),
            })
        shown, factor = _fit(image, DISPLAY_SIDE)
        drawn = draw_regions(shown, [dict(r, box=[v * factor for v in r["box"]]) for r in regions])
        return {"ok": True, "regions": regions, "picture": _data_url(drawn), "width": image.width, "height": image.height,
                "seconds": round(seconds, 3)}

    @staticmethod
    def _answer(function, *args) -> dict:
        try:
            return function(*args)
        except DemoError as err:
            return {"ok": False, "error": str(err)}
        except Exception as err:  # a bug or a model failure: logged in full, one line in the page
            traceback.print_exc(file=sys.stderr)
            first_line = (str(err).strip().splitlines() or [""])[0]
            return {"ok": False, "error": f"internal error ({type(err).__name__}: {first_line}); the server log has the details"}


def synthetic_examples(count: int) -> list[tuple[str, Image.Image, dict]]:
    """The first ``count`` test images of the built-in synthetic benchmark (seed 0)."""
    from fineregion_pl.data.synthetic import make_scene

    examples = []
    for index in range(count):
        image, record = make_scene(0, "test", index)
        examples.append((f"synthetic test {index}", image, record))
    return examples


def make_app(service: DemoService, max_upload_bytes: int = MAX_UPLOAD_BYTES):
    """The aiohttp application serving the page, the examples and the JSON endpoints of ``service``."""
    try:
        from aiohttp import web
    except ImportError:  # pragma: no cover - depends on the environment
        raise SystemExit(INSTALL_HINT) from None

    async def in_thread(function, *args):
        return await asyncio.get_running_loop().run_in_executor(None, function, *args)

    async def read_form(request) -> dict:
        """The multipart/urlencoded fields of a request: str values, bytes for files."""
        fields: dict[str, Any] = {}
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise DemoError(f"the upload is too large (at most {max_upload_bytes / 2**20:g} MB)") from None
        except Exception as err:
            raise DemoError(f"the request could not be read ({type(err).__name__})") from None
        for key, value in form.items():
            fields[key] = value.file.read() if hasattr(value, "file") else value
        return fields

    def reply(answer: dict):
        return web.json_response(answer)

    async def page(request):
        try:
            return web.Response(text=PAGE.read_text(encoding="utf-8"), content_type="text/html")
        except OSError:
            return web.Response(status=500, text=f"demo page missing: {PAGE} (reinstall fineregion-pl)")

    async def status(request):
        return reply(service.status())

    async def example(request):
        try:
            data = service.example_png(int(request.match_info["index"]))
        except ValueError:
            data = None
        if data is None:
            return web.Response(status=404, text="no such example")
        return web.Response(body=data, content_type="image/png")

    async def image(request):
        try:
            fields = await read_form(request)
        except DemoError as err:
            return reply({"ok": False, "error": str(err)})
        data = fields.get("image")
        return reply(await in_thread(service.image_info, data if isinstance(data, bytes) else None))

    async def describe(request):
        try:
            fields = await read_form(request)
        except DemoError as err:
            return reply({"ok": False, "error": str(err)})
        data = fields.get("image")
        boxes = fields.get("boxes", "")
        example_index = fields.get("example")
        return reply(await in_thread(
            service.describe,
            data if isinstance(data, bytes) else None,
            boxes if isinstance(boxes, str) else boxes.decode("utf-8", "replace"),
            example_index if isinstance(example_index, str) else None,
        ))

    app = web.Application(client_max_size=max_upload_bytes)
    app.add_routes([
        web.get("/", page),
        web.get("/api/status", status),
        web.get("/examples/{index}.png", example),
        web.post("/api/image", image),
        web.post("/api/describe", describe),
    ])
    return app


async def _serve(app, host: str, port: int) -> None:
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
        print(f"fineregion-pl demo: serving on http://{shown}:{bound[1]}/  (Ctrl+C to stop)", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


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
) -> None:
    """Serve a web page that captions the boxes you draw or type on an image.

    Args:
        ckpt_path: a stage-2 checkpoint (its base LM must be reachable at the saved path).
        export_dir: a ``fineregion-pl export`` folder (instead of ``ckpt_path``).
        host: address to listen on (``0.0.0.0`` to let other machines in: there is no authentication).
        port: port to listen on (0: any free port; the address is printed).
        device: ``auto`` (a GPU when there is one, else the CPU), ``cpu``, ``cuda``, ``cuda:1``...
        examples: how many synthetic test images to offer as examples.
        max_regions: most boxes in one request.
        max_pixels: largest image accepted, in pixels.
    """
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise SystemExit(INSTALL_HINT) from None
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    source = ckpt_path or export_dir
    if source:
        print(f"fineregion-pl demo: loading {source} on {device} ...", flush=True)
    captioner, error = load_captioner(ckpt_path, export_dir, device)
    if error:
        print(f"fineregion-pl demo: {error} (the page will say so)", file=sys.stderr, flush=True)
    service = DemoService(captioner, error, model_name=str(source or ""), examples=synthetic_examples(examples),
                          max_regions=max_regions, max_pixels=max_pixels)
    try:
        asyncio.run(_serve(make_app(service), host, port))
    except KeyboardInterrupt:
        print("fineregion-pl demo: stopped", flush=True)


if __name__ == "__main__":  # python -m fineregion_pl.commands.demo --ckpt_path ...
    from jsonargparse import auto_cli

    auto_cli(demo)
