"""The plain verbs of ``fineregion-pl`` (quickstart, ablations, export, convert-zero, demo) and the
verb table (:mod:`.cli`). Nothing in the package imports this layer."""
