"""The named evaluation protocols: which published file each reads, what it counts and what its numbers compare with.

A protocol fixes the data (an annotation file as it is distributed), the unit an item is (a
sentence, a region, an image), how the model is asked (a caption for a box, a box for a sentence)
and how the answer is scored. Every results file names its protocol in its card, so a number
never travels without it. The formats and the reference code behind each protocol are described
in ``docs/evaluation.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from fineregion_pl.model.errors import BadInputError

Task = Literal["regcap", "densecap", "rec", "gt-ranking"]
ProtocolName = Literal["refcocog-regcap", "vg-regcap", "vg-densecap", "refcocog-rec", "gt-ranking"]


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol.

    Attributes:
        name: what results cards and ``--data.protocol`` call it.
        task: ``regcap`` (a caption per annotated box), ``densecap`` (captions for every box of an
            image), ``rec`` (a box for each sentence, from candidates), ``gt-ranking`` (a box for
            each sentence, from the image's annotated boxes).
        unit: what one scored item is.
        summary: one line on what it measures.
        reads: the annotation files it reads, as distributed.
        comparable_with: published numbers measured the same way (as the papers print them).
        not_comparable_with: numbers that look alike but were measured otherwise.
        expected_items: items in the published file, by file name, when the count is known.
        published: whether any published number is measured this way.
    """

    name: str
    task: Task
    unit: str
    summary: str
    reads: str
    comparable_with: str
    not_comparable_with: str
    expected_items: dict[str, tuple[int, str]] = field(default_factory=dict)
    published: bool = True


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "refcocog-regcap", "regcap", "sentences",
            "RefCOCOg (umd) val region captioning: one caption per referring sentence's box, scored against that sentence",
            "MDETR-style finetune_refcocog_val_captions.json (GLaMM), finetune_refcocog_val_with_mask.json (Osprey), "
            "refcocog_cap_val.json (Groma), refcocog_val.json (ControlCap/DynRefer, xyxy boxes)",
            "GLaMM, Osprey, Groma, DynRefer, ControlCap RefCOCOg region-captioning METEOR/CIDEr",
            "RefCOCOg numbers on other splits or packagings (lmms-eval's lmms-lab/RefCOCOg), or scored with several references per region",
            {"finetune_refcocog_val_captions.json": (4896, "RefCOCOg umd val sentences as commonly reported; recalled, not checked against GLaMM's file")},
        ),
        Protocol(
            "vg-regcap", "regcap", "regions",
            "Visual Genome region captioning on GLaMM's one-region-per-image test set",
            "GLaMM's test_caption.json, Groma's vg_test.json, ControlCap/DynRefer vg_reg/test.json",
            "GLaMM, Groma, ControlCap and DynRefer 'VG' region-captioning METEOR/CIDEr",
            "vg-densecap (GRiT's full test set: several regions per image; about 1 METEOR lower, ControlCap#5) and DenseCap mAP",
        ),
        Protocol(
            "vg-densecap", "densecap", "images",
            "Visual Genome dense captioning on GRiT's full test set: every annotated region of each image",
            "GRiT's VG test.json (LVIS-style, several regions per image)",
            "COCOEvalCap on GRiT's test set (ASM/TAP-style 'VG' numbers); with densecap_map, DenseCap mAP as DynRefer's Python port computes it",
            "vg-regcap (GLaMM's one-region set); DenseCap's Lua evaluator (+1-pixel IoU, 101-point AP, <UNK>-decoded references)",
            {"test.json": (5000, "DenseCap's info/densecap_splits.json lists 5,000 test images")},
        ),
        Protocol(
            "refcocog-rec", "rec", "sentences",
            "RefCOCOg referring expression comprehension: pick one of a detector's proposals for each sentence; acc@0.5 over all sentences",
            "MDETR's finetune_refcocog_{val,test}.json (one box per sentence) and a COCO detection-results file of proposals",
            "REC acc@0.5 of detector-proposal methods (Groma); box-generating models (Shikra, Ferret) measure the same quantity without proposals",
            "gt-ranking (ranks the annotated boxes: an easier task)",
            {
                "finetune_refcocog_val.json": (4896, "RefCOCOg umd val sentences as commonly reported (val + test = 14,498, Ref-L4)"),
                "finetune_refcocog_test.json": (9602, "RefCOCOg umd test sentences as commonly reported (val + test = 14,498, Ref-L4)"),
            },
        ),
        Protocol(
            "gt-ranking", "gt-ranking", "sentences",
            "rank the annotated boxes of a sentence's image by the sentence's likelihood; chance is printed beside it",
            "MDETR's finetune_refcocog_*.json (the candidates: every annotated box of the same COCO image), or the shards' referring expressions",
            "nothing published: the candidates come from the annotation, which no REC benchmark gives",
            "REC acc@0.5 (refcocog-rec): there the candidates are not the annotation's",
            published=False,
        ),
    )
}

SHARDS_PROTOCOLS = {
    "synthetic": "the synthetic benchmark's test split: synthetic-classification, synthetic-regcap (every reference of a region), gt-ranking, synthetic-spatial",
    "shards": "the test split of our converters' shards: shards-classification, shards-regcap (every reference of a region), gt-ranking, shards-spatial",
}
# the results.json section of each protocol a shards test runs, by name ({source}: synthetic or shards)
SHARDS_SECTIONS = {
    "classification": "{source}-classification",
    "caption": "{source}-regcap",
    "gt-ranking": "gt-ranking",
    "spatial": "{source}-spatial",
}


def get_protocol(name: Optional[str]) -> Protocol:
    """The protocol called ``name``; a one-line error listing the names otherwise."""
    if name not in PROTOCOLS:
        raise BadInputError(f"unknown evaluation protocol {name!r}: use one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
