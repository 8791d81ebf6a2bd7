"""The plain verbs of ``fineregion-pl`` (quickstart, ablations, export, convert-zero, demo, rate) and the
verb table (:mod:`.cli`). Nothing in the package imports this layer."""
