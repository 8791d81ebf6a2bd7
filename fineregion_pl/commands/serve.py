"""``fineregion-pl serve``: an HTTP inference server on LitServe, batching requests across clients.

    pip install -e ".[serve]"
    fineregion-pl serve --ckpt_path runs/quickstart/stage2/checkpoints/last.ckpt      # http://127.0.0.1:8000
    curl -F image=@a.jpg -F 'boxes=[[10, 20, 80, 90]]' http://127.0.0.1:8000/predict

``POST /predict`` takes an image and its boxes, or a detector's COCO results (optionally with
masks), and answers JSON with one row per region; ``GET /health`` says ``ok`` once the model is
loaded. Requests are checked in the HTTP process (:class:`~fineregion_pl.commands.serve_requests.RequestGate`):
a bad one gets a 4xx and one line. Good requests from concurrent clients are batched by
LitServe (up to ``max_batch_size``, waiting at most ``batch_timeout``) and go through
:meth:`~fineregion_pl.model.captioner.RegionCaptioner.describe_many` as one batch. Docs: ``docs/serving.md``.
"""

from __future__ import annotations

import base64
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any, Optional

from fineregion_pl.commands.inputs import first_line, load_captioner, read_image
from fineregion_pl.commands.serve_requests import Limits, RequestGate
from fineregion_pl.model.errors import BadInputError

INSTALL_HINT = 'the server needs its extra: pip install -e ".[serve]"'
HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds to


try:
    from litserve import LitAPI
except ImportError:  # the verb says how to install it; the verb table must still import this module
    LitAPI = object


