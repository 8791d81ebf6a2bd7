"""``fineregion-pl rate prepare|serve|report``: a blinded human evaluation of region captions (the paper's Table 3).

One job a file: :mod:`.sampling` (prediction files, seeded stratified sample), :mod:`.images` (the
regions' images from a folder or shards), :mod:`.store` (the study in SQLite), :mod:`.prepare`,
:mod:`.page` and :mod:`.serve` (the Gradio rating page), :mod:`.stats` (bootstrap CIs,
Krippendorff's alpha, paired comparisons), :mod:`.plot` and :mod:`.report`.
"""
