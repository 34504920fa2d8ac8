"""An infinite, seeded, exactly resumable stream of training batches.

Why not ``torch.utils.data.DataLoader`` alone: a compression run is long and gets
interrupted, and a resumed run must continue with *exactly* the batches the uninterrupted
run would have seen, otherwise "resume" silently changes the result. A DataLoader's sampler
keeps its position in an iterator that cannot be saved, and its shuffling draws from
torch's global RNG, which model code also consumes. The stream here is a pure function of
``(seed, epoch, position)``: each epoch's order is ``torch.randperm`` from
``torch.Generator().manual_seed(seed + epoch)``, and its state is a few plain ints that go
into a checkpoint.

One global batch per optimizer step: every process (and every gradient-accumulation
micro-batch) takes its own rows of the same global batch, so the run sees the same data
whatever the number of processes. Decoding can run in DataLoader workers
(:meth:`BatchStream.loader`), fed the same index lists.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from difcompress.core.errors import UserError
from difcompress.data.conditions import Conditions, take
from difcompress.data.datasets import TensorImageDataset

# Decoded items are cached in memory only up to this many items ...
CACHE_MAX_ITEMS = 50_000
# ... and only while the cache stays under this many bytes (50k 256px RGB floats are 39 GB).
CACHE_MAX_BYTES = 4 * 1024**3


class BatchStream:
    """Global batches of ``batch_size`` items, epoch after epoch.

    Epoch ``e`` is ``perm = randperm(N, generator=Generator().manual_seed(seed + e))`` cut
    into consecutive batches, dropping an incomplete last batch. If the dataset is smaller
    than one batch, each epoch is a single batch that cycles through ``perm`` until it is
    full, so every item appears and the batch is always full.

    The stream does not touch torch's global RNG.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, cache: bool = True,
                 conditions: Conditions | None = None):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise UserError("the dataset is empty; give data with at least one image")
        self.dataset = dataset
        self.conditions = conditions  # one row per item, batched with the items
        self.num_items = n
        self.batch_size = batch_size
        self.seed = int(seed)
        self.epoch = 0  # the next batch's epoch and offset in that epoch's permutation
        self.position = 0
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None
        # Tensor datasets are already in memory: index them directly, never cache.
        self._tensor_images = dataset.images if isinstance(dataset, TensorImageDataset) else None
        self._cache: dict[int, torch.Tensor] | None = (
            {} if cache and self._tensor_images is None and n <= CACHE_MAX_ITEMS else None)
        self._cache_checked = False

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch (1 when the dataset is smaller than a batch)."""
        return max(1, self.num_items // self.batch_size)

    @property
    def in_memory(self) -> bool:
        """True when items are tensors already (nothing to decode)."""
        return self._tensor_images is not None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            self._perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
            self._perm_epoch = epoch
        return self._perm

    def batch_indices(self, epoch: int, position: int) -> torch.Tensor:
        """Dataset indices of the batch that starts at ``position`` of ``epoch``."""
        perm = self._permutation(epoch)
        if self.num_items >= self.batch_size:
            return perm[position: position + self.batch_size]
        return perm[torch.arange(self.batch_size) % self.num_items]

    def _after(self, epoch: int, position: int) -> tuple[int, int]:
        """The (epoch, position) of the batch after the one at (epoch, position)."""
        epoch, k = divmod(epoch * self.batches_per_epoch + position // self.batch_size + 1, self.batches_per_epoch)
        return epoch, k * self.batch_size

    def next_indices(self) -> torch.Tensor:
        """Indices of the next global batch; advances the stream."""
        idx = self.batch_indices(self.epoch, self.position)
        self.epoch, self.position = self._after(self.epoch, self.position)
        return idx

    def load(self, indices: torch.Tensor) -> tuple[torch.Tensor, Conditions | None]:
        """The items at ``indices``, stacked, and their conditions (None without)."""
        if self._tensor_images is not None:
            batch = self._tensor_images[indices]
        else:
            batch = torch.stack([self._item(int(i)) for i in indices.tolist()])
        return batch, take(self.conditions, indices)

    def next_with_conditions(self, rows: slice | None = None) -> tuple[torch.Tensor, Conditions | None]:
        """The next global batch (or only its ``rows``) and its conditions."""
        idx = self.next_indices()
        return self.load(idx if rows is None else idx[rows])

    def next_batch(self) -> torch.Tensor:
        """The next global batch, stacked: ``(batch_size, C, H, W)``."""
        return self.next_with_conditions()[0]

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def _item(self, i: int) -> torch.Tensor:
        if self._cache is None:
            return self.dataset[i]
        hit = self._cache.get(i)
        if hit is not None:
            return hit
        x = self.dataset[i]
        if not self._cache_checked:
            self._cache_checked = True
            if x.numel() * x.element_size() * self.num_items > CACHE_MAX_BYTES:
                self._cache = None  # would not fit comfortably in memory
                return x
        self._cache[i] = x
        return x

    def loader(self, rows: slice, num_workers: int) -> Iterator[tuple[torch.Tensor, Conditions | None]]:
        """Batches decoded by ``num_workers`` DataLoader worker processes, from the current
        state on: the same items and order as :meth:`next_with_conditions` gives, so resume
        stays exact. The stream's state advances as batches are handed out."""
        def index_lists():
            epoch, position = self.epoch, self.position
            while True:
                yield self.batch_indices(epoch, position)[rows].tolist()
                epoch, position = self._after(epoch, position)

        loader = DataLoader(self.dataset, batch_sampler=index_lists(), num_workers=num_workers,
                            persistent_workers=True, prefetch_factor=2)
        for images in loader:
            idx = self.next_indices()[rows]
            yield images, take(self.conditions, idx)

    def state_dict(self) -> dict[str, int]:
        """Plain ints to put in a checkpoint."""
        return {"epoch": int(self.epoch), "position": int(self.position), "seed": int(self.seed),
                "batch_size": int(self.batch_size), "num_items": int(self.num_items)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the stream that produced ``state`` stopped.

        Seed and batch size are taken from ``state``; the dataset must have the same
        number of items as when the state was saved.
        """
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
            seed, batch_size = int(state["seed"]), int(state["batch_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"checkpoint has no valid data-stream state ({e!r}); start a fresh run") from e
        saved_n = state.get("num_items")
        if saved_n is not None and int(saved_n) != self.num_items:
            raise UserError(f"the data changed since the checkpoint: it had {int(saved_n)} items, now "
                            f"{self.num_items}; resume with the same data or start a fresh run")
        bpe = max(1, self.num_items // batch_size) if batch_size >= 1 else 0
        if batch_size < 1 or epoch < 0 or position < 0 or position % batch_size or position // batch_size >= bpe:
            raise UserError(f"checkpoint has an invalid data-stream state {dict(state)}; start a fresh run")
        self.seed, self.batch_size = seed, batch_size
        self._perm_epoch, self._perm = None, None
        self.epoch, self.position = epoch, position

    def __repr__(self) -> str:
        return (f"BatchStream(items={self.num_items}, batch_size={self.batch_size}, seed={self.seed}, "
                f"epoch={self.epoch}, position={self.position})")
