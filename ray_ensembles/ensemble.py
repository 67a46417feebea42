"""DeepEnsemble (Gaussian regression) and DeepEnsembleClassifier (softmax).

Shapes: B rows, D = dim_in, T = dim_out, C = num_classes, M = members held by this object.
Members see inputs standardised with statistics fitted on the training data (`fit_normalization`,
called by the Trainer); predictions come back in the target's original units.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import ClassVar, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from . import storage
from ._version import __version__
from .members import ACTIVATIONS, FactoryMembers, StackedMLP, member_seed
from .predictions import CategoricalPrediction, GaussianMixturePrediction, MemberPrediction
from .validation import as_float_tensor, as_label_tensor, check_choice, check_float, check_int

_LOG_2PI = math.log(2 * math.pi)
VARIANCE_FLOOR = 1e-6  # the paper's: variance = softplus(raw) + 1e-6
PREDICT_CHUNK_ROWS = 8192  # rows per forward pass at inference on a CPU: bounds memory, keeps matmuls large
# On a GPU a pass is mostly kernel launches, so passes are as large as this much activation memory
# allows: 8192-row chunks made 1M rows 15x slower than a per-member loop on an H200.
PREDICT_CHUNK_BYTES_GPU = 512 << 20


def check_finite_prediction(t: torch.Tensor, what: str, ensemble=None):
    """Predictions are never silently NaN or inf: raise, saying where and why."""
    if not torch.isfinite(t).all():
        rows = int((~torch.isfinite(t)).flatten(0, -2).any(-1).sum()) if t.ndim > 1 else 1
        scale = "" if ensemble is None or ensemble.task != "regression" else (
            f"; the target's scale (std {ensemble.y_std.tolist()}) may overflow {ensemble.target_dtype}: "
            "train on a float64 target, or rescale it")
        raise FloatingPointError(f"The ensemble's {what} are not finite ({rows} of {t.shape[-2] if t.ndim > 1 else 1} "
                                 f"rows){scale}.")


def _mean_and_variance(out):
    """A Gaussian head's raw outputs (M, B, 2T) as means and variances, (M, B, T) each."""
    mean, raw = out.float().chunk(2, dim=-1)
    # softplus is ten times slower on the strided half than on a contiguous copy of it
    return mean, F.softplus(raw.contiguous()) + VARIANCE_FLOOR


