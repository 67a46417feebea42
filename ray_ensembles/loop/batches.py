"""Each member's mini-batches: a pure function of (member seed, epoch, step).

Member m's epoch is its own permutation of ALL the rows, drawn from (its seed, epoch) only
(`members.epoch_permutations`), so its batches do not depend on which members share its process,
and resuming needs no RNG state.
"""

from __future__ import annotations

import math

import torch

from ..model.members import epoch_permutations

GATHER_BYTES = 32 << 20  # rows gathered ahead for the coming steps


def gather_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t[rows] for a 2-D index: index_select copies whole rows, faster on a CPU than advanced
    indexing."""
    return t.index_select(0, rows.flatten()).view(*rows.shape, *t.shape[1:])


class MemberBatches:
    """`batches(step)`: every member's mini-batch at `step`, (M, b, D) and (M, b, ...), of the
    standardised rows xs (N, D) and ys (N, ...). `member_seeds` is read at each epoch's start;
    call `reset()` after changing it (a member restarted with a fresh seed). As one `window` of a
    streamed table (`streaming`), its orders are those of that window."""

    def __init__(self, xs: torch.Tensor, ys: torch.Tensor, batch_size: int, member_seeds: list[int],
                 window: int | None = None):
        self.xs, self.ys, self.batch_size, self.member_seeds = xs, ys, batch_size, member_seeds
        self.window = window
        self.num_rows = len(xs)
        self.steps_per_epoch = math.ceil(len(xs) / batch_size)
        step_bytes = len(member_seeds) * batch_size * (xs[0].numel() * xs.element_size() + ys[0].numel() * ys.element_size())
        # a slice of rows gathered for many steps is one cheap view per step
        self.steps_per_gather = max(1, GATHER_BYTES // step_bytes)
        self.reset()

    def reset(self):
        self._order, self._order_epoch, self._gathered = None, -1, None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            self._order = epoch_permutations(self.member_seeds, epoch, len(self.xs), self.window).to(self.xs.device)
            self._order_epoch, self._gathered = epoch, None
        return self._order                                       # (M, N)

    def chunks(self, rows: int):
        """All the rows, `rows` at a time: (xs, ys) pairs."""
        return zip(self.xs.split(rows), self.ys.split(rows))

    def close(self):
        """Nothing to release (a StreamBatches stops its reader)."""

    def rows(self, step: int) -> torch.Tensor:
        """(M, b) row indices of every member's mini-batch at `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        b = self.batch_size
        return self._epoch_order(epoch)[:, position * b:(position + 1) * b]

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position = divmod(step, self.steps_per_epoch)
        order, b = self._epoch_order(epoch), self.batch_size
        first = position - position % self.steps_per_gather
        if self._gathered is None or self._gathered[0] != first:
            rows = order[:, first * b:(first + self.steps_per_gather) * b]
            self._gathered = (first, gather_rows(self.xs, rows), gather_rows(self.ys, rows))
        _, xs, ys = self._gathered
        offset = (position - first) * b
        return xs[:, offset:offset + b], ys[:, offset:offset + b]
