"""Training: the LightningModules that hold the model library's modules, callbacks, strategies,
the LightningCLI wrapper and the optimiser. Imports :mod:`fineregion_pl.model`,
:mod:`fineregion_pl.data` and :mod:`fineregion_pl.evaluation`; nothing there imports it."""
