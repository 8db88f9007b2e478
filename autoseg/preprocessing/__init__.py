"""Preprocessing stage: crop to the nonzero region, normalize, resample (and the per-case pipeline)."""
