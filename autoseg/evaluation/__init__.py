"""Evaluation: overlap and surface metrics per label and region (``metrics``), and whole prediction folders
scored against reference label maps, with a JSON summary and a CSV (``evaluate``)."""
