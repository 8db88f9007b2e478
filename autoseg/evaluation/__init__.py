"""Evaluation: overlap, volume and surface metrics per label and region (``metrics``), whole prediction folders
scored against reference label maps with a JSON summary and a CSV (``evaluate``), and their figures: box plots
and per-case contour overlays (``report``)."""
