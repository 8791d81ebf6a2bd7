"""Old module paths that users' configs name in ``class_path`` keys, kept importable.

Before the model library existed, ``fineregion_pl.stage2.Stage2Module``,
``fineregion_pl.callbacks.RegionThroughputMonitor`` and ``fineregion_pl.strategies.*`` were the
class paths; a copied recipe may still say so. Importing an old path gives the new module
itself (same classes, one copy) with a ``FutureWarning`` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "fineregion_pl.stage1": "fineregion_pl.train.stage1",
    "fineregion_pl.stage2": "fineregion_pl.train.stage2",
    "fineregion_pl.callbacks": "fineregion_pl.train.callbacks",
    "fineregion_pl.strategies": "fineregion_pl.train.strategies",
    "fineregion_pl.prediction_writer": "fineregion_pl.train.prediction_writer",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}: update the class_path", FutureWarning, stacklevel=2)
        module = importlib.import_module(MOVED[spec.name])
        sys.modules[spec.name] = module
        return module

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    """Make the old paths importable (idempotent)."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
