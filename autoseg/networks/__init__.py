"""Networks shared by planning, training and inference.

The registry lives in :mod:`autoseg.networks.registry` (``ARCHITECTURES``, ``build_network``, ...) and is
re-exported here, so ``from autoseg.networks import build_network`` keeps working. The architecture modules
(``unet``, ``resenc``, ``vnet``) import their shared blocks from :mod:`autoseg.networks.blocks` directly, never
through this package, so no module of the package imports it back.
"""

from __future__ import annotations

from autoseg.networks.registry import ARCHITECTURES, Builder, available, build_network

__all__ = ["ARCHITECTURES", "Builder", "available", "build_network"]
