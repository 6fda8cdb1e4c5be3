"""Training EasyRef: the release's three-stage progressive training on one accelerate loop.

Modules, each named for what it does:

* :mod:`~easyref.training.records`: the release's JSON data format, parsed and validated.
* :mod:`~easyref.training.data`: the Dataset with the release's augmentations, a seeded
  sampler and the collate function that builds MLLM inputs and SDXL targets.
* :mod:`~easyref.training.stages`: which parameters each stage trains.
* :mod:`~easyref.training.options`: the plain settings of one run and their checks.
* :mod:`~easyref.training.checkpoints`: atomic checkpoints, ``--resume`` and the run record.
* :mod:`~easyref.training.loop`: the training loop (single process to multi-node, via accelerate).
* :mod:`~easyref.training.monitor`: progress bar, JSON lines, TensorBoard, validation grids.
* :mod:`~easyref.training.datatools`: ``easyref data groups`` and ``easyref data check``.
* :mod:`~easyref.training.commands`: the ``train`` and ``data`` subcommands.

Importing this package is light (no torch): the CLI adds its subcommands at start-up.
"""
