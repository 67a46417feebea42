"""DeepEnsemble (Gaussian regression) and DeepEnsembleClassifier (softmax): members, a head, a
standardiser.

Shapes: B rows, S = input_shape (D,) for a table or channel-first (C, H, W) for images,
T = dim_out, C = num_classes, M = members held by this object. Members see inputs standardised
with statistics fitted on the training data (`fit_normalization`, called by the Trainer);
predictions come back in the target's original units.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..io import storage
from ..io.manifest import Manifest
from . import adversarial
from .heads import CategoricalHead, GaussianHead
from .members import ACTIVATIONS, SHAPE, MemberGroups, build_members, member_seed
from .predictions import CategoricalPrediction, GaussianMixturePrediction, MemberPrediction
from .standardize import Standardizer
from .validation import as_float_tensor, check_bool, check_callable, check_choice, check_float, check_int, fail

PREDICT_CHUNK_ROWS = 8192  # rows per forward pass at inference on a CPU: bounds memory, keeps matmuls large
# On a GPU a pass is mostly kernel launches, so passes are as large as this much activation memory allows.
PREDICT_CHUNK_BYTES_GPU = 512 << 20
# what every member of a combined ensemble shares (its inputs, outputs and kind of members)
SHARED = ("dim_in", "dim_out", "num_classes", "member_factory")
# the options every ensemble takes besides its head's, in the order of the config
ARCHITECTURE = ("dim_in", "hidden_dim", "depth", "activation", "batch_norm", "use_adversarial_training",
                "adversarial_eps", "perturbation", "seed", "standardize_inputs")


def check_finite_prediction(t: torch.Tensor, what: str, ensemble=None):
    """Predictions are never silently NaN or inf: raise, saying where and why."""
    if not torch.isfinite(t).all():
        # a row is bad if any member's output for it is: (M, B, D) counts B rows, not M x B
        rows = int((~torch.isfinite(t)).any(-1).reshape(-1, t.shape[-2]).any(0).sum()) if t.ndim > 1 else 1
        scale = "" if ensemble is None or ensemble.task != "regression" else (
            f"; the target's scale (std {ensemble.standardizer.y_std.tolist()}) may overflow "
            f"{ensemble.standardizer.target_dtype}: train on a float64 target, or rescale it")
        raise FloatingPointError(f"The ensemble's {what} are not finite ({rows} of {t.shape[-2] if t.ndim > 1 else 1} "
                                 f"rows){scale}.")


class Ensemble(nn.Module):
    """What DeepEnsemble and DeepEnsembleClassifier share; they differ only in their head."""

    def __init__(self, head, *, dim_in, num_members, hidden_dim, depth, activation, batch_norm,
                 use_adversarial_training, adversarial_eps, perturbation, seed, member_ids, member_factory,
                 standardize_inputs):
        super().__init__()
        owner = type(self).__name__
        self.head = head
        # numbers are stored as Python's own: a numpy int would pass here and then fail to save
        self.input_shape = check_input_shape(owner, dim_in)
        self.standardize_inputs = check_bool(owner, "standardize_inputs", standardize_inputs)
        num_members = check_int(owner, "num_members", num_members, minimum=1)
        self.hidden_dim = check_int(owner, "hidden_dim", hidden_dim, minimum=1)
        self.depth = check_int(owner, "depth", depth, minimum=1)
        self.activation = check_choice(owner, "activation", activation, ACTIVATIONS)
        self.batch_norm = check_bool(owner, "batch_norm", batch_norm)
        self.use_adversarial_training = check_bool(owner, "use_adversarial_training", use_adversarial_training)
        self.adversarial_eps = float(check_float(owner, "adversarial_eps", adversarial_eps, minimum=0.0))
        self.perturbation = check_choice(owner, "perturbation", perturbation, {"fgsm", "random"})
        self.seed = check_int(owner, "seed", seed, minimum=0)
        if member_ids is None:
            member_ids = list(range(num_members))
        member_ids = [check_int(owner, "member_ids", m, minimum=0) for m in member_ids]
        if len(member_ids) != num_members or len(set(member_ids)) != num_members:
            fail(owner, "member_ids", f"{num_members} distinct ids (num_members)", member_ids)
        self.member_factory = check_callable(owner, "member_factory", member_factory, "a callable returning an nn.Module")
        self.member_ids = member_ids
        self.member_seeds = [member_seed(seed, m) for m in member_ids]
        self.members = build_members(owner, self.member_seeds, self.input_shape, head.num_outputs, self.hidden_dim,
                                     self.depth, activation, batch_norm, member_factory)
        self.standardizer = Standardizer(self.input_shape, head.dim_out, self.standardize_inputs)
        self.calibration = None
        self._member_configs = None  # per member, for an ensemble `combine`d from several

    @property
    def dim_in(self) -> int | list[int]:
        """The number of input features of a table, or the shape of one input (`input_shape`)."""
        return self.input_shape[0] if len(self.input_shape) == 1 else list(self.input_shape)

    @property
    def calibration(self) -> dict | None:
        """The post-hoc calibration applied to every prediction (`calibrate`), or None."""
        return self._calibration

    @calibration.setter
    def calibration(self, calibration: dict | None):
        self._calibration = None if calibration is None else self.head.check_calibration(calibration)
        scores = (self._calibration or {}).get("conformal_scores")
        self._conformal_scores = None if scores is None else torch.tensor(scores, dtype=torch.float64)

    @property
    def task(self) -> str:
        return self.head.task

    @property
    def config(self) -> dict:
        """The architecture, as saved: what rebuilds these members (with the factory itself)."""
        factory = self.member_factory
        # the factory's name is recorded for people; loading needs the callable itself again
        name = None if factory is None else \
            f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', repr(factory))}"
        config = {**{k: getattr(self, k) for k in ARCHITECTURE}, **self.head.config, "member_factory": name}
        if self.standardize_inputs:  # the default, and all that readers before format version 5 know
            del config["standardize_inputs"]
        return config

    @property
    def num_members(self) -> int:
        return len(self.member_ids)

    @property
    def member_configs(self) -> list[dict]:
        """Each member's configuration: the ensemble's `config` for all, or, for an ensemble
        `combine`d from several, each member's own, with the `hyperparameters` it trained with."""
        return [self.member_config(i) for i in range(self.num_members)]

    def member_config(self, index: int) -> dict:
        return self.config if self._member_configs is None else dict(self._member_configs[index])

    @property
    def is_combined(self) -> bool:
        """Whether the members have configurations of their own (`combine`): such an ensemble
        predicts, saves and loads like any other, but does not train as one."""
        return self._member_configs is not None

    @property
    def device(self) -> torch.device:
        return self.standardizer.x_mean.device

    @property
    def feature_names(self) -> list[str] | None:
        return self.standardizer.feature_names

    @feature_names.setter
    def feature_names(self, names: list[str] | None):
        self.standardizer.feature_names = names

    @property
    def normalization_fitted(self) -> bool:
        return self.standardizer.fitted

    def extra_repr(self):
        return f"task={self.task}, member_ids={self.member_ids}, config={self.config}"

    @property
    def adversarial_step(self) -> torch.Tensor:
        """The FGSM step per channel, in standardised units, broadcast over an input (S)."""
        return self.standardizer.adversarial_step(self.adversarial_eps)

    def fit_normalization(self, x, y=None):
        """Fit input (and, for regression, target) standardisation on the training data (N, *S)."""
        x = self.check_x(x, allow_members=False).double()
        self.standardizer.fit(x, None if y is None else self.check_y(y, len(x)))

    # training -----------------------------------------------------------------------------------

    def forward(self, x, y=None):
        """`ensemble(X, y)`: the summed training loss of all members. `ensemble(X)`: a prediction.

        X is (B, *S), given to every member, or (M, B, *S), one batch per member.
        """
        if y is None:
            return self.predict(x)
        x = self.check_x(x)
        y = self.check_y(y, x.shape[-2])
        return self.member_losses(self.standardizer.standardize_x(x), self.standardizer.standardize_y(y)).sum()

    def member_losses(self, xs, ys, step: int | None = None):
        """Per-member training loss (M,) on standardised inputs xs, (B, *S) or (M, B, *S), with
        each member's own adversarial term when adversarial training is on (`adversarial`)."""
        return adversarial.member_losses(self, self.for_members(xs), ys, step)

    def for_members(self, xs: torch.Tensor) -> torch.Tensor:
        """Inputs (B, *S) as every member's batch (M, B, *S) (a view); (M, B, *S) as they are."""
        return xs.expand(self.num_members, *xs.shape[-len(self.input_shape) - 1:])

    # inference ----------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, x, batch_size: int | None = None) -> GaussianMixturePrediction | CategoricalPrediction:
        """The ensemble's prediction at original-unit inputs x (B, *S): the mixture of member
        Gaussians in original units, or the averaged softmax. All members run in eval mode,
        `batch_size` rows at a time on the ensemble's device; the result is on x's device."""
        x = self.check_x(x, allow_members=False, move=False)
        if batch_size is not None:
            batch_size = check_int("predict", "batch_size", batch_size, minimum=1)
        elif self.device.type != "cpu":
            widest = max(math.prod(self.input_shape), self.hidden_dim)
            batch_size = max(PREDICT_CHUNK_ROWS, PREDICT_CHUNK_BYTES_GPU // (4 * self.num_members * widest))
        else:
            batch_size = PREDICT_CHUNK_ROWS
        # Prediction changes nothing shared, so threads may predict at once. An ensemble in
        # training mode predicts with an eval-mode copy of its members: flipping the shared flag
        # would let another thread's pass run in training mode and move batch norm's statistics.
        members = copy.deepcopy(self.members).eval() if self.training else self.members
        parts = []
        for k, chunk in enumerate(x.split(batch_size)):
            xs = self.standardizer.standardize_x(chunk.to(self.device))
            beyond = ~torch.isfinite(xs).flatten(1).all(-1)  # finite inputs (check_x) too far out for float32
            if beyond.any():
                raise ValueError(f"The 'X' parameter of predict must hold rows the members can take: row "
                                 f"{k * batch_size + int(beyond.nonzero()[0])} is beyond float32 once standardised "
                                 f"(input means {self.standardizer.x_mean.tolist()}, stds "
                                 f"{self.standardizer.x_std.tolist()}). Got {int(beyond.sum())} such rows.")
            xs = self.for_members(xs)
            parts.append([t.to(x.device) for t in self.head.summarize(members(xs), self.standardizer)])
        outputs = [torch.cat(ts, dim=1) for ts in zip(*parts)]   # member-first, (M, B, ...)
        for t in outputs:
            check_finite_prediction(t, "member outputs", self)
        if self.calibration is not None:
            outputs = self.head.calibrated(outputs, self.calibration)
            for t in outputs:
                check_finite_prediction(t, "calibrated outputs", self)
        return self.head.prediction(*outputs, conformal_scores=self._conformal_scores)

    def calibrate(self, x, y) -> dict:
        """Fit the post-hoc calibration on validation rows (original units) by maximum
        likelihood: one scale of the predictive variance per output for a regressor (aleatoric
        and epistemic parts alike), a softmax temperature for a classifier. It is saved with the
        ensemble and applied to every prediction; a subset of the members starts without one.
        It replaces the whole calibration, conformal scores included (they were fitted on the
        predictions before it): `conformalize` after it.
        Returns it with the validation NLL (nats per row) before and after; it is never worse."""
        y = self.check_y(y, len(x)).cpu()
        previous, self.calibration = self.calibration, None  # fitted on the uncalibrated predictions
        try:
            calibration, before, after = self.head.fit_calibration(self.predict(x), y)
        except BaseException:
            self.calibration = previous  # a refused call changes nothing
            raise
        self.calibration = calibration
        return {**calibration, "val_nll_before": before, "val_nll_after": after}

    def conformalize(self, x, y) -> dict:
        """Fit split-conformal scores on held-out rows (original units) that the members never
        trained on, taken after `calibrate` if any: `predict(X).conformal_interval(coverage)` (a
        regressor: the ensemble's own stddev scaled by them) and `.prediction_set(coverage)` (a
        classifier: adaptive prediction sets) then cover rows exchangeable with these with
        probability at least `coverage` (`conformal`). Saved with the ensemble, in its
        calibration; a subset of the members starts without them. Returns {"conformal_rows": n}."""
        y = self.check_y(y, len(x)).cpu()
        previous = self.calibration
        kept = {k: v for k, v in (previous or {}).items() if k != "conformal_scores"}
        try:
            self.calibration = kept or None  # the scores of the predictions without the old ones
            self.calibration = {**kept, "conformal_scores": self.head.conformal_scores(self.predict(x), y)}
        except BaseException:
            self.calibration = previous  # a refused call changes nothing
            raise
        return {"conformal_rows": len(y)}

    def sample_predictions(self, x) -> list[MemberPrediction] | list[CategoricalPrediction]:
        """One prediction per member: a Gaussian (`.mean`, `.log_var`, (B, T), original units)
        or probabilities (`.probs`, (B, C))."""
        return self.head.member_predictions(self.predict(x))

    @torch.no_grad()
    def evaluate_members(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member's log-likelihood of each row (M, N) and its point predictions:
        means (M, N, T) for regression, probabilities (M, N, C) for classification."""
        y = self.check_y(y, len(x)).cpu()
        return self.head.member_log_lik(self.predict(x), y)

    # subsets, save and load ---------------------------------------------------------------------

    def subset(self, member_ids: Sequence[int]):
        """A new ensemble holding copies of the members with these ids."""
        index = {m: i for i, m in enumerate(self.member_ids)}
        unknown = [m for m in member_ids if m not in index]
        if unknown:
            raise ValueError(f"The 'member_ids' parameter of subset must be ids of this ensemble "
                             f"{self.member_ids}. Got unknown ids {unknown} instead.")
        configs = None if self._member_configs is None else [self._member_configs[index[m]] for m in member_ids]
        new = build_ensemble(self.task, self.config, list(member_ids), self.member_factory, configs)
        new.standardizer.load_state(self.standardizer.state())
        for j, m in enumerate(member_ids):
            new.members.load_member_state(j, self.members.member_state(index[m]))
            new.member_seeds[j] = self.member_seeds[index[m]]
        return new.to(self.device)

    def save(self, path) -> Path | str:
        """Save as an ensemble directory (see `storage`), replacing `path` (a folder or a URI)
        atomically."""
        return storage.write_ensemble(path, self)

    @classmethod
    def load(cls, path, members: Sequence[int] | None = None, *, member_factory=None, map_location="cpu"):
        """Load a saved ensemble, or the subset of it with the given member ids (`load_ensemble`)."""
        return load_ensemble(path, members, member_factory=member_factory, map_location=map_location, cls=cls)

    # input checks, for every module that takes inputs for this ensemble -----------------------

    def check_x(self, x, *, allow_members=True, move=True) -> torch.Tensor:
        """Inputs (B, *S), or (M, B, *S) with `allow_members`, as a float tensor on the ensemble's
        device (unless not `move`)."""
        owner, shape = type(self).__name__, self.input_shape
        x = as_float_tensor(owner, "X", x, ndim=(len(shape) + 1, len(shape) + 2) if allow_members else (len(shape) + 1,))
        if tuple(x.shape[-len(shape):]) != shape:
            expected = f"dim_in={self.dim_in} columns" if len(shape) == 1 else f"rows of input_shape {shape}"
            raise ValueError(f"The 'X' parameter of {owner} must have {expected}. Got shape {tuple(x.shape)} instead.")
        if x.ndim == len(shape) + 2 and x.shape[0] != self.num_members:
            raise ValueError(f"The 'X' parameter of {owner} must be (B, *{shape}) or (num_members={self.num_members}, "
                             f"B, *{shape}). Got shape {tuple(x.shape)} instead.")
        return x.to(self.device) if move else x

    def check_y(self, y, rows: int) -> torch.Tensor:
        """Targets for `rows` rows: (rows, T) floats or (rows,) labels, on the ensemble's device."""
        return self.head.check_y(y, rows).to(self.device)


def _options(arguments: dict) -> dict:
    """A subclass's __init__ arguments that Ensemble takes (its head's are its own)."""
    return {k: arguments[k] for k in (*ARCHITECTURE, "num_members", "member_ids", "member_factory")}


def check_input_shape(owner: str, dim_in) -> tuple[int, ...]:
    """`dim_in`: a number of features, or the shape of one input (a list or tuple of sizes)."""
    sizes = list(dim_in) if isinstance(dim_in, (list, tuple)) else [dim_in]
    if not sizes or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in sizes):
        fail(owner, "dim_in", "a positive integer (features) or a non-empty list of them (the shape of one input)",
             dim_in)
    return tuple(int(d) for d in sizes)


class DeepEnsemble(Ensemble):
    """An ensemble of Gaussian regression MLPs: each member predicts a mean and a variance.

    `depth` is the number of hidden layers of `hidden_dim` units (ReLU by default): the paper's
    UCI network is depth=1, hidden_dim=50. With `use_adversarial_training`, the FGSM step on input
    dimension d is `adversarial_eps` times that dimension's range in the training data (the
    paper's "1% of the range" is adversarial_eps=0.01).

    `nll_beta` weights each row's NLL gradient by its predicted variance to the power beta (held
    constant in the gradient: beta-NLL, Seitzer et al. 2022). The plain NLL (`nll_beta=0`, the
    paper's) scales a row's mean gradient by 1 / variance, so rows a member gives a large variance
    early stop being fitted, and at a large step size their variance then runs away
    (docs/benchmarks.md, "Learning rate"). Each input's optimum is the same for any beta, as are
    the reported loss (the NLL) and the predictions.
    
    Inputs: `dim_in` features, or, given a shape such as (C, H, W), inputs of that shape,
    channel-first as torch's convolutions take them: the built-in MLP flattens them, a
    `member_factory` network takes (B, *shape). Inputs are standardised per feature or channel
    (`standardize_inputs=False`: as they are).
    """

    head_class = GaussianHead

    def __init__(self, dim_in: int | Sequence[int], dim_out: int = 1, num_members: int = 5, hidden_dim: int = 50,
                 depth: int = 1, *, activation: str = "relu", batch_norm: bool = False,
                 use_adversarial_training: bool = False, adversarial_eps: float = 0.01,
                 perturbation: str = "fgsm", seed: int = 0, member_ids: Sequence[int] | None = None,
                 member_factory=None, nll_beta: float = 1.0, standardize_inputs: bool = True):
        super().__init__(GaussianHead(type(self).__name__, dim_out, nll_beta), **_options(locals()))

    @property
    def dim_out(self) -> int:
        return self.head.dim_out

    @property
    def nll_beta(self) -> float:
        return self.head.nll_beta


class DeepEnsembleClassifier(Ensemble):
    """An ensemble of softmax MLP classifiers trained with cross-entropy.

    `depth` hidden layers of `hidden_dim` units; the paper's MNIST network is depth=3,
    hidden_dim=200, batch_norm=True. Inputs and adversarial training work as for DeepEnsemble.
    """

    head_class = CategoricalHead

    def __init__(self, dim_in: int | Sequence[int], num_classes: int, num_members: int = 5, hidden_dim: int = 200,
                 depth: int = 3, *, activation: str = "relu", batch_norm: bool = False,
                 use_adversarial_training: bool = False, adversarial_eps: float = 0.01,
                 perturbation: str = "fgsm", seed: int = 0, member_ids: Sequence[int] | None = None,
                 member_factory=None, standardize_inputs: bool = True):
        super().__init__(CategoricalHead(type(self).__name__, num_classes), **_options(locals()))

    @property
    def num_classes(self) -> int:
        return self.head.num_classes


ENSEMBLE_CLASSES = {"regression": DeepEnsemble, "classification": DeepEnsembleClassifier}


def build_ensemble(task: str, config: dict, member_ids: list[int], member_factory=None,
                   member_configs: list[dict] | None = None) -> Ensemble:
    """A fresh ensemble of a saved `config` (the manifest's) holding the members `member_ids`:
    the one place that maps a task to its class. With `member_configs`, one per member, its
    members are of those configurations instead, stacked by shape (`combine`)."""
    ensemble = ENSEMBLE_CLASSES[task](**dict(config, member_factory=member_factory),
                                      num_members=len(member_ids), member_ids=list(member_ids))
    if member_configs is not None:
        for m, c in zip(member_ids, member_configs):
            # each member's own configuration is one this class takes, with the ensemble's inputs,
            # outputs and built-in members
            if not isinstance(c, dict) or not isinstance(c.get("hyperparameters", {}), dict):
                raise ValueError(f"member {m}'s configuration must be a dict with a dict of 'hyperparameters'. Got {c!r}.")
            clash = {k: c.get(k) for k in SHARED if k in config and c.get(k) != config[k]}
            if clash:
                raise ValueError(f"member {m}'s configuration must share the ensemble's {SHARED}. Got {clash} instead.")
            ENSEMBLE_CLASSES[task](**{k: v for k, v in c.items() if k != "hyperparameters"}, num_members=1)
        ensemble.member_seeds = [member_seed(c["seed"], m) for m, c in zip(member_ids, member_configs)]
        ensemble.members = MemberGroups(math.prod(ensemble.input_shape), ensemble.head.num_outputs,
                                        [tuple(c[k] for k in SHAPE) for c in member_configs], ensemble.member_seeds)
        ensemble._member_configs = [dict(c) for c in member_configs]
    return ensemble


def combine(ensembles: Sequence[Ensemble], hyperparameters: Sequence[dict] | None = None) -> Ensemble:
    """One ensemble of all the members of `ensembles`, which may differ in width, depth and any
    other option (the members of a hyper-deep ensemble): each member keeps its configuration,
    and the `hyperparameters` its ensemble trained with (one dict per ensemble: learning rate,
    epochs...), in `member_configs`. Members of one shape stack; the prediction is the uniform
    mixture of all. Members are numbered 0.. in order; an ensemble given twice contributes its
    members twice (greedy selection with replacement weights a member so).

    The ensembles must be of one task, with the same inputs, outputs and fitted standardisation
    (trained on the same rows), and built-in members."""
    ensembles = list(ensembles)
    if not ensembles or not all(isinstance(e, Ensemble) for e in ensembles):
        raise TypeError(f"The 'ensembles' parameter of combine must be a non-empty list of ensembles. Got {ensembles!r} instead.")
    hyperparameters = [{} for _ in ensembles] if hyperparameters is None else list(hyperparameters)
    if len(hyperparameters) != len(ensembles) or not all(isinstance(h, dict) for h in hyperparameters):
        raise ValueError(f"The 'hyperparameters' parameter of combine must be one dict per ensemble ({len(ensembles)}). "
                         f"Got {hyperparameters!r} instead.")
    try:  # saved in the manifest: refused here rather than at save
        json.dumps(hyperparameters, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError("The 'hyperparameters' parameter of combine must hold only JSON values (numbers, "
                         f"strings, booleans, lists, dicts) ({err}). Got {hyperparameters!r} instead.") from None
    first = ensembles[0]
    for k, e in enumerate(ensembles):
        if e.member_factory is not None:
            raise ValueError(f"combine takes ensembles of built-in members; ensemble {k} has factory-built ones.")
        for name in ("task", "feature_names"):
            if getattr(e, name) != getattr(first, name):
                raise ValueError(f"The ensembles given to combine must share their {name}: ensemble {k} has "
                                 f"{getattr(e, name)!r}, ensemble 0 {getattr(first, name)!r}.")
        outputs = {key: e.config.get(key) for key in SHARED}
        if outputs != {key: first.config.get(key) for key in SHARED}:
            raise ValueError(f"The ensembles given to combine must share their {SHARED}: ensemble {k} has {outputs}.")
        if not e.normalization_fitted or e.standardizer.state() != first.standardizer.state():
            raise ValueError(f"The ensembles given to combine must share fitted standardisation statistics (trained "
                             f"on the same rows): ensemble {k}'s differ from ensemble 0's, or are not fitted.")
    configs = [dict(e.member_config(i), hyperparameters={**e.member_config(i).get("hyperparameters", {}), **h})
               for e, h in zip(ensembles, hyperparameters) for i in range(e.num_members)]
    combined = build_ensemble(first.task, first.config, list(range(len(configs))), None, configs)
    combined.standardizer.load_state(first.standardizer.state())
    states = [(e, i) for e in ensembles for i in range(e.num_members)]
    for j, (e, i) in enumerate(states):
        combined.members.load_member_state(j, {k: v.to(combined.device) for k, v in e.members.member_state(i).items()})
        combined.member_seeds[j] = e.member_seeds[i]
    return combined.eval()


def load_ensemble(path, members: Sequence[int] | None = None, *, member_factory=None, map_location="cpu",
                  cls: type[Ensemble] | None = None) -> Ensemble:
    """The ensemble saved at `path` (of class `cls`, or whichever its manifest says), or the
    subset with the given member ids, every member file checked by `storage.read_members`.

    An ensemble of factory-built members needs the same `member_factory` again: the manifest
    only names it, and loading never imports or runs code named in a file. `path` may be a URI.
    """
    with storage.local_copy(path) as directory:
        try:
            return _load_directory(directory, members, member_factory, map_location, cls)
        except ValueError as err:  # name the URI, not the temporary download
            raise ValueError(str(err).replace(str(directory), str(path))) from None


def _load_directory(path: Path, members, member_factory, map_location, cls) -> Ensemble:
    manifest = Manifest.read(path)
    cls = cls or ENSEMBLE_CLASSES[manifest.task]
    if manifest.task != cls.head_class.task:
        raise ValueError(f"{path} holds a {manifest.task} ensemble; load it with the "
                         f"{manifest.task} class, not {cls.__name__}.")
    entries = manifest.entries
    ids = list(entries) if members is None else list(members)
    unknown = [m for m in ids if m not in entries]
    if unknown or not ids or len(set(ids)) != len(ids):
        raise ValueError(f"The 'members' parameter of {cls.__name__}.load must be a non-empty "
                         f"list of distinct ids in {sorted(entries)}. Got {members!r} instead.")
    saved_factory = manifest.config.get("member_factory")
    if saved_factory is not None and member_factory is None:
        raise ValueError(f"{path} holds members built by the factory {saved_factory}; pass that "
                         f"callable as {cls.__name__}.load(..., member_factory=...).")
    try:
        ensemble = build_ensemble(manifest.task, manifest.config, ids, member_factory, manifest.member_configs(ids))
        ensemble.standardizer.load_state(manifest.normalization)
        if len(ids) == len(entries):  # fitted to all the members: a subset starts without it
            ensemble.calibration = manifest.calibration
    except (TypeError, ValueError) as err:
        raise ValueError(f"The manifest in {path} does not describe a valid {cls.__name__}: {err}") from None
    storage.load_members(path, ensemble)
    return ensemble.to(map_location).eval()