class CaptionerAPI(LitAPI):
    """The LitServe API over a :class:`~fineregion_pl.api.RegionCaptioner`.

    Its inputs are the canonical requests :class:`RequestGate` lets through (already checked);
    ``predict`` describes a whole batch of them in one ``describe_many`` call.

    Args:
        ckpt_path / export_dir: the model (one of the two).
        error_file: where ``setup`` writes why the model did not load (read by :func:`serve`).
        max_batch_size, batch_timeout: LitServe's dynamic batching (1: off).
    """

    def __init__(self, ckpt_path: Optional[str], export_dir: Optional[str], error_file: str, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.ckpt_path, self.export_dir, self.error_file = ckpt_path, export_dir, error_file

    def setup(self, device: str) -> None:
        captioner, error = load_captioner(self.ckpt_path, self.export_dir, device)
        if error:
            Path(self.error_file).write_text(error)
            raise RuntimeError(error)
        self.captioner = captioner

    def decode_request(self, request: dict) -> dict:
        # checked by the gate already; decoded the same way (EXIF orientation applied)
        return dict(request, image=read_image(base64.b64decode(request["image"]), max_pixels=request["width"] * request["height"]))

    def batch(self, inputs: list[dict]) -> list[dict]:
        return inputs

    def predict(self, inputs: list[dict] | dict) -> list[dict] | dict:
        if isinstance(inputs, dict):  # max_batch_size 1: LitServe passes one request, without batch/unbatch
            return self._answers([inputs])[0]
        return self._answers(inputs)

    def _answers(self, inputs: list[dict]) -> list[dict]:
        try:
            answers = self._describe(inputs)
        except Exception:  # the batch failed: each request alone, so one cannot fail the others
            traceback.print_exc(file=sys.stderr)
            answers = []
            for one in inputs:
                try:
                    answers += self._describe([one])
                except Exception as err:
                    traceback.print_exc(file=sys.stderr)
                    answers.append({"error": f"internal error ({type(err).__name__}: {first_line(err)}); the server log has the details"})
        return answers

    def _describe(self, inputs: list[dict]) -> list[dict]:
        """All regions of all requests through the model in one ``describe_many`` call."""
        used = [r for r in inputs if r["regions"]]
        masks = [[region["mask"] for region in r["regions"]] for r in used]
        rows = self.captioner.describe_many(
            [r["image"] for r in used], [[region["box"] for region in r["regions"]] for r in used],
            [[region["id"] for region in r["regions"]] for r in used], masks if any(m is not None for ms in masks for m in ms) else None,
        ) if used else []
        by_request = dict(zip(map(id, used), rows))
        answers = []
        for request in inputs:
            found = {row["region_id"]: row for row in by_request.get(id(request), [])}
            regions = []
            for region in request["regions"]:
                row = dict(found.get(region["id"], {"region_id": region["id"], "box": region["box"], "caption": None, "category": None, "category_id": None, "score": None}))
                row["mask"] = region["mask"] is not None
                if "detector_score" in region:
                    row["detector_score"], row["detector_category_id"] = region["detector_score"], region["detector_category_id"]
                regions.append(row)
            answers.append({"width": request["width"], "height": request["height"], "regions": regions, "batch_size": len(inputs)})
        return answers

    def unbatch(self, outputs: list[dict]) -> list[dict]:
        return outputs

    def encode_response(self, output: dict) -> Any:
        if "error" in output:
            from starlette.responses import JSONResponse

            return JSONResponse(output, status_code=500)
        return output


_MAIN_PID: list[int] = []


def _interrupt(signum: int, frame: Any) -> None:
    if os.getpid() in _MAIN_PID:
        raise KeyboardInterrupt
    raise SystemExit(0)  # a forked HTTP process inherits this handler; uvicorn re-raises the signal there once it has stopped


def _announce_when_ready(url: str, health: str) -> None:
    """Print the address once ``/health`` answers ok (LitServe's ``run`` blocks until it stops)."""
    def poll() -> None:
        while True:
            try:
                with urllib.request.urlopen(health, timeout=2) as answer:
                    if answer.status == 200:
                        print(f"fineregion-pl serve: serving on {url}  (POST /predict, GET /health; Ctrl+C to stop)", flush=True)
                        return
            except Exception:  # not up yet
                pass
            time.sleep(0.2)

    threading.Thread(target=poll, daemon=True).start()


def serve(
    *,
    ckpt_path: Optional[str] = None,
    export_dir: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    devices: int = 1,
    max_batch_size: int = 16,
    batch_timeout: float = 0.01,
    max_regions: int = 64,
    max_pixels: int = 40_000_000,
    max_body_bytes: int = 32 * 1024 * 1024,
    timeout: float = 60.0,
) -> None:
    """An HTTP inference server: ``POST /predict`` an image with boxes or detections, get a caption per region.

    Args:
        ckpt_path: a stage-2 checkpoint (its base LM must be reachable at the saved path).
        export_dir: a ``fineregion-pl export`` folder (instead of ``ckpt_path``).
        host: ``127.0.0.1`` (this machine only), ``0.0.0.0`` or ``::`` (every interface: there is no authentication).
        port: port to listen on (1024-65535).
        device: ``auto`` (the GPUs when there are some, else the CPU), ``cpu`` or ``cuda``.
        devices: how many GPUs, one model worker each (``device`` cuda or auto).
        max_batch_size: most requests batched into one model call (1: no batching).
        batch_timeout: longest wait (s) for a batch to fill once a request is waiting.
        max_regions: most regions in one request (boxes, or detections kept).
        max_pixels: largest image accepted, in pixels (checked from the header, before decoding).
        max_body_bytes: largest request body accepted.
        timeout: a request waiting longer than this (s) for the model is answered 504.
    """
    try:
        import litserve as ls
    except ImportError:
        raise SystemExit(INSTALL_HINT) from None
    if host not in HOSTS:
        raise BadInputError(f"--host must be one of {', '.join(HOSTS)} (LitServe binds to these), got {host!r}")
    if not 1024 <= port <= 65535:
        raise BadInputError(f"--port must be within 1024..65535, got {port}")
    if device not in ("auto", "cpu", "cuda"):
        raise BadInputError(f"--device must be auto, cpu or cuda, got {device!r}")
    if bool(ckpt_path) == bool(export_dir):
        raise BadInputError("give exactly one of --ckpt_path STAGE2.ckpt or --export_dir EXPORT_FOLDER")
    source = ckpt_path or export_dir
    if not Path(source).exists():
        raise BadInputError(f"{'checkpoint' if ckpt_path else 'export folder'} not found: {source}")
    if max_batch_size < 1 or batch_timeout < 0:
        raise BadInputError("--max_batch_size must be >= 1 and --batch_timeout >= 0")
    error_file = Path(tempfile.mkdtemp(prefix="fineregion-serve-")) / "load-error.txt"
    api = CaptionerAPI(ckpt_path, export_dir, str(error_file), max_batch_size, batch_timeout)
    limits = Limits(max_body_bytes=max_body_bytes, max_regions=max_regions, max_pixels=max_pixels)
    server = ls.LitServer(api, accelerator=device, devices=devices if device != "cpu" else "auto", timeout=timeout,
                          middlewares=[(RequestGate, {"path": "/predict", "limits": limits})], disable_openapi_url=True, restart_workers=True)
    shown = f"[{host}]" if ":" in host else host
    local = "127.0.0.1" if host == "0.0.0.0" else ("[::1]" if host == "::" else host)
    print(f"fineregion-pl serve: loading {source} (batches of up to {max_batch_size}, waiting up to {batch_timeout} s) ...", flush=True)
    _announce_when_ready(f"http://{shown}:{port}/", f"http://{local}:{port}/health")
    # SIGTERM (kill, a job scheduler) takes LitServe's Ctrl+C path, which stops the HTTP and model processes too
    _MAIN_PID.append(os.getpid())
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run(host=host, port=port, generate_client_file=False, num_api_servers=1, log_level="warning")
    except RuntimeError as err:
        if "failed to start" not in str(err):
            raise
        reason = error_file.read_text() if error_file.is_file() else f"the model worker did not start ({first_line(err)}); see the log above"
        raise BadInputError(reason) from None


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(serve)
