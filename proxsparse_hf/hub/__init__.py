"""Model cards and Hub upload: ``card`` (build / save a card), ``results`` (the evaluation section, read from
``EvalResults``: rows, table, notes, model-index), ``facts`` (hyperparameters, hardware, datasets, license, method
names), ``checks`` (local card validation), ``push`` (one atomic commit)."""
