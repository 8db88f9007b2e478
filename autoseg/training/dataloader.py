"""Training batches made in background worker processes, reproducible whatever the number of workers.

Each batch is a pure function of ``(seed, fold, rank, epoch, iteration)``: its patch positions, its
augmentation (batchgenerators draws from the global ``np.random`` and ``random``, which are re-seeded per
batch) and its foreground choices all come from a seed derived from those five numbers. So

- a run gives the same batches with 0, 1 or 8 workers, on any machine;
- a resumed run needs no saved random state to continue exactly where it stopped;
- every DDP rank draws different batches (its rank is part of the seed).

Workers are started once per run with the ``spawn`` method (safe next to an initialised torch, and the same on
Linux and macOS) and build their own memory-mapped case store; they import numpy, scipy and batchgenerators but
never torch. ``workers=0`` makes batches in one background thread of the training process instead.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.inference.cascade import append_previous_stage
from autoseg.settings import AugmentationSettings
from autoseg.training.augmentation import augment, build_train_transforms
from autoseg.training.sampling import CaseStore, PatchSampler


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a worker needs to make batches (picklable: paths and numbers only)."""

    data_dir: Path
    case_ids: tuple[str, ...]
    previous_dir: Path | None
    extract_size: tuple[int, ...]
    """Patch extracted from the case (enlarged so that rotation has real data in the corners)."""
    patch_size: tuple[int, ...]
    batch_size: int
    dim: int
    oversample_foreground: float
    augmentation: AugmentationSettings
    spacing: tuple[float, ...]
    """The configuration's target spacing (3 entries, the patch's axis order): which axes 90° rotations and
    transposes may exchange."""
    num_classes: int
    seed: int
    fold_index: int
    rank: int = 0
    distance_maps: bool = False
    """Batches carry the cases' stored signed distance maps as ``"dist"`` (a loss with a boundary term)."""


class BatchMaker:
    """Makes batch ``(epoch, iteration)`` of a :class:`LoaderSpec` deterministically."""

    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        store = CaseStore(spec.data_dir, list(spec.case_ids), spec.previous_dir, spec.distance_maps)
        self.sampler = PatchSampler(
            store,
            list(spec.extract_size),
            spec.batch_size,
            spec.dim,
            spec.oversample_foreground,
            np.random.default_rng(0),
        )
        self.transforms = build_train_transforms(list(spec.patch_size), spec.augmentation, spec.spacing)

    def make(self, epoch: int, iteration: int) -> dict[str, np.ndarray]:
        s = self.spec
        seq = np.random.SeedSequence([s.seed, s.fold_index, s.rank, epoch, iteration])
        a, b = seq.generate_state(2)
        self.sampler.rng = np.random.default_rng(seq)
        np.random.seed(int(a))
        random.seed(int(b))
        return network_batch(augment(self.transforms, self.sampler.next_batch()), s.num_classes)


def network_batch(batch: dict[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """A cascade batch carries the previous stage as seg channel 1: move it into the data as one-hot (other
    keys, such as ``"dist"``, pass unchanged)."""
    if batch["seg"].shape[1] == 1:
        return batch
    data = np.stack(
        [append_previous_stage(d, s[1], num_classes) for d, s in zip(batch["data"], batch["seg"])]
    )
    return {**batch, "data": data, "seg": np.ascontiguousarray(batch["seg"][:, :1])}


_MAKER: BatchMaker | None = None


def _init_worker(spec: LoaderSpec) -> None:
    global _MAKER
    _MAKER = BatchMaker(spec)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose training process was killed (SIGKILL, SIGTERM) exits instead of lingering."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _make_in_worker(epoch: int, iteration: int) -> dict[str, np.ndarray]:
    assert _MAKER is not None
    return _MAKER.make(epoch, iteration)


def default_workers(cpu_count: int | None = None) -> int:
    """Worker processes for augmentation when not set: all cores but one for the training process, at most 12
    (beyond that batches come faster than a GPU step on every plan measured); 0 on a single core."""
    cpus = (
        cpu_count
        if cpu_count is not None
        else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )
    return max(0, min(12, cpus - 1))


class BatchLoader:
    """Yields an epoch's batches in order while workers prepare the next ones (at most ``prefetch`` ahead)."""

    def __init__(self, spec: LoaderSpec, workers: int, prefetch: int | None = None):
        self.workers = workers
        self.prefetch = prefetch if prefetch is not None else max(2, 2 * workers)
        self._executor: Executor
        if workers > 0:
            self._executor = ProcessPoolExecutor(
                workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(spec,)
            )
            self._make = _make_in_worker
        else:
            maker = BatchMaker(spec)
            self._executor = ThreadPoolExecutor(1)
            self._make = maker.make

    def epoch(self, epoch: int, iterations: int) -> Iterator[dict[str, np.ndarray]]:
        pending: deque[Future] = deque()
        submitted = 0
        while submitted < min(self.prefetch, iterations):
            pending.append(self._executor.submit(self._make, epoch, submitted))
            submitted += 1
        while pending:
            batch = pending.popleft().result()
            if submitted < iterations:
                pending.append(self._executor.submit(self._make, epoch, submitted))
                submitted += 1
            yield batch

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
