"""The rating page (Gradio): one caption of one region at a time, rated for accuracy, relevance, fluency.

A rater logs in with their name and token (Gradio's login; the cookie it sets is how every request
knows who is rating). Every handler takes the rater from ``request.username`` and nothing else,
and reads or writes only that rater's rows, so one rater can neither see nor change another's
ratings. The page never shows which model wrote a caption.

:class:`RatingSession` is the page's behaviour without Gradio (unit-tested directly);
:func:`build_page` lays it out and wires it to Gradio events.
"""

# no `from __future__ import annotations`: Gradio finds `request: gr.Request` by its evaluated annotation
import html
import io
from typing import Any, Optional

from PIL import Image

from fineregion_pl.commands.rate.store import CRITERIA, Study, Task
from fineregion_pl.data.drawing import draw_regions
from fineregion_pl.model.errors import BadInputError

QUESTIONS = {
    "accuracy": "Accuracy: is what the caption says true of the region in the box?",
    "relevance": "Relevance: is the caption about the region in the box, and does it say what matters about it?",
    "fluency": "Fluency: is the caption well-formed, natural language (whether or not it is true)?",
}
CHOICES = [("1 poor", 1), ("2", 2), ("3", 3), ("4", 4), ("5 excellent", 5)]
SKIP_REASONS = [
    "the box does not mark a clear region",
    "the image is unreadable",
    "I cannot judge this caption",
    "other (write it below)",
]
MAX_DISPLAY_SIDE = 1024
INSTRUCTIONS = """Each region is marked by a box on the image; its captions come one at a time, in a random
order, from different systems (you are not told which). Rate each caption from **1 (poor)** to
**5 (excellent)** on the three criteria, then save. **Keys:** `1`-`5` rate the highlighted
criterion and move to the next, `a` / `r` / `f` highlight accuracy / relevance / fluency, `Enter`
saves. Everything you save is stored at once; you can close the page and come back later."""

# keyboard shortcuts: clicks the radio of the highlighted criterion, Enter clicks Save
SHORTCUTS = """
<script>
(() => {
  const criteria = %s;
  let active = 0;
  const mark = () => criteria.forEach((c, i) => document.getElementById(c)?.classList.toggle("rate-active", i === active));
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (target && (target.tagName === "TEXTAREA" || (target.tagName === "INPUT" && target.type !== "radio") || target.isContentEditable)) return;
    const jump = {a: 0, r: 1, f: 2}[event.key];
    if (event.key >= "1" && event.key <= "5") {
      const input = document.querySelector(`#${criteria[active]} input[value="${event.key}"]`);
      if (!input) return;
      input.click();
      active = Math.min(active + 1, criteria.length - 1);
    } else if (jump !== undefined) {
      active = jump;
    } else if (event.key === "Enter") {
      document.getElementById("save")?.click();
      active = 0;
    } else {
      return;
    }
    event.preventDefault();
    mark();
  });
  document.addEventListener("click", (event) => {
    if (event.target.closest && event.target.closest("#save, #skip")) { active = 0; mark(); }
  });
  new MutationObserver(mark).observe(document.documentElement, {childList: true, subtree: true});
})();
</script>
""" % str(list(CRITERIA)).replace("'", '"')

CSS = """
.rate-active.block { box-shadow: inset 0 0 0 3px #2563eb !important; }
.rate-caption { font-size: 1.35em; padding: 0.6em 0.8em; border-left: 4px solid #2563eb; background: rgba(37, 99, 235, 0.06); }
"""


def region_picture(data: bytes, box: list[float]) -> Image.Image:
    """The image with the region's box drawn (small images enlarged, large ones reduced)."""
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    factor = min(1.0, MAX_DISPLAY_SIDE / max(image.size))
    if factor < 1.0:
        image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.LANCZOS)
    return draw_regions(image, [{"box": [v * factor for v in box], "caption": "region"}])


