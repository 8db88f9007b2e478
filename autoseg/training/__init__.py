"""Training stage: ``loop.train_fold`` composes the run (``run``), its state (``state``), the time budget
(``budget``) and the per-epoch pseudo-Dice (``patch_validation``) with splits, sampling, the data loader,
augmentation, the learning-rate schedule and distributed training. The losses live in
:mod:`autoseg.networks.losses`, checkpoint files in :mod:`autoseg.checkpoint_io`, the final validation in
:mod:`autoseg.validation`."""
