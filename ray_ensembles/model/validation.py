"""Checks for user input, run once at the boundary.

Every error names the parameter, the constraint and the value received, in scikit-learn's form:
"The 'num_members' parameter of DeepEnsemble must be an int >= 1. Got 0 instead."
"""

from __future__ import annotations

import numbers

import numpy as np
import torch


def fail(owner: str, name: str, constraint: str, value, error=ValueError):
    """Raise the one form of message: the parameter, its owner, the constraint, the value."""
    raise error(f"The '{name}' parameter of {owner} must be {constraint}. Got {value!r} instead.")


def check_bool(owner: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        fail(owner, name, "a bool", value, TypeError)
    return value


def check_callable(owner: str, name: str, value, constraint: str = "callable"):
    """`value` if it is None or callable; `constraint` says what it must be."""
    if value is not None and not callable(value):
        fail(owner, name, constraint, value, TypeError)
    return value


def check_type(owner: str, name: str, value, types, constraint: str):
    """`value` if it is an instance of `types`; the message names the type received, not its value."""
    if not isinstance(value, types):
        raise TypeError(f"The '{name}' parameter of {owner} must be {constraint}. Got {type(value).__name__} instead.")
    return value


def check_int(owner: str, name: str, value, *, minimum: int | None = None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(owner, name, "an int", value, TypeError)
    if minimum is not None and value < minimum:
        fail(owner, name, f"an int >= {minimum}", value)
    return int(value)


def check_float(owner: str, name: str, value, *, minimum: float | None = None,
                strict_minimum: float | None = None, below: float | None = None):
    """A finite real number; `strict_minimum` excludes the bound, `below` is an exclusive maximum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(owner, name, "a real number", value, TypeError)
    value = float(value)
    if not np.isfinite(value):
        fail(owner, name, "finite", value)
    if minimum is not None and value < minimum:
        fail(owner, name, f"a number >= {minimum}", value)
    if strict_minimum is not None and value <= strict_minimum:
        fail(owner, name, f"a number > {strict_minimum}", value)
    if below is not None and value >= below:
        low = "" if minimum is None else f"in [{minimum}, {below})"
        fail(owner, name, low or f"a number < {below}", value)
    return value


def check_choice(owner: str, name: str, value, choices):
    if value not in choices:
        fail(owner, name, f"one of {sorted(choices)}", value)
    return value


def as_tensor(owner: str, name: str, value) -> torch.Tensor:
    """A tensor from a tensor, numpy array, pandas object or (nested) list, detached from any
    autograd graph: inputs are data, never part of a model's graph."""
    if hasattr(value, "to_numpy") and not isinstance(value, (np.ndarray, torch.Tensor)):
        value = value.to_numpy()  # pandas DataFrame or Series, without importing pandas
    if isinstance(value, (list, tuple)):
        try:
            value = np.asarray(value)
        except ValueError:
            fail(owner, name, "a rectangular array", "a ragged list", TypeError)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            fail(owner, name, "an array of real numbers", f"dtype {value.dtype}", TypeError)
        # torch needs arrays it may write to (Arrow's and pandas' may be read-only): copy those
        value = torch.from_numpy(np.ascontiguousarray(value) if value.flags.writeable else value.copy())
    if not isinstance(value, torch.Tensor):
        fail(owner, name, "a torch.Tensor, numpy array, pandas object or list", type(value).__name__,
              TypeError)
    if value.device.type == "meta":
        fail(owner, name, "a tensor holding data", "a tensor on the meta device", TypeError)
    return value.detach()


def as_float_tensor(owner: str, name: str, value, *, ndim: tuple[int, ...]) -> torch.Tensor:
    """A finite real tensor: float64 stays float64 and integers become float64 (exact to 2^53),
    so that standardising loses nothing; float32 stays float32, half precision becomes it."""
    value = as_tensor(owner, name, value)
    if value.dtype == torch.bool or value.is_complex():
        fail(owner, name, "a tensor of real numbers", f"dtype {value.dtype}", TypeError)
    if value.ndim not in ndim:
        dims = " or ".join(f"{d}-D" for d in ndim)
        fail(owner, name, f"{dims}", f"shape {tuple(value.shape)}")
    if value.shape[-2 if value.ndim > 1 else 0] == 0:
        fail(owner, name, "non-empty", f"shape {tuple(value.shape)}")
    if value.dtype != torch.float64:
        value = value.double() if not value.is_floating_point() else value.float()
    # A finite sum proves every value finite in one fast pass (isfinite costs four); only a
    # non-finite sum, which huge finite values can also give, needs the exact count.
    if not torch.isfinite(value.sum()):
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            fail(owner, name, "free of NaN and inf", f"{bad} non-finite value(s)")
    return value


def as_labels(owner: str, name: str, value) -> torch.Tensor:
    """Class labels as int64, by one rule everywhere: integers, bools (a binary task) or floats
    holding whole numbers; a (N, 1) column becomes (N,)."""
    value = as_tensor(owner, name, value)
    if value.is_floating_point():
        whole = torch.isfinite(value).all() and (value == value.round()).all()
        if not whole:
            fail(owner, name, "integer class labels", f"dtype {value.dtype} with non-integer values",
                  TypeError)
    elif value.is_complex():
        fail(owner, name, "integer class labels", f"dtype {value.dtype}", TypeError)
    if value.ndim == 2 and value.shape[1] == 1:
        value = value[:, 0]
    if value.ndim != 1:
        fail(owner, name, "1-D (one label per row)", f"shape {tuple(value.shape)}")
    return value.long()


def as_label_tensor(owner: str, name: str, value, *, num_classes: int) -> torch.Tensor:
    """Class labels (`as_labels`) in [0, num_classes) as a 1-D int64 tensor."""
    value = as_labels(owner, name, value)
    if len(value) and (value.min() < 0 or value.max() >= num_classes):
        fail(owner, name, f"labels in [0, {num_classes})",
              f"labels in [{int(value.min())}, {int(value.max())}]")
    return value


def import_callable(spec: str, subject: str):
    """The callable named `module:function` (a dotted name after the colon reaches into classes),
    or a ValueError in one line that begins with `subject` ("The '--member-factory' option")."""
    import importlib

    module_name, sep, name = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module_name or not name:
        raise ValueError(f"{subject} must be module:function, an importable callable. Got {spec!r} instead.")
    try:
        value = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - whatever the module raises, the answer is one line
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"{subject} names a module that does not import ({type(err).__name__}: {first_line}). "
                         f"Got {spec!r} instead.") from None
    try:
        for part in name.split("."):
            value = getattr(value, part)
    except AttributeError:
        raise ValueError(f"{subject} names a function its module lacks. Got {spec!r} instead.") from None
    if not callable(value):
        raise ValueError(f"{subject} must name a callable. Got {spec!r}, a {type(value).__name__}, instead.")
    return value