class _Ensemble(nn.Module):
    task: ClassVar[str]

    def __init__(self, *, dim_in, num_outputs, num_members, hidden_dim, depth, activation,
                 batch_norm, use_adversarial_training, adversarial_eps, perturbation, seed,
                 member_ids, member_factory, config):
        super().__init__()
        owner = type(self).__name__
        # numbers are stored as Python's own: a numpy int would pass here and then fail to save
        dim_in = check_int(owner, "dim_in", dim_in, minimum=1)
        num_members = check_int(owner, "num_members", num_members, minimum=1)
        hidden_dim = check_int(owner, "hidden_dim", hidden_dim, minimum=1)
        depth = check_int(owner, "depth", depth, minimum=1)
        config = {k: int(v) for k, v in config.items()}
        check_choice(owner, "activation", activation, ACTIVATIONS)
        if not isinstance(batch_norm, bool):
            raise TypeError(f"The 'batch_norm' parameter of {owner} must be a bool. Got {batch_norm!r} instead.")
        if not isinstance(use_adversarial_training, bool):
            raise TypeError(f"The 'use_adversarial_training' parameter of {owner} must be a bool. "
                            f"Got {use_adversarial_training!r} instead.")
        adversarial_eps = check_float(owner, "adversarial_eps", adversarial_eps, minimum=0.0)
        check_choice(owner, "perturbation", perturbation, {"fgsm", "random"})
        seed = check_int(owner, "seed", seed, minimum=0)
        if member_ids is None:
            member_ids = list(range(num_members))
        member_ids = [check_int(owner, "member_ids", m, minimum=0) for m in member_ids]
        if len(member_ids) != num_members or len(set(member_ids)) != num_members:
            raise ValueError(f"The 'member_ids' parameter of {owner} must be {num_members} distinct "
                             f"ids (num_members). Got {member_ids!r} instead.")

        if member_factory is not None and not callable(member_factory):
            raise TypeError(f"The 'member_factory' parameter of {owner} must be a callable returning an "
                            f"nn.Module. Got {member_factory!r} instead.")
        # the factory's name is recorded for people; loading needs the callable itself again
        factory_name = None if member_factory is None else \
            f"{getattr(member_factory, '__module__', '?')}:{getattr(member_factory, '__qualname__', repr(member_factory))}"
        self.config = dict(config, hidden_dim=hidden_dim, depth=depth, activation=activation,
                           batch_norm=batch_norm, use_adversarial_training=use_adversarial_training,
                           adversarial_eps=float(adversarial_eps), perturbation=perturbation, seed=seed,
                           member_factory=factory_name)
        self.member_factory = member_factory
        self.dim_in = dim_in
        self.use_adversarial_training = use_adversarial_training
        self.adversarial_eps = float(adversarial_eps)
        self.perturbation = perturbation
        self.seed = seed
        self.member_ids = member_ids
        self.member_seeds = [member_seed(seed, m) for m in member_ids]
        self.feature_names: list[str] | None = None
        self.target_dtype = torch.float32  # of the fitted target: regression predictions come in it
        if member_factory is None:
            self.members = StackedMLP(num_members, dim_in, num_outputs, hidden_dim, depth,
                                      activation, batch_norm)
            for i, s in enumerate(self.member_seeds):
                self.members.reset_member(i, s)
        else:
            self.members = FactoryMembers(member_factory, self.member_seeds)
            self._check_factory_output(num_outputs)
        # Identity until fit_normalization; x_range sets the FGSM step (eps * range per input).
        # float64, and inputs are standardised in float64: a feature such as a Unix timestamp
        # keeps its variation, which float32 (7 digits) would round away before the subtraction.
        self.register_buffer("x_mean", torch.zeros(dim_in, dtype=torch.float64))
        self.register_buffer("x_std", torch.ones(dim_in, dtype=torch.float64))
        self.register_buffer("x_range", torch.ones(dim_in, dtype=torch.float64))
        self.normalization_fitted = False

    @torch.no_grad()
    def _check_factory_output(self, num_outputs):
        net = self.members.nets[0]
        was_training = net.training
        net.eval()
        out = self.members(torch.zeros(1, 2, self.dim_in))[0]
        net.train(was_training)
        if out.shape != (2, num_outputs):
            raise ValueError(f"The 'member_factory' of {type(self).__name__} must build modules mapping "
                             f"(B, {self.dim_in}) to (B, {num_outputs}). Got output shape "
                             f"{tuple(out.shape)} for B=2 instead.")

    def _init_kwargs(self) -> dict:
        """Keyword arguments that rebuild this ensemble's architecture (with the factory itself)."""
        return dict(self.config, member_factory=self.member_factory)

    @property
    def num_members(self) -> int:
        return len(self.member_ids)

    @property
    def device(self) -> torch.device:
        return self.x_mean.device

    def extra_repr(self):
        return f"task={self.task}, member_ids={self.member_ids}, config={self.config}"

    # normalisation ------------------------------------------------------------------------------

    def fit_normalization(self, x, y=None):
        """Fit input (and, for regression, target) standardisation on the training data.

        A constant column gets std 1, so it standardises to 0 instead of NaN.
        """
        x = self._check_x(x, allow_members=False).double()
        std = x.std(0, correction=0)
        self.x_mean.copy_(x.mean(0))
        self.x_std.copy_(torch.where(std > 0, std, torch.ones_like(std)))
        self.x_range.copy_(x.amax(0) - x.amin(0))
        self.normalization_fitted = True

    def standardize_x(self, x):
        """Original-unit inputs to the members' float32 standardised ones, computed in float64."""
        return ((x.double() - self.x_mean) / self.x_std).float()

    @property
    def adversarial_step(self) -> torch.Tensor:
        """FGSM step per input dimension, in standardised units: eps * range / std, (D,)."""
        return (self.adversarial_eps * self.x_range / self.x_std).float()

    # training -----------------------------------------------------------------------------------

    def forward(self, x, y=None):
        """`ensemble(X, y)`: the summed training loss of all members. `ensemble(X)`: a prediction.

        X is (B, D), given to every member, or (M, B, D), one batch per member.
        """
        if y is None:
            return self.predict(x)
        x = self._check_x(x)
        y = self._check_y(y, x.shape[-2])
        return self.member_losses(self.standardize_x(x), self.standardize_y(y)).sum()

    def member_losses(self, xs, ys, step: int | None = None):
        """Per-member training loss (M,) on standardised inputs xs, (B, D) or (M, B, D).

        With adversarial training, member m minimises loss(x) + loss(x') with
        x' = x + eps * sign(grad_x loss_m(x)). The input gradient comes from autograd.grad, so no
        parameter's .grad is touched; summing member losses keeps each member's gradient its own.
        `perturbation="random"` is the paper's control: a random sign instead of the gradient's,
        drawn from (member seed, step).
        """
        xs = xs.expand(self.num_members, *xs.shape[-2:])
        if not (self.use_adversarial_training and self.adversarial_eps > 0):
            return self._member_nll(self.members(xs), ys)
        if self.perturbation == "random":
            x_adv = xs + self.adversarial_step * self._random_signs(xs.shape, step)
            return self._member_nll(self.members(xs), ys) + self._member_nll(self.members(x_adv), ys)
        xs = xs.detach().clone().requires_grad_(True)
        clean = self._member_nll(self.members(xs), ys)
        (grad_x,) = torch.autograd.grad(clean.sum(), xs, retain_graph=True)
        x_adv = (xs + self.adversarial_step * grad_x.sign()).detach()
        return clean + self._member_nll(self.members(x_adv), ys)

    def _random_signs(self, shape, step):
        """(M, B, D) random +/-1, member m's from (its seed, step) when the step is known."""
        if step is None:
            return torch.randint(0, 2, shape, device=self.device) * 2.0 - 1.0
        signs = [torch.randint(0, 2, shape[1:], generator=torch.Generator().manual_seed(
                 member_seed(s, step, attempt=1))) for s in self.member_seeds]  # once per member per step
        return torch.stack(signs).to(self.device) * 2.0 - 1.0

    # inference ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _predict_chunks(self, x, batch_size, summarize) -> list[torch.Tensor]:
        """Run all members on original-unit inputs x (B, D) in eval mode, `batch_size` rows at a
        time on the ensemble's device; `summarize` maps raw outputs (M, b, outputs) to member-first
        tensors, which come back concatenated over rows on x's device."""
        x = self._check_x(x, allow_members=False, move=False)
        if batch_size is not None:
            batch_size = check_int("predict", "batch_size", batch_size, minimum=1)
        elif self.device.type != "cpu":
            widest = max(self.dim_in, self.config["hidden_dim"])
            batch_size = max(PREDICT_CHUNK_ROWS, PREDICT_CHUNK_BYTES_GPU // (4 * self.num_members * widest))
        else:
            batch_size = PREDICT_CHUNK_ROWS
        # Prediction runs in eval mode and changes nothing shared, so threads may predict at once.
        # A loaded or trained ensemble is in eval mode already; one in training mode predicts
        # with an eval-mode copy of its members: flipping the shared flag would let another
        # thread's pass run in training mode and move batch norm's running statistics.
        members = copy.deepcopy(self.members).eval() if self.training else self.members
        parts = []
        for chunk in x.split(batch_size):
            xs = self.standardize_x(chunk.to(self.device)).expand(self.num_members, -1, -1)
            parts.append([t.to(x.device) for t in summarize(members(xs))])
        outputs = [torch.cat(ts, dim=1) for ts in zip(*parts)]
        for t in outputs:
            check_finite_prediction(t, "member outputs", self)
        return outputs

    @torch.no_grad()
    def evaluate_members(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member's log-likelihood of each row (M, N) and its point predictions:
        means (M, N, T) for regression, probabilities (M, N, C) for classification."""
        y = self._check_y(y, len(x)).cpu()
        return self._member_log_lik(self.predict(x), y)

    # subsets, save and load ---------------------------------------------------------------------

    def subset(self, member_ids: Sequence[int]):
        """A new ensemble holding copies of the members with these ids."""
        index = {m: i for i, m in enumerate(self.member_ids)}
        unknown = [m for m in member_ids if m not in index]
        if unknown:
            raise ValueError(f"The 'member_ids' parameter of subset must be ids of this ensemble "
                             f"{self.member_ids}. Got unknown ids {unknown} instead.")
        new = type(self)(**self._init_kwargs(), num_members=len(member_ids), member_ids=list(member_ids))
        new.load_state_of(self)
        for j, m in enumerate(member_ids):
            new.members.load_member_state(j, self.members.member_state(index[m]))
            new.member_seeds[j] = self.member_seeds[index[m]]
        return new.to(self.device)

    def load_state_of(self, other: "_Ensemble"):
        """Copy normalisation statistics and feature names (not members) from another ensemble."""
        for name in ("x_mean", "x_std", "x_range", *self._target_buffers):
            getattr(self, name).copy_(getattr(other, name))
        self.normalization_fitted = other.normalization_fitted
        self.feature_names = other.feature_names
        self.target_dtype = other.target_dtype

    _target_buffers: ClassVar[tuple[str, ...]] = ()

    def normalization_state(self) -> dict:
        state = {name: getattr(self, name).tolist()
                 for name in ("x_mean", "x_std", "x_range", *self._target_buffers)}
        return dict(state, fitted=self.normalization_fitted, feature_names=self.feature_names,
                    target_dtype=str(self.target_dtype).removeprefix("torch."))

    def load_normalization_state(self, state: dict):
        try:
            for name in ("x_mean", "x_std", "x_range", *self._target_buffers):
                value = torch.tensor(state[name], dtype=torch.float64)
                if value.shape != getattr(self, name).shape:
                    raise ValueError(f"'{name}' has shape {tuple(value.shape)}, expected "
                                     f"{tuple(getattr(self, name).shape)}")
                getattr(self, name).copy_(value)
        except (KeyError, TypeError) as err:
            raise ValueError(f"normalisation statistics are incomplete ({err!r})") from None
        self.normalization_fitted = bool(state.get("fitted", True))
        self.feature_names = state.get("feature_names")
        self.target_dtype = getattr(torch, state.get("target_dtype", "float32"))

    def manifest(self, member_entries: list[dict], training: dict | None = None) -> dict:
        manifest = {"format": storage.FORMAT, "format_version": storage.FORMAT_VERSION,
                    "library_version": __version__, "task": self.task, "config": self.config,
                    "normalization": self.normalization_state(), "members": member_entries}
        if training is not None:
            manifest["training"] = training
        return manifest

    def member_metadata(self, index: int) -> dict:
        return {"member_id": self.member_ids[index], "seed": self.member_seeds[index],
                "task": self.task, "config": self.config}

    def member_files(self) -> dict[int, tuple[dict[str, torch.Tensor], dict]]:
        """Per member id: the tensors of its file and its metadata."""
        return {m: ({f"model.{k}": v for k, v in self.members.member_state(i).items()},
                    self.member_metadata(i)) for i, m in enumerate(self.member_ids)}

    def save(self, path) -> Path:
        """Save as an ensemble directory (see `storage`), replacing `path` atomically."""
        return write_ensemble_directory(path, self, self.member_files())

    @classmethod
    def load(cls, path, members: Sequence[int] | None = None, *, member_factory=None, map_location="cpu"):
        """Load a saved ensemble, or the subset of it with the given member ids.

        An ensemble of factory-built members needs the same `member_factory` again: the
        manifest only names it, and loading never imports or runs code named in a file.
        """
        path = Path(path)
        manifest = storage.read_manifest(path)
        if manifest["task"] != cls.task:
            raise ValueError(f"{path} holds a {manifest['task']} ensemble; load it with the "
                             f"{manifest['task']} class, not {cls.__name__}.")
        entries = {e["id"]: e for e in manifest["members"]}
        ids = list(entries) if members is None else list(members)
        unknown = [m for m in ids if m not in entries]
        if unknown or not ids:
            raise ValueError(f"The 'members' parameter of {cls.__name__}.load must be a non-empty "
                             f"list of ids in {sorted(entries)}. Got {members!r} instead.")
        saved_factory = manifest["config"].get("member_factory")
        if saved_factory is not None and member_factory is None:
            raise ValueError(f"{path} holds members built by the factory {saved_factory}; pass that "
                             f"callable as {cls.__name__}.load(..., member_factory=...).")
        try:
            ensemble = cls(**dict(manifest["config"], member_factory=member_factory),
                           num_members=len(ids), member_ids=ids)
            ensemble.load_normalization_state(manifest["normalization"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"The manifest in {path} does not describe a valid {cls.__name__}: "
                             f"{err}") from None
        for i, m in enumerate(ids):
            tensors, _ = storage.read_member_file(path / entries[m]["file"], entries[m]["sha256"])
            state = storage.strip_prefix(tensors, "model.")
            try:
                ensemble.members.load_member_state(i, state)
            except ValueError as err:
                raise ValueError(f"Member file {path / entries[m]['file']}: {err}") from None
            ensemble.member_seeds[i] = entries[m]["seed"]
        return ensemble.to(map_location).eval()

    # input checks -------------------------------------------------------------------------------

    def _check_x(self, x, *, allow_members=True, move=True):
        owner = type(self).__name__
        x = as_float_tensor(owner, "X", x, ndim=(2, 3) if allow_members else (2,))
        if x.shape[-1] != self.dim_in:
            raise ValueError(f"The 'X' parameter of {owner} must have dim_in={self.dim_in} columns. "
                             f"Got shape {tuple(x.shape)} instead.")
        if x.ndim == 3 and x.shape[0] != self.num_members:
            raise ValueError(f"The 'X' parameter of {owner} must be (B, D) or (num_members={self.num_members}, "
                             f"B, D). Got shape {tuple(x.shape)} instead.")
        return x.to(self.device) if move else x


class DeepEnsemble(_Ensemble):
    """An ensemble of Gaussian regression MLPs: each member predicts a mean and a variance.

    `depth` is the number of hidden layers of `hidden_dim` units (ReLU by default): the paper's
    UCI network is depth=1, hidden_dim=50. With `use_adversarial_training`, the FGSM step on input
    dimension d is `adversarial_eps` times that dimension's range in the training data (the
    paper's "1% of the range" is adversarial_eps=0.01).

    `nll_beta` weights each row's NLL gradient by its predicted variance to the power beta (held
    constant in the gradient: beta-NLL, Seitzer et al. 2022). The plain NLL (`nll_beta=0`, the
    paper's) scales a row's mean gradient by 1 / variance, so rows a member gives a large variance
    early stop being fitted, and at a large step size their variance then runs away (README,
    "Learning rate"). Each input's optimum is the same for any beta, as are the reported loss
    (the NLL) and the predictions.
    """

    task = "regression"
    _target_buffers = ("y_mean", "y_std")

    def __init__(self, dim_in: int, dim_out: int = 1, num_members: int = 5, hidden_dim: int = 50,
                 depth: int = 1, *, activation: str = "relu", batch_norm: bool = False,
                 use_adversarial_training: bool = False, adversarial_eps: float = 0.01,
                 perturbation: str = "fgsm", seed: int = 0, member_ids: Sequence[int] | None = None,
                 member_factory=None, nll_beta: float = 1.0):
        dim_out = check_int(type(self).__name__, "dim_out", dim_out, minimum=1)
        nll_beta = check_float(type(self).__name__, "nll_beta", nll_beta, minimum=0.0)
        if nll_beta > 1:
            raise ValueError(f"The 'nll_beta' parameter of {type(self).__name__} must be in [0, 1]. "
                             f"Got {nll_beta} instead.")
        super().__init__(dim_in=dim_in, num_outputs=2 * dim_out, num_members=num_members,
                         hidden_dim=hidden_dim, depth=depth, activation=activation,
                         batch_norm=batch_norm, use_adversarial_training=use_adversarial_training,
                         adversarial_eps=adversarial_eps, perturbation=perturbation, seed=seed,
                         member_ids=member_ids, member_factory=member_factory, config={"dim_in": dim_in, "dim_out": dim_out})
        self.dim_out = dim_out
        self.nll_beta = self.config["nll_beta"] = nll_beta
        self.register_buffer("y_mean", torch.zeros(dim_out, dtype=torch.float64))
        self.register_buffer("y_std", torch.ones(dim_out, dtype=torch.float64))

    def fit_normalization(self, x, y=None):
        super().fit_normalization(x)
        if y is not None:
            y = self._check_y(y, len(x))
            self.target_dtype = y.dtype  # predictions come back in it: a float64 target stays exact
            y = y.double()
            std = y.std(0, correction=0)
            self.y_mean.copy_(y.mean(0))
            self.y_std.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def standardize_y(self, y):
        return ((y.double() - self.y_mean) / self.y_std).float()

    def _member_nll(self, out, ys):
        """Gaussian NLL per member, (M,): mean over rows of the sum over target dimensions."""
        mean, var = _mean_and_variance(out)                      # (M, B, T) each
        nll = 0.5 * (_LOG_2PI + var.log() + (ys - mean).square() / var)
        if self.nll_beta:  # the gradient of the weighted NLL, the value of the NLL itself
            weighted = nll * var.detach() ** self.nll_beta
            nll = weighted + (nll - weighted).detach()
        return nll.sum(-1).mean(-1)

    def _gaussians(self, out):
        """Member means and variances (M, B, T) in original units from raw outputs."""
        mean, var = _mean_and_variance(out)
        y_mean, y_std = self.y_mean.to(self.target_dtype), self.y_std.to(self.target_dtype)
        return mean.to(self.target_dtype) * y_std + y_mean, var.to(self.target_dtype) * y_std.square()

    def predict(self, x, batch_size: int | None = None) -> GaussianMixturePrediction:
        """The mixture of member Gaussians at x (B, D), in original units."""
        return GaussianMixturePrediction(*self._predict_chunks(x, batch_size, self._gaussians))

    def _member_log_lik(self, pred, y):
        normal = torch.distributions.Normal(pred.member_mean, pred.member_variance.sqrt())
        return normal.log_prob(y).sum(-1), pred.member_mean

    def sample_predictions(self, x) -> list[MemberPrediction]:
        """One Gaussian per member: `.mean` and `.log_var`, (B, T) each, original units."""
        return self.predict(x).members()

    def _check_y(self, y, rows):
        owner = type(self).__name__
        y = as_float_tensor(owner, "y", y, ndim=(1, 2, 3))
        if y.ndim == 1:
            y = y.unsqueeze(-1)
        if y.shape[-2] != rows or y.shape[-1] != self.dim_out:
            raise ValueError(f"The 'y' parameter of {owner} must be ({rows}, {self.dim_out}) to match "
                             f"X and dim_out. Got shape {tuple(y.shape)} instead.")
        return y.to(self.device)


class DeepEnsembleClassifier(_Ensemble):
    """An ensemble of softmax MLP classifiers trained with cross-entropy.

    `depth` hidden layers of `hidden_dim` units; the paper's MNIST network is depth=3,
    hidden_dim=200, batch_norm=True. Adversarial training works as for DeepEnsemble.
    """

    task = "classification"

    def __init__(self, dim_in: int, num_classes: int, num_members: int = 5, hidden_dim: int = 200,
                 depth: int = 3, *, activation: str = "relu", batch_norm: bool = False,
                 use_adversarial_training: bool = False, adversarial_eps: float = 0.01,
                 perturbation: str = "fgsm", seed: int = 0, member_ids: Sequence[int] | None = None,
                 member_factory=None):
        num_classes = check_int(type(self).__name__, "num_classes", num_classes, minimum=2)
        super().__init__(dim_in=dim_in, num_outputs=num_classes, num_members=num_members,
                         hidden_dim=hidden_dim, depth=depth, activation=activation,
                         batch_norm=batch_norm, use_adversarial_training=use_adversarial_training,
                         adversarial_eps=adversarial_eps, perturbation=perturbation, seed=seed,
                         member_ids=member_ids, member_factory=member_factory, config={"dim_in": dim_in, "num_classes": num_classes})
        self.num_classes = num_classes

    def standardize_y(self, y):
        return y

    def _member_nll(self, out, ys):
        """Cross-entropy per member, (M,)."""
        logits = out.float()                                     # (M, B, C)
        ys = ys.expand(logits.shape[:2])
        return F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="none").view(ys.shape).mean(-1)

    def predict(self, x, batch_size: int | None = None) -> CategoricalPrediction:
        return CategoricalPrediction(
            *self._predict_chunks(x, batch_size, lambda out: (out.float().softmax(-1),)))

    def _member_log_lik(self, pred, y):
        probs = pred.member_probs
        return probs.gather(-1, y.expand(probs.shape[:2]).unsqueeze(-1)).squeeze(-1).clamp_min(1e-12).log(), probs

    def sample_predictions(self, x) -> list[CategoricalPrediction]:
        """One prediction per member (`.probs`, (B, C))."""
        return [CategoricalPrediction(p.unsqueeze(0)) for p in self.predict(x).member_probs]

    def _check_y(self, y, rows):
        y = as_label_tensor(type(self).__name__, "y", y, num_classes=self.num_classes)
        if y.shape[-1] != rows:
            raise ValueError(f"The 'y' parameter of {type(self).__name__} must have {rows} labels to "
                             f"match X. Got shape {tuple(y.shape)} instead.")
        return y.to(self.device)


def write_ensemble_directory(path, ensemble: _Ensemble, member_files: dict, training: dict | None = None
                             ) -> Path:
    """Write member files, then the manifest, into a directory that atomically replaces `path`."""
    path = Path(path)
    with storage.atomic_directory(path) as tmp:
        entries = []
        for i, m in enumerate(ensemble.member_ids):
            tensors, metadata = member_files[m]
            sha = storage.write_member_file(tmp, m, tensors, metadata)
            entries.append({"id": m, "seed": ensemble.member_seeds[i],
                            "file": storage.member_filename(m), "sha256": sha})
        storage.write_manifest(tmp, ensemble.manifest(entries, training))
    return path
