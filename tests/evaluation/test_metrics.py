"""Evaluation metrics agree with the reference implementations and behave on hand-built cases."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from fineregion_pl.evaluation.captions import caption_metrics
from fineregion_pl.evaluation.classification import category_from_text, classification_metrics
from fineregion_pl.evaluation.grounding import grounding_metrics, grounding_outcome, grounding_outcomes
from fineregion_pl.evaluation.rec import hit_fraction
from fineregion_pl.evaluation.report import results_table, write_results


def test_caption_metrics_equal_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    predictions = {"a": "a small red circle", "b": "a large blue square", "c": "a cyan cross", ("img", 3): "a tiny cat"}
    references = {
        "a": ["a small red circle", "the red circle"],
        "b": ["a large blue square"],
        "c": ["a medium cyan cross", "the cross"],
        ("img", 3): ["a small yellow triangle"],
    }
    ours = caption_metrics(predictions, references)
    keys = {k: str(i) for i, k in enumerate(predictions)}
    tok = PTBTokenizer()
    res = tok.tokenize({keys[k]: [{"caption": v}] for k, v in predictions.items()})
    gts = tok.tokenize({keys[k]: [{"caption": r} for r in references[k]] for k in predictions})
    meteor = Meteor()
    expected = {
        "CIDEr": Cider().compute_score(gts, res)[0],
        "METEOR": meteor.compute_score(gts, res)[0],
        "BLEU-4": Bleu(4).compute_score(gts, res, verbose=0)[0][3],
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
    }
    for name, value in expected.items():
        assert ours[name] == pytest.approx(float(value), abs=1e-9), name
    assert 0 < ours["CIDEr"] and 0 < ours["ROUGE-L"] < 1


def test_caption_metrics_reject_predictions_without_references():
    with pytest.raises(KeyError, match="no references"):
        caption_metrics({"x": "a red circle"}, {})


def test_classification_equals_torchmetrics_when_every_prediction_is_a_class():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (200,), generator=generator)
    predicted = torch.where(torch.rand(200, generator=generator) < 0.6, target, torch.randint(0, 5, (200,), generator=generator))
    ours = classification_metrics(predicted.tolist(), target.tolist(), 5)
    assert ours["accuracy"] == pytest.approx(float(MulticlassAccuracy(5, average="micro")(predicted, target)))
    assert ours["macro_f1"] == pytest.approx(float(MulticlassF1Score(5, average="macro")(predicted, target)))
    assert ours["count"] == 200


def test_classification_counts_no_category_as_wrong_and_skips_unknown_targets():
    result = classification_metrics([0, -1, 1, 2], [0, 1, 1, -1], 3)
    assert result["count"] == 3
    assert result["accuracy"] == pytest.approx(2 / 3)
    # class 0: f1 1; class 1: tp 1, fn 1 -> f1 2/3; class 2 absent everywhere -> not averaged
    assert result["macro_f1"] == pytest.approx((1 + 2 / 3) / 2)


@pytest.mark.parametrize(
    "text, expected",
    [("a medium blue circle", 0), ("A Large RED Triangle.", 2), ("a blue thing", -1), ("a traffic light near a light", 4), ("circles", -1)],
)
def test_category_from_text(text, expected):
    assert category_from_text(text, ["circle", "square", "triangle", "light", "traffic light"]) == expected


def test_grounding_on_hand_built_cases():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 12.0]])
    target = torch.tensor([0.0, 0.0, 10.0, 10.0])
    # the best candidate is the referred box itself
    assert grounding_outcome(torch.tensor([-1.0, -5.0, -3.0]), boxes, target) == (1.0, 1.0)
    # the best candidate does not overlap
    assert grounding_outcome(torch.tensor([-5.0, -1.0, -3.0]), boxes, target) == (0.0, 0.0)
    # a tie between a match and a miss shares the credit
    hit, iou = grounding_outcome(torch.tensor([-1.0, -1.0, -3.0]), boxes, target)
    assert hit == 0.5 and iou == pytest.approx(0.5)
    # a near match (IoU 10/12) counts at 0.5
    hit, iou = grounding_outcome(torch.tensor([-9.0, -9.0, -1.0]), boxes, target)
    assert hit == 1.0 and iou == pytest.approx(100 / 120)
    summary = grounding_metrics([(1.0, 1.0), (0.0, 0.0), (0.5, 0.5)])
    assert summary == {"acc@0.5": pytest.approx(0.5), "mIoU": pytest.approx(0.5), "expressions": 3}


def test_grounding_outcomes_of_many_expressions_equal_one_at_a_time():
    """The batched form gives each expression's numbers exactly, ties and one-candidate images included."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 12.0], [1.0, 1.0, 9.0, 9.5],
                          [20.0, 20.0, 30.0, 30.0], [5.0, 5.0, 5.0, 5.0]])
    scores = torch.tensor([-1.0, -1.0, -3.0, -9.0, -2.0, -7.5, -4.0, -0.5])
    segments = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3])
    candidates = boxes[[0, 1, 2, 2, 3, 4, 5, 0]]
    targets = boxes[[0, 3, 5, 4]]
    ours = grounding_outcomes(scores, segments, candidates, targets)
    expected = [(*grounding_outcome(scores[segments == e], candidates[segments == e], targets[e]),
                 hit_fraction(candidates[segments == e].tolist(), targets[e].tolist())) for e in range(4)]
    assert ours == expected
    assert ours[0][:2] == (0.5, 0.5) and ours[0][2] == pytest.approx(2 / 3)  # a tie shares the credit; 2 of 3 candidates hit


def test_results_files_and_table(tmp_path):
    results = {"classification": {"accuracy": 0.5, "macro_f1": 0.25}, "caption": {"CIDEr": 1.5, "regions": 3}, "note": "x"}
    path = write_results(results, tmp_path)
    assert path.read_text().count('"accuracy": 0.5') == 1
    table = results_table(results)
    assert "| classification | accuracy | 0.5000 |" in table and "| caption | regions | 3 |" in table
    assert (tmp_path / "results.md").read_text().startswith("# Results")