class RatingSession:
    """What the page does for an authenticated rater: the next caption, saving scores, skipping a region."""

    def __init__(self, study: Study):
        self.study = study

    def progress_text(self, rater: str) -> str:
        """One line: how many captions the rater has rated, skipped and has left."""
        p = self.study.progress(rater)
        skipped = f", {p.skipped} skipped" if p.skipped else ""
        return f"**{rater}**: {p.rated} of {p.total} captions rated{skipped}, {p.left} left"

    def view(self, rater: str, status: str = "") -> dict[str, Any]:
        """The page's content for the rater's next caption (``task`` None when they are done)."""
        task = self.study.next_task(rater)
        return {"task": task, "progress": self.progress_text(rater), "status": status,
                "done": task is None}

    def save(self, rater: str, caption_id: Optional[int], scores: dict[str, Any]) -> dict[str, Any]:
        """Save the scores, then the next caption; missing or bad scores keep the same caption."""
        if caption_id is None:
            return {**self.view(rater), "status": "Nothing to save: there is no caption on the page."}
        missing = [c for c in CRITERIA if scores.get(c) in (None, "")]
        if missing:
            return {**self.view_of(rater, caption_id), "status": f"Not saved: rate {', '.join(missing)} too (1-5).", "keep": True}
        try:
            saved = self.study.save_rating(rater, caption_id, scores)
        except BadInputError as err:
            return {**self.view_of(rater, caption_id), "status": f"Not saved: {err}.", "keep": True}
        task = self.study.task(caption_id)
        values = ", ".join(f"{c} {saved[c]}" for c in CRITERIA)
        return self.view(rater, f"Saved: region {task.position}, caption {task.slot} ({values}).")

    def skip(self, rater: str, caption_id: Optional[int], reason: Optional[str], other: Optional[str]) -> dict[str, Any]:
        """Leave out the region of the caption on the page (all its captions), with a reason."""
        if caption_id is None:
            return {**self.view(rater), "status": "Nothing to skip."}
        text = (other or "").strip() if (reason or "").startswith("other") else (reason or "").strip()
        if not text:
            return {**self.view_of(rater, caption_id), "status": "Not skipped: choose a reason (or write one under 'other').", "keep": True}
        task = self.study.task(caption_id)
        try:
            self.study.skip_item(rater, task.item_id, text)
        except BadInputError as err:
            return {**self.view_of(rater, caption_id), "status": f"Not skipped: {err}.", "keep": True}
        return self.view(rater, f"Skipped region {task.position} ({text}).")

    def view_of(self, rater: str, caption_id: int) -> dict[str, Any]:
        """The page's content for a given caption (when it stays on the page)."""
        return {"task": self.study.task(caption_id), "progress": self.progress_text(rater), "status": "", "done": False}


def caption_html(task: Optional[Task]) -> str:
    """The caption as escaped HTML (model output is never interpreted as markup)."""
    if task is None:
        return '<p class="rate-caption">All captions are rated. Thank you! You can close this page.</p>'
    return (f'<p class="rate-where">Region {task.position}, caption {task.slot} of {task.captions_in_item}</p>'
            f'<p class="rate-caption">{html.escape(task.text) or "<em>(empty caption)</em>"}</p>')


def build_page(study: Study, title: str = "Rate region captions"):
    """The Gradio Blocks of the rating page; :func:`launch_options` gives its ``launch`` settings."""
    import gradio as gr

    session = RatingSession(study)

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"## {html.escape(title)}\n{INSTRUCTIONS}")
        progress = gr.Markdown(elem_id="progress")
        status = gr.Markdown(elem_id="status")  # outside the controls, which hide when the rater is done
        current = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                picture = gr.Image(type="pil", format="png", interactive=False, show_label=False, elem_id="region-image", buttons=["fullscreen"])
            with gr.Column(scale=1):
                caption = gr.HTML(elem_id="caption")
                with gr.Column() as controls:  # hidden when the rater is done
                    radios = [gr.Radio(CHOICES, value=None, label=QUESTIONS[c], elem_id=c) for c in CRITERIA]
                    save = gr.Button("Save (Enter)", variant="primary", elem_id="save")
                    with gr.Accordion("Skip this region", open=False, elem_id="skip-panel"):
                        reason = gr.Dropdown(SKIP_REASONS, value=None, label="reason", elem_id="skip-reason")
                        other = gr.Textbox(label="other reason", max_lines=1, elem_id="skip-other")
                        skip = gr.Button("Skip region", elem_id="skip")

        outputs = [current, progress, picture, caption, *radios, status, controls]

        def render(view: dict) -> list:
            task = view["task"]
            keep = view.get("keep", False)
            radio_updates = [gr.update() if keep else gr.update(value=None) for _ in radios]
            return [
                None if task is None else task.caption_id,
                view["progress"],
                None if task is None else region_picture(task.image, task.box),
                caption_html(task),
                *radio_updates,
                view["status"],
                gr.update(visible=not view["done"]),
            ]

        def on_load(request: gr.Request):
            return render(session.view(request.username))

        def on_save(caption_id, accuracy, relevance, fluency, request: gr.Request):
            return render(session.save(request.username, caption_id, {"accuracy": accuracy, "relevance": relevance, "fluency": fluency}))

        def on_skip(caption_id, why, other_reason, request: gr.Request):
            return render(session.skip(request.username, caption_id, why, other_reason))

        page.load(on_load, None, outputs, api_visibility="private")
        save.click(on_save, [current, *radios], outputs, api_visibility="private", concurrency_limit=None, show_progress="minimal")
        skip.click(on_skip, [current, reason, other], outputs, api_visibility="private", concurrency_limit=None, show_progress="minimal")
    return page


def launch_options(study: Study) -> dict[str, Any]:
    """``launch`` keyword arguments: the login checked against the study's raters, shortcuts, style."""
    return {
        "auth": study.check_rater,
        "auth_message": "Log in with your rater name and the token the study's organiser gave you (name = username, token = password).",
        "head": SHORTCUTS,
        "css": CSS,
        "footer_links": [],
        "ssr_mode": False,
        "show_error": True,
    }
