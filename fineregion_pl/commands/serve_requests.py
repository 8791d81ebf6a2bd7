"""The server's requests, checked in the HTTP process before they reach the model's worker.

:class:`RequestGate` is an ASGI middleware (LitServe's ``middlewares=``) in front of
``POST /predict``: it bounds the body, reads JSON or multipart, checks every field
(:func:`check_request`) and answers a bad request itself with a 4xx and one line,
``{"error": "..."}``. A good request goes on to LitServe as the canonical JSON
:func:`check_request` returns, so the worker never sees malformed input and one client's bad
request never fails the batch it would have joined.

A request (JSON, or multipart with the image as a file and the other fields as JSON text)::

    {"image": "<base64>",                       # or a data: URL; multipart: the file's bytes
     "boxes": [[x0, y0, x1, y1], ...],          # image pixels; or instead:
     "detections": [{"bbox": [x, y, w, h], "score": 0.9, "category_id": 3}, ...],   # COCO results
     "masks": [<COCO RLE or polygons> | null, ...],   # optional, one per box
     "ids": [...],                               # optional region ids, one per box
     "score_threshold": 0.3, "top_k": 20}        # optional, for detections
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from fineregion_pl.commands.inputs import check_count, format_box, read_image
from fineregion_pl.model.boxes import check_box
from fineregion_pl.model.detections import check_segmentation, regions_from_detections
from fineregion_pl.model.errors import BadInputError

FIELDS = ("image", "boxes", "detections", "masks", "ids", "score_threshold", "top_k")


class RequestError(BadInputError):
    """A bad request: its HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    """What one request may hold."""

    max_body_bytes: int = 32 * 1024 * 1024
    max_regions: int = 64
    max_pixels: int = 40_000_000
    box_tolerance: float = 2.0


def decode_base64_image(value: Any) -> bytes:
    """The bytes of a base64 image (a ``data:image/...;base64,`` URL prefix is allowed)."""
    if not isinstance(value, str):
        raise RequestError(422, "'image' must be a base64 string (or send multipart/form-data with the image as a file)")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "'image' is not valid base64") from None


def _inside(box: list[float], where: str, width: int, height: int, tolerance: float) -> list[float]:
    """``box`` clamped to the image when it sticks out by at most ``tolerance`` pixels (detectors' rounding), else an error."""
    x0, y0, x1, y1 = box
    if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
        raise RequestError(422, f"{where} {format_box(box)} is outside the {width}x{height} image")
    clamped = [max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)]
    if clamped[2] <= clamped[0] or clamped[3] <= clamped[1]:
        raise RequestError(422, f"{where} {format_box(box)} has no area inside the {width}x{height} image")
    return clamped


def _list(fields: dict, name: str) -> list | None:
    value = fields.get(name)
    if value is not None and not isinstance(value, list):
        raise RequestError(422, f"'{name}' must be a list, got {type(value).__name__}")
    return value


def check_request(fields: dict, image_bytes: bytes | None, limits: Limits) -> dict:
    """A request's fields (and the image's bytes) checked: the canonical request for the worker.

    Returns ``{"image": base64, "width", "height", "regions": [{"id", "box", "mask",
    "detector_score"?, "detector_category_id"?}]}``; raises :class:`RequestError` (422, or
    400 for undecodable base64) naming the field, box or detection.
    """
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RequestError(422, f"unknown field {unknown[0]!r} (a request has {', '.join(FIELDS)})")
    if image_bytes is None and "image" not in fields:
        raise RequestError(422, "missing field 'image' (base64, or a file in multipart/form-data)")
    boxes, detections = _list(fields, "boxes"), _list(fields, "detections")
    if boxes is None and detections is None:
        raise RequestError(422, "missing field 'boxes' ([[x0, y0, x1, y1], ...]) or 'detections' (COCO results)")
    if boxes is not None and detections is not None:
        raise RequestError(422, "give either 'boxes' or 'detections', not both")
    if boxes is not None:
        try:
            check_count(len(boxes), limits.max_regions)  # before decoding anything: 10,000 boxes cost nothing
        except BadInputError as err:
            raise RequestError(422, str(err)) from None
    if image_bytes is None:
        image_bytes = decode_base64_image(fields["image"])
    try:
        image = read_image(image_bytes, limits.max_pixels)
    except BadInputError as err:
        raise RequestError(422, str(err)) from None
    width, height = image.size
    if boxes is not None:
        regions = _box_regions(fields, boxes, width, height, limits)
    else:
        threshold = fields.get("score_threshold", 0.0)
        try:
            found = regions_from_detections(detections, "'detections':", width, height, threshold if threshold is not None else 0.0, fields.get("top_k"))
        except BadInputError as err:
            raise RequestError(422, str(err)) from None
        if len(found) > limits.max_regions:
            raise RequestError(422, f"{len(found)} detections are kept, more than one request takes ({limits.max_regions}; use 'top_k' or 'score_threshold')")
        regions = [{"id": r["id"], "box": _inside(r["box"], f"detection {r['id']} box", width, height, limits.box_tolerance), "mask": r["segmentation"],
                    "detector_score": r["detector_score"], "detector_category_id": r["detector_category_id"]} for r in found]
    return {"image": base64.b64encode(image_bytes).decode("ascii"), "width": width, "height": height, "regions": regions}


