"""Inference stage: sliding-window prediction, fold ensembling and export to the input geometry.

Never imports ``autoseg.training``.
"""
