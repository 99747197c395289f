"""Fixed-length, left-padded model inputs built from item sequences (0 = padding).

Training examples cut each training sequence into windows from its end (LRURec/SASRec
style): a sequence s of n >= 2 items yields windows ending at n, n - L, n - 2L, ...
(while the end is >= 2); the example of the window ending at e is
s[max(0, e - L - 1) : e], inputs = example[:-1], labels = example[1:]. Every item but
the first is thus a label exactly once (the first too with `first_item_label`, from the
all-padding input before it, as LRURec's training windows do).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch


def _segments(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment index, position within the segment) of every element of concatenated segments."""
    total = int(lengths.sum())
    seg = np.repeat(np.arange(lengths.size), lengths)
    pos = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return seg, pos


def left_pad(seqs: Sequence[np.ndarray], max_len: int) -> np.ndarray:
    """(B, max_len) int64: the last max_len items of each sequence, zeros on the left."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    keep = np.minimum(lengths, max_len)
    out = np.zeros((len(seqs), max_len), dtype=np.int64)
    if keep.sum() == 0:
        return out
    flat = np.concatenate([np.asarray(s)[len(s) - k :] for s, k in zip(seqs, keep)])
    row, pos = _segments(keep)
    out[row, max_len - keep[row] + pos] = flat
    return out


class TrainWindows:
    """All training examples of one domain as a padded (n_windows, max_len + 1) int32 matrix.

    Row r is example r left-padded to max_len + 1, so a batch is one fancy index.
    """

    def __init__(self, train_seqs: Sequence[np.ndarray], max_len: int, first_item_label: bool = False):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        self.first_item_label = first_item_label
        lengths = np.fromiter((len(s) for s in train_seqs), dtype=np.int64, count=len(train_seqs))
        flat = np.concatenate([np.asarray(s, dtype=np.int32) for s in train_seqs]) if len(train_seqs) else np.zeros(0, np.int32)
        seq_start = np.cumsum(lengths) - lengths
        n_windows = np.where(lengths >= 2, (lengths - 2) // max_len + 1, 0)
        seq, k = _segments(n_windows)
        end = lengths[seq] - k * max_len
        start = np.maximum(0, end - max_len - 1)
        size = end - start
        row, pos = _segments(size)
        self.matrix = np.zeros((seq.size, max_len + 1), dtype=np.int32)
        self.matrix[row, max_len + 1 - size[row] + pos] = flat[seq_start[seq][row] + start[row] + pos]

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), both LongTensor (B, max_len); labels are 0 where inputs are
        padding, except, with `first_item_label`, the sequence's first item, labelled at the
        padding position just before it (a window that starts the sequence and has room)."""
        example = self.matrix[rows]
        inputs = example[:, :-1].astype(np.int64)
        labels = example[:, 1:] if self.first_item_label else np.where(inputs != 0, example[:, 1:], 0)
        labels = labels.astype(np.int64)
        return torch.from_numpy(inputs), torch.from_numpy(labels)

    def sample_rows(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """min(batch_size, len(self)) distinct window indices, uniformly at random."""
        if len(self) == 0:
            raise ValueError("no training windows (every training sequence has fewer than 2 items)")
        return rng.choice(len(self), size=min(batch_size, len(self)), replace=False)


def epoch_order_rows(size: int, batch_size: int, draw: int, seed: int) -> np.ndarray:
    """Rows of batch number `draw` when batches walk the windows epoch by epoch.

    The windows are read in the order of a fresh permutation per epoch (epoch e's is
    seeded by (seed, e)), `batch_size` at a time, so each window is in exactly one batch
    per epoch (a batch may straddle two epochs). A pure function of its arguments, so a
    resumed run draws the same batches without saving any state."""
    if size < 1:
        raise ValueError("no training windows (every training sequence has fewer than 2 items)")
    batch_size = min(batch_size, size)
    start = draw * batch_size
    index = np.arange(start, start + batch_size, dtype=np.int64)
    epochs = index // size
    rows = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        rows[sel] = _epoch_permutation(size, seed & 0xFFFFFFFF, int(epoch))[index[sel] % size]
    return rows


@functools.lru_cache(maxsize=4)
def _epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    """The window order of one epoch, drawn once per epoch (not once per batch)."""
    perm = np.random.default_rng([seed, epoch]).permutation(size)
    perm.flags.writeable = False
    return perm

