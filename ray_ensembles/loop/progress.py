"""One live progress bar for a whole ensemble, and the throttle that feeds it.

The bar counts member-steps: one step of one member. An ensemble of M members trained for S steps
is M * S of them, whether they run stacked in one process or spread over Ray workers. It lives in
the driver; on Ray, workers send their progress to it every few seconds (`distributed`).
"""

from __future__ import annotations

import math
import sys
import time

from tqdm.auto import tqdm

REPORT_EVERY_S = 2.0  # how often a Ray worker tells the driver how far it has got


class EnsembleProgress:
    """`update(done, train_loss, val_nll)` moves the bar to `done` member-steps.

    The bar appears with the first update, so that its rate and ETA count training, not the
    start of Ray's workers before it.
    """

    def __init__(self, total_member_steps: int, *, enabled: bool = True, desc: str = "training"):
        self.total, self.enabled, self.desc, self.bar = total_member_steps, enabled, desc, None
        self.postfix: dict[str, str] = {}

    def update(self, done: int, train_loss: float | None = None, val_nll: float | None = None):
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=self.total, initial=done, unit="member-step", desc=self.desc,
                            dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
        postfix = dict(self.postfix)
        if train_loss is not None and math.isfinite(train_loss):
            postfix["loss"] = f"{train_loss:.4g}"
        if val_nll is not None:
            postfix["val_nll"] = f"{val_nll:.4g}"
        if done == self.bar.n and postfix == self.postfix:
            return  # nothing new: a redraw would only lower the rate shown after the end
        self.postfix = postfix
        self.bar.n = done  # a restarted Ray worker resumes from its checkpoint: the bar may move back
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Every:
    """True at most once every `seconds` (and on the first call): a step's cost is one clock read."""

    def __init__(self, seconds: float):
        self.seconds, self.next = seconds, 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now < self.next:
            return False
        self.next = now + self.seconds
        return True
