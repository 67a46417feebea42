"""The training step's forward and backward pass, replayed from CUDA graphs.

For small members a GPU step is mostly kernel launches from Python, which a replay does at once
(docs/performance.md has the figures). One graph per batch shape: an epoch's last batch may be
smaller. Capture needs warmed-up kernels, so each shape first runs eagerly on a side stream.
"""

from __future__ import annotations

from typing import Callable

import torch

EAGER_RUNS_BEFORE_CAPTURE = 3  # of each batch shape


class GraphedStep:
    """`graphed(xs, ys)` is `step(xs, ys)`: the members' losses (M,), with each parameter's
    gradient set, for a `step` whose kernels all run on the GPU from a fixed set of tensors."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], params: list[torch.Tensor]):
        self.step, self.params = step, params
        self.graphs: dict[tuple, tuple] = {}
        self._eager_runs: dict[tuple, int] = {}

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        key = tuple(xs.shape)  # ys's shape follows from it
        captured = self.graphs.get(key)
        if captured is None:
            self._eager_runs[key] = self._eager_runs.get(key, 0) + 1
            if self._eager_runs[key] <= EAGER_RUNS_BEFORE_CAPTURE:
                side = torch.cuda.Stream(xs.device)
                side.wait_stream(torch.cuda.current_stream(xs.device))
                with torch.cuda.stream(side):
                    losses = self.step(xs, ys)
                torch.cuda.current_stream(xs.device).wait_stream(side)
                return losses
            captured = self.graphs[key] = self._capture(xs, ys)
        graph, static_xs, static_ys, losses, grads = captured
        static_xs.copy_(xs)
        static_ys.copy_(ys)
        graph.replay()
        for p, g in zip(self.params, grads):  # another shape's capture may have left its own
            p.grad = g
        return losses.clone()  # the next replay overwrites the graph's output

    def _capture(self, xs, ys) -> tuple:
        """Record (not run) the step on static copies of this batch's inputs."""
        static_xs, static_ys = xs.clone(), ys.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            losses = self.step(static_xs, static_ys)
        return graph, static_xs, static_ys, losses, [p.grad for p in self.params]
