"""Training state in a checkpoint: model, optimizer, epoch, random-number states, best EMA pseudo-Dice.

Random states are stored without pickle: numpy's global MT19937 state and Python's ``random`` state (both
used by batchgenerators) as tensors plus ints, the torch CPU generator state as a uint8 tensor, and the
sampler's ``np.random.Generator`` state as JSON text.
"""

from __future__ import annotations

import json
import random

import numpy as np
import torch


def capture_rng(sampler_rng: np.random.Generator) -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "np_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "np_pos": int(pos),
        "np_has_gauss": int(has_gauss),
        "np_cached": float(cached),
        "py_state": torch.tensor(random.getstate()[1], dtype=torch.int64),
        "py_gauss": random.getstate()[2],
        "torch": torch.get_rng_state(),
        "sampler": json.dumps(sampler_rng.bit_generator.state),
    }


def restore_rng(state: dict, sampler_rng: np.random.Generator) -> None:
    keys = state["np_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["np_pos"], state["np_has_gauss"], state["np_cached"]))
    random.setstate((3, tuple(int(v) for v in state["py_state"].tolist()), state["py_gauss"]))
    torch.set_rng_state(state["torch"])
    sampler_rng.bit_generator.state = json.loads(state["sampler"])
