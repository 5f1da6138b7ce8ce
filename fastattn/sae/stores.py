"""Activation stores: [N, d] activations in memory or in on-disk shards, streamed in batches.

A store is a list of shards (row ranges). An epoch visits the shards in a seeded random order
and each shard's rows in a seeded random order, so only one shard is loaded at a time; the
order depends only on (seed, epoch), which is what makes resuming bit-for-bit possible (the
trainer skips the batches it has already seen without loading them).

Formats:
- an in-memory tensor [N, d] (:class:`TensorStore`);
- ``.npy`` files, opened as memmaps (rows are read on demand) (:class:`NpyStore`);
- ``.safetensors`` shards holding one [n_i, d] tensor each under ``key`` ("activations") —
  loaded one shard at a time (:class:`SafetensorsStore`).
:func:`open_store` picks the class from a tensor, a file or a directory of shards;
:func:`write_shards` writes a tensor (or an iterable of tensors) as safetensors shards.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from fastattn._io import CorruptFile, atomic_write_bytes

KEY = "activations"


class ActivationStore:
    """Base class: ``shard_sizes`` and ``load(shard, rows)``; batching lives here."""

    shard_sizes: List[int]
    d: int

    def __len__(self) -> int:
        return sum(self.shard_sizes)

    def load(self, shard: int, rows: np.ndarray) -> Tensor:
        """Rows ``rows`` (int64 array, any order) of shard ``shard`` as a float32 [len, d] tensor."""
        raise NotImplementedError

    def plan(self, batch_size: int, epoch: int, seed: int) -> List[List[Tuple[int, np.ndarray]]]:
        """Every batch of the epoch as a list of (shard, rows) segments, without loading data.
        The last batch may be smaller."""
        rng = np.random.default_rng([seed, epoch])
        batches, cur, filled = [], [], 0
        for shard in rng.permutation(len(self.shard_sizes)):
            rows = rng.permutation(self.shard_sizes[shard])
            pos = 0
            while pos < len(rows):
                take = min(batch_size - filled, len(rows) - pos)
                cur.append((int(shard), rows[pos:pos + take]))
                filled += take
                pos += take
                if filled == batch_size:
                    batches.append(cur)
                    cur, filled = [], 0
        if cur:
            batches.append(cur)
        return batches

    def batches(self, batch_size: int, epoch: int, seed: int = 0, *, skip: int = 0, rank: int = 0,
                world: int = 1, drop_last: bool = False) -> Iterator[Tensor]:
        """Batches [≤ batch_size, d] of one epoch. With ``world`` > 1, rank r gets batches
        r, r + world, ... of the same plan (each rank the same count: the tail is dropped).
        ``skip`` batches (of this rank) are skipped without being read."""
        plan = self.plan(batch_size, epoch, seed)
        if drop_last and plan and sum(len(r) for _, r in plan[-1]) < batch_size:
            plan = plan[:-1]
        if world > 1:
            plan = plan[: len(plan) - len(plan) % world][rank::world]
        for segments in plan[skip:]:
            parts = [self.load(shard, rows) for shard, rows in segments]
            yield parts[0] if len(parts) == 1 else torch.cat(parts)

    def steps_per_epoch(self, batch_size: int, world: int = 1, drop_last: bool = False) -> int:
        n = len(self) // batch_size if drop_last else -(-len(self) // batch_size)
        return n // world if world > 1 else n

    def mean(self, batch_size: int = 65536) -> Tensor:
        """[d] float64: the mean of every row (one streamed pass)."""
        total, n = torch.zeros(self.d, dtype=torch.float64), 0
        for x in self.iter_rows(batch_size):
            total += x.double().sum(0)
            n += x.shape[0]
        if n == 0:
            raise ValueError("mean of an empty store")
        return total / n

    def iter_rows(self, batch_size: int = 8192) -> Iterator[Tensor]:
        """Every row once, in storage order (evaluation)."""
        for shard, size in enumerate(self.shard_sizes):
            for start in range(0, size, batch_size):
                yield self.load(shard, np.arange(start, min(size, start + batch_size)))


class TensorStore(ActivationStore):
    """An in-memory [N, d] tensor, split into ``shard_rows``-row shards for shuffling."""

    def __init__(self, x: Tensor, shard_rows: int = 1 << 20):
        if x.dim() != 2:
            raise ValueError(f"activations must be 2-D [N, d], got shape {tuple(x.shape)}")
        self.x, self.d = x, x.shape[1]
        self.starts = list(range(0, x.shape[0], shard_rows))
        self.shard_sizes = [min(shard_rows, x.shape[0] - s) for s in self.starts]

    def load(self, shard, rows):
        return self.x[self.starts[shard] + torch.from_numpy(rows)].float()


class NpyStore(ActivationStore):
    """``.npy`` files of shape [n_i, d] read through memmaps."""

    def __init__(self, paths: Sequence[Union[str, Path]]):
        self.paths = [str(p) for p in paths]
        self.arrays = []
        for p in self.paths:
            try:
                self.arrays.append(np.load(p, mmap_mode="r"))
            except (ValueError, OSError, EOFError) as e:  # truncated or not a .npy file
                raise CorruptFile(f"{p}: unreadable .npy ({e})") from None
        for p, a in zip(self.paths, self.arrays):
            if a.ndim != 2:
                raise ValueError(f"{p}: expected a 2-D array, got shape {a.shape}")
        self.d = self.arrays[0].shape[1]
        if any(a.shape[1] != self.d for a in self.arrays):
            raise ValueError("all .npy shards must have the same width")
        self.shard_sizes = [a.shape[0] for a in self.arrays]

    def load(self, shard, rows):
        order = np.argsort(rows, kind="stable")  # sorted reads are sequential on disk
        out = np.empty((len(rows), self.d), dtype=np.float32)
        out[order] = self.arrays[shard][rows[order]]
        return torch.from_numpy(out)


class SafetensorsStore(ActivationStore):
    """``.safetensors`` shards with one [n_i, d] tensor under ``key``; one shard in memory."""

    def __init__(self, paths: Sequence[Union[str, Path]], key: str = KEY):
        from safetensors import safe_open

        self.paths, self.key = [str(p) for p in paths], key
        sizes, widths = [], set()
        for p in self.paths:
            try:
                with safe_open(p, framework="pt") as f:
                    names = list(f.keys())
                    shape = f.get_slice(key).get_shape() if key in names else None
            except Exception as e:  # truncated or damaged: safetensors' message names no file
                raise CorruptFile(f"{p}: unreadable safetensors shard ({e})") from None
            if shape is None:
                raise ValueError(f"{p}: no tensor named {key!r} (has {names})")
            if len(shape) != 2:
                raise ValueError(f"{p}: {key} must be 2-D, got shape {shape}")
            sizes.append(shape[0])
            widths.add(shape[1])
        if len(widths) != 1:
            raise ValueError(f"shards have different widths {sorted(widths)}")
        self.shard_sizes, self.d = sizes, widths.pop()
        self._cached = (-1, None)

    def load(self, shard, rows):
        if self._cached[0] != shard:
            from safetensors.torch import load_file

            try:
                self._cached = (shard, load_file(self.paths[shard])[self.key])
            except Exception as e:  # changed on disk since the store was opened
                raise CorruptFile(f"{self.paths[shard]}: unreadable safetensors shard ({e})") from None
        return self._cached[1][torch.from_numpy(rows)].float()


def write_shards(batches: Union[Tensor, Iterable[Tensor]], directory: Union[str, Path],
                 shard_rows: int = 1 << 18, key: str = KEY) -> List[str]:
    """Write activations as ``shard_00000.safetensors`` ... of at most ``shard_rows`` rows."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(batches, Tensor):
        batches = batches.split(shard_rows)
    paths, buf, rows = [], [], 0

    def flush():
        nonlocal buf, rows
        if rows:
            path = directory / f"shard_{len(paths):05d}.safetensors"
            atomic_write_bytes(path, save({key: torch.cat(buf).contiguous()}))
            paths.append(str(path))
        buf, rows = [], 0

    for b in batches:
        while b.shape[0]:
            take = min(shard_rows - rows, b.shape[0])
            buf.append(b[:take].detach().cpu())
            rows += take
            b = b[take:]
            if rows == shard_rows:
                flush()
    flush()
    return paths


def open_store(source: Union[Tensor, str, Path], key: str = KEY) -> ActivationStore:
    """A store for a tensor, a ``.npy``/``.safetensors`` file, or a directory of such shards."""
    if isinstance(source, Tensor):
        return TensorStore(source)
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.npy"))
        if not files:
            raise FileNotFoundError(f"{path}: no .safetensors or .npy shards")
    elif path.exists():
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    if files[0].suffix == ".npy":
        return NpyStore(files)
    if files[0].suffix == ".safetensors":
        return SafetensorsStore(files, key)
    raise ValueError(f"{files[0]}: expected .npy or .safetensors")
