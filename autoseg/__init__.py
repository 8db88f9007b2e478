"""autoseg: self-configuring 3D medical image segmentation.

Modules import one way, down a layer order declared once, in ``LAYERS`` of ``tests/test_layers.py``:
cli → api → bundle → model_card → selection → validation → training → inference → planning → networks →
fingerprint → preprocessing → postprocessing → evaluation → plans (``autoseg/planning/plans.py``: the typed artifacts every
stage shares) → phantom → io → settings/checkpoint_io/undo → layout → jsonio → atomic → errors.
"""

__version__ = "0.1.0"