def _box_regions(fields: dict, boxes: list, width: int, height: int, limits: Limits) -> list[dict]:
    ids = _list(fields, "ids") or list(range(len(boxes)))
    masks = _list(fields, "masks") or [None] * len(boxes)
    for name, values in (("ids", ids), ("masks", masks)):
        if len(values) != len(boxes):
            raise RequestError(422, f"'{name}' has {len(values)} entries for {len(boxes)} boxes")
    if any(not isinstance(i, (str, int)) or isinstance(i, bool) for i in ids) or len(set(map(str, ids))) != len(ids):
        raise RequestError(422, "'ids' must be distinct strings or integers")
    regions = []
    for index, (rid, box, mask) in enumerate(zip(ids, boxes, masks)):
        where = f"box {index} (id {rid!r})" if rid != index else f"box {index}"
        try:
            checked = check_box(box, where)
            mask = check_segmentation(mask, width, height, f"mask {index}")
        except BadInputError as err:
            raise RequestError(422, str(err)) from None
        regions.append({"id": rid, "box": _inside(checked, where, width, height, limits.box_tolerance), "mask": mask})
    return regions


def parse_json_body(body: bytes) -> dict:
    """A JSON request body as a dict (400 when it is not a JSON object)."""
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        detail = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise RequestError(400, f"the body is not JSON ({detail})") from None
    if not isinstance(fields, dict):
        raise RequestError(400, f"the body must be a JSON object with 'image' and 'boxes', got a JSON {type(fields).__name__}")
    return fields


def form_fields(form: Any) -> tuple[dict, bytes | None]:
    """Multipart form fields: the other fields' JSON text parsed, and the image file's bytes (if it is a file)."""
    fields: dict[str, Any] = {}
    image_bytes = None
    for name, value in form.multi_items():
        if name in fields or (name == "image" and image_bytes is not None):
            raise RequestError(422, f"field {name!r} is given twice")
        if hasattr(value, "read"):  # an UploadFile
            if name != "image":
                raise RequestError(422, f"field {name!r} is a file; only 'image' may be one")
            image_bytes = value.file.read()
            continue
        if name == "image":
            fields[name] = value
            continue
        try:
            fields[name] = json.loads(value)
        except json.JSONDecodeError as err:
            raise RequestError(422, f"field {name!r} is not JSON ({err.msg})") from None
    if image_bytes is not None and "image" in fields:
        raise RequestError(422, "field 'image' is given twice")
    return fields, image_bytes


class RequestGate:
    """ASGI middleware: checks ``POST`` requests to ``path`` (body size, content type, fields)
    and answers the bad ones itself; hands the good ones on as canonical JSON."""

    def __init__(self, app: Any, path: str = "/predict", limits: Limits | None = None):
        self.app, self.path, self.limits = app, path, limits or Limits()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        from starlette.concurrency import run_in_threadpool

        try:
            body = await self._body(scope, receive)
            fields, image_bytes = await self._fields(scope, body)
            request = await run_in_threadpool(check_request, fields, image_bytes, self.limits)  # image decoding off the event loop
        except RequestError as err:
            await self._answer(scope, receive, send, err.status, str(err))
            return
        canonical = json.dumps(request).encode()
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": canonical, "more_body": False}
            return await receive()  # the disconnect message, when it comes

        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(canonical)).encode())]
        await self.app(dict(scope, headers=headers), replay, send)

    async def _body(self, scope: dict, receive: Any) -> bytes:
        limit = self.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = f"the request body is larger than {limit:,} bytes (see --max_body_bytes)"
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, too_large)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(400, "the client went away before the body was sent")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(413, too_large)
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _fields(self, scope: dict, body: bytes) -> tuple[dict, bytes | None]:
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        kind = content_type.split(";")[0].strip().lower()
        if kind == "application/json":
            return parse_json_body(body), None
        if kind == "multipart/form-data":
            from starlette.formparsers import MultiPartException
            from starlette.requests import Request

            async def once() -> dict:
                return {"type": "http.request", "body": body, "more_body": False}

            try:
                form = await Request(scope, once).form(max_files=1, max_fields=len(FIELDS), max_part_size=self.limits.max_body_bytes)
            except MultiPartException as err:
                raise RequestError(400, f"the multipart body could not be read ({err.message})") from None
            except Exception as err:  # python-multipart's own parse errors on a garbled body
                raise RequestError(400, f"the multipart body could not be read ({type(err).__name__})") from None
            try:
                return form_fields(form)
            finally:
                await form.close()
        shown = kind or "none"
        raise RequestError(415, f"content type {shown!r} is not accepted: send application/json (base64 image) or multipart/form-data (image file)")

    @staticmethod
    async def _answer(scope: dict, receive: Any, send: Any, status: int, text: str) -> None:
        from starlette.responses import JSONResponse

        await JSONResponse({"error": text}, status_code=status)(scope, receive, send)
