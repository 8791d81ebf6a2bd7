"""Evaluation: caption metrics (pycocoevalcap), classification (torchmetrics), grounding, reports."""
