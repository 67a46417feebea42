"""Online predictions with uncertainty: a saved ensemble, or a folder of them, behind Ray Serve.

    from ray import serve
    from ray_ensembles.serving import ensemble_app
    handle = serve.run(ensemble_app("outputs/train_ensemble/ensemble"))
    handle.predict.remote({"rows": [[1.5], [-2.0]]}).result()

HTTP routes, under the app's route prefix:
    GET  /                         the ensemble's metadata and the replica's counts (a folder: its ensembles' ids,
                                   and those found damaged, with why)
    GET  /healthz                  {"status": "ok"}
    POST /predict                  {"rows": [...], "coverage": 0.9}  ->  {"predictions": [...]}
    GET  /ensembles/<id>           a folder's ensemble <id>: its metadata
    POST /ensembles/<id>/predict   a folder's ensemble <id>; or POST /predict with the
                                   `serve_multiplexed_model_id` header naming it

Rows are JSON objects keyed by the feature names saved with the ensemble (any order, extra keys
ignored) or arrays in the saved feature order; for an ensemble of inputs of another shape (images
(C, H, W), say), nested arrays of that shape. Each prediction holds what jobs/predict.py writes
for a row: `mean`, `variance`, `aleatoric`, `epistemic`, `lower_<c>`, `upper_<c>` in the
target's original units (`<name>_<d>` per output dimension when there are several), or
`probs`, `entropy`, `mutual_information` and `predicted` for a classifier.

Concurrent requests on a replica are batched (`@serve.batch`) into one stacked forward pass per
ensemble. A folder of ensembles (a sweep's trials, say) is served with Serve's model
multiplexing: each replica loads an ensemble when first asked for it and evicts the least
recently used beyond `max_ensembles_per_replica`. A request the app refuses gets a 4xx response
whose JSON body names the field and the value: {"error", "field", "value"}; a folder's ensemble
that fails to load (a damaged or missing file) answers 503 naming it and the damage, without
loading again, while the others keep answering.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from .io.locations import check_store, filesystem_for, is_uri, join, run_ensemble_path
from .io.storage import MANIFEST
from .model.ensemble import load_ensemble
from .model.inference import summary_columns
from .model.validation import check_callable, check_float, check_int, import_callable

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
# one folder name, never a path: no separator, no control character, not hidden (nor "." or "..")
ENSEMBLE_ID = re.compile(r"[^./\\\x00-\x1f][^/\\\x00-\x1f]{0,199}")
MULTIPLEXED_HEADER = "serve_multiplexed_model_id"


class RequestError(Exception):
    """A request the app refuses: the HTTP status and what the JSON body says."""

    def __init__(self, status: int, field: str | None, value, message: str):
        super().__init__(status, field, value, message)  # all in args: it pickles across handles
        self.status, self.field, self.value, self.message = status, field, shown(value), message

    def body(self) -> dict:
        return {"error": self.message, "field": self.field, "value": self.value}


def shown(value):
    """A received value as the error body shows it: JSON-safe (NaN and inf as text) and short."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = value if isinstance(value, str) else json.dumps(value, default=str, allow_nan=True)
    return text if len(text) <= 200 else text[:200] + "..."


def parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, "body", raw[:200].decode(errors="replace"),
                           f"The request body is not valid JSON ({err}).") from None
    except RecursionError:  # the parser recurses once per bracket
        raise RequestError(400, "body", raw[:200].decode(errors="replace"),
                           "The request body nests too deeply to parse.") from None


def number(field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, field, value, f"'{field}' must be a number.")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float64
        value = math.inf
    if not math.isfinite(value):
        raise RequestError(400, field, value, f"'{field}' must be a finite number.")
    return value


def parse_request(body, ensemble) -> tuple[np.ndarray, float]:
    """The rows of a request body as a float64 array (rows, dim_in) in the ensemble's feature
    order, and its coverage; a RequestError naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, "body", body, "The request body must be a JSON object with 'rows'.")
    rows, names, width = body.get("rows"), ensemble.feature_names, ensemble.dim_in
    shaped = len(ensemble.input_shape) > 1
    if not isinstance(rows, list) or not rows:
        raise RequestError(400, "rows", rows, "'rows' must be a non-empty list of rows: " + (
            f"nested arrays of shape {list(ensemble.input_shape)}." if shaped else
            f"objects keyed by feature name, or arrays of {width} numbers."))
    coverage = number("coverage", body.get("coverage", 0.9))
    if not 0 < coverage < 1:
        raise RequestError(400, "coverage", coverage, "'coverage' must be in (0, 1).")
    if shaped:
        return np.stack([shaped_row(i, row, ensemble.input_shape) for i, row in enumerate(rows)]), coverage
    X = np.empty((len(rows), width))
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            if names is None:
                raise RequestError(400, f"rows[{i}]", row, "This ensemble was saved without feature "
                                   f"names: send each row as an array of {width} numbers in training order.")
            missing = next((name for name in names if name not in row), None)
            if missing is not None:
                raise RequestError(400, f"rows[{i}].{missing}", None,
                                   f"Row {i} lacks the feature '{missing}' (the ensemble takes {names}).")
            X[i] = [number(f"rows[{i}].{name}", row[name]) for name in names]
        elif isinstance(row, list):
            if len(row) != width:
                raise RequestError(400, f"rows[{i}]", row, f"Row {i} has {len(row)} values; the "
                                   f"ensemble takes {width}" + (f" ({names})." if names else "."))
            X[i] = [number(f"rows[{i}][{j}]", v) for j, v in enumerate(row)]
        else:
            raise RequestError(400, f"rows[{i}]", row, f"Row {i} must be an object keyed by feature "
                               "name or an array of numbers.")
    return X, coverage


def shaped_row(i: int, row, shape: tuple[int, ...]) -> np.ndarray:
    """Row i of a request to an ensemble of inputs of `shape`: nested arrays of finite numbers."""
    try:
        values = np.array(row, dtype=object if isinstance(row, list) else None)
        values = values.astype(np.float64) if values.dtype == object and values.ndim == len(shape) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.flat) else None
    except (ValueError, OverflowError):  # ragged nesting; an integer beyond float64
        values = None
    if values is None or values.shape != shape:
        raise RequestError(400, f"rows[{i}]", row, f"Row {i} must be nested arrays of numbers of shape "
                           f"{list(shape)}, the ensemble's input shape.")
    if not np.isfinite(values).all():
        raise RequestError(400, f"rows[{i}]", row, f"Row {i} must hold finite numbers.")
    return values


def response_rows(pred, coverage: float) -> list[dict]:
    """One JSON object per row: the columns jobs/predict.py writes (a classifier's `prob_<k>`
    columns as one `probs` list, its `in_set_<k>` ones as the `prediction_set`'s classes; an
    unbounded conformal bound as null)."""
    columns = {name: values.tolist() for name, values in summary_columns(pred, coverage).items()}
    for name in columns:  # unbounded (too few conformal rows for the coverage): JSON has no inf
        if name.startswith("conformal_"):
            columns[name] = [None if math.isinf(v) else v for v in columns[name]]
    probs = [columns.pop(name) for name in list(columns) if name.startswith("prob_")]
    in_set = [columns.pop(name) for name in list(columns) if name.startswith("in_set_")]
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    if probs:
        rows = [{"probs": list(p), **row} for p, row in zip(zip(*probs), rows)]
    if in_set:
        rows = [{**row, "prediction_set": [k for k, held in enumerate(s) if held]} for s, row in zip(zip(*in_set), rows)]
    return rows


def predict_parts(ensemble, parts: list[np.ndarray]) -> list:
    """One forward pass over the concatenated parts, split back into one prediction per part. A
    pass that fails is retried part by part, so one request's failure is its own (an exception
    in its place) and not its batch's."""
    try:
        pred = ensemble.predict(torch.from_numpy(np.concatenate(parts)))
    except (ValueError, FloatingPointError) as err:
        if len(parts) == 1:
            return [err]
        return [result for part in parts for result in predict_parts(ensemble, [part])]
    bounds = np.cumsum([0] + [len(part) for part in parts]).tolist()
    return [pred.rows(slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def describe(ensemble) -> dict:
    return {"task": ensemble.task, "num_members": ensemble.num_members, "member_ids": ensemble.member_ids,
            "dim_in": ensemble.dim_in, "feature_names": ensemble.feature_names, **described_calibration(ensemble),
            "config": json.loads(json.dumps(ensemble.config, default=str)),
            **({"member_configs": ensemble.member_configs} if ensemble.is_combined else {})}


def described_calibration(ensemble) -> dict:
    """The calibration as the app describes it: the conformal scores counted, not listed."""
    calibration = dict(ensemble.calibration or {})
    scores = calibration.pop("conformal_scores", None)
    rows = None if scores is None else len(scores[0] if ensemble.task == "regression" else scores)
    return {"calibration": calibration or None, "conformal_rows": rows}


def has_ensemble(location: str) -> bool:
    import pyarrow.fs

    filesystem, path = filesystem_for(join(location, MANIFEST), "ensemble")
    return filesystem.get_file_info(path).type == pyarrow.fs.FileType.File


def ensemble_location(root: str, ensemble_id: str) -> str | None:
    """Where the folder `root`'s ensemble `ensemble_id` is: `<root>/<id>`, or `<root>/<id>/ensemble`
    (a sweep's trial folder); None if neither holds one."""
    if not isinstance(ensemble_id, str) or not ENSEMBLE_ID.fullmatch(ensemble_id):
        return None
    return next((c for c in (join(root, ensemble_id), run_ensemble_path(root, ensemble_id)) if has_ensemble(c)), None)


def ensemble_ids(root: str) -> list[str]:
    """The ids of the ensembles in the folder `root`, sorted."""
    import pyarrow.fs

    filesystem, path = filesystem_for(root, "ensemble")
    entries = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted(e.base_name for e in entries if e.type == pyarrow.fs.FileType.Directory
                  and ensemble_location(root, e.base_name) is not None)


@serve.deployment
class EnsembleServer:
    """One replica: the ensemble (or a folder of them, multiplexed) and its HTTP routes."""

    def __init__(self, location: str, multiplexed: bool, *, max_batch_size: int, batch_wait_s: float,
                 max_body_bytes: int, max_ensembles_per_replica: int, use_gpu: bool, member_factory=None):
        self.location, self.multiplexed, self.max_body_bytes = location, multiplexed, max_body_bytes
        load = functools.partial(load_ensemble, member_factory=member_factory)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.counts = {"requests": 0, "forward_passes": 0, "largest_batch": 0}
        self.loads: dict[str, int] = {}
        self.damaged: dict[str, str] = {}  # a folder's ensembles that failed to load: never retried
        self._forward.set_max_batch_size(max_batch_size)
        self._forward.set_batch_wait_timeout_s(batch_wait_s)
        if multiplexed:
            async def load_by_id(ensemble_id: str):
                self.loads[ensemble_id] = self.loads.get(ensemble_id, 0) + 1
                return await asyncio.to_thread(load, ensemble_location(location, ensemble_id),
                                               map_location=self.device)

            # built here, not as a decorated method, so that the cache size is an option
            self._load = serve.multiplexed(max_num_models_per_replica=max_ensembles_per_replica)(load_by_id)
        else:
            self.ensemble = load(location, map_location=self.device)

    async def _ensemble(self, ensemble_id: str | None):
        if not self.multiplexed:
            return self.ensemble
        if not ensemble_id:
            raise RequestError(400, MULTIPLEXED_HEADER, None, "Name the ensemble: the "
                               f"'{MULTIPLEXED_HEADER}' header, or POST /ensembles/<id>/predict. GET / lists them.")
        # checked before the multiplexed loader, which would evict a loaded ensemble first
        if await asyncio.to_thread(ensemble_location, self.location, ensemble_id) is None:
            raise RequestError(404, "ensemble", ensemble_id, f"There is no ensemble '{ensemble_id}' "
                               f"in {self.location}. GET / lists them.")
        if ensemble_id not in self.damaged:
            try:
                return await self._load(ensemble_id)
            except ValueError as err:  # the one reader's refusal: a missing or damaged file
                self.damaged[ensemble_id] = f"The ensemble '{ensemble_id}' cannot be served: {err}"
        raise RequestError(503, "ensemble", ensemble_id, self.damaged[ensemble_id])

    async def predict(self, body: dict, ensemble_id: str | None = None) -> dict:
        """Predictions for a request body (see the module's docstring): the handle API, and
        POST /predict's. A folder's ensemble is `ensemble_id`, or the multiplexed model id."""
        self.counts["requests"] += 1
        if ensemble_id is None and self.multiplexed:
            ensemble_id = serve.get_multiplexed_model_id()
        ensemble = await self._ensemble(ensemble_id)
        X, coverage = parse_request(body, ensemble)
        try:
            pred = await self._forward((ensemble, X))
            if isinstance(pred, Exception):
                raise pred
            return {"predictions": response_rows(pred, coverage)}
        except (ValueError, FloatingPointError) as err:  # e.g. a variance beyond float32
            raise RequestError(422, "rows", None, f"The ensemble cannot predict these rows: {err}") from None

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)  # both set per app in __init__
    async def _forward(self, items: list[tuple]) -> list:
        """One stacked forward pass per ensemble over the rows of a batch of requests."""
        self.counts["forward_passes"] += 1
        self.counts["largest_batch"] = max(self.counts["largest_batch"], len(items))
        groups: dict[int, list[int]] = {}
        for i, (ensemble, _) in enumerate(items):
            groups.setdefault(id(ensemble), []).append(i)
        results = [None] * len(items)
        for indices in groups.values():
            ensemble = items[indices[0]][0]
            for i, result in zip(indices, predict_parts(ensemble, [items[i][1] for i in indices])):
                results[i] = result
        return results

    async def _body(self, request: Request):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise RequestError(413, "body", int(declared), f"The request body is {declared} bytes; "
                               f"the limit is {self.max_body_bytes}.")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body_bytes:
                raise RequestError(413, "body", f"over {self.max_body_bytes} bytes",
                                   f"The request body is over the limit of {self.max_body_bytes} bytes.")
        return parse_json(bytes(raw))

    async def _describe(self, ensemble_id: str | None = None) -> dict:
        counts = dict(self.counts)
        if self.multiplexed and ensemble_id is None:
            ids = await asyncio.to_thread(ensemble_ids, self.location)
            return {"location": self.location, "ensembles": [i for i in ids if i not in self.damaged],
                    "damaged": dict(self.damaged), "loads": dict(self.loads), **counts}
        return {"location": self.location, **({"ensemble": ensemble_id} if ensemble_id else {}),
                **describe(await self._ensemble(ensemble_id)), **counts}

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            return JSONResponse(await self._route(request))
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except Exception:  # a defect of ours: logged on the replica, never shown to the client
            logger.exception("ensemble server: request %s %s failed", request.method, request.url.path)
            return JSONResponse({"error": "Internal error; the replica's log has the details.",
                                 "field": None, "value": None}, status_code=500)

    async def _route(self, request: Request) -> dict:
        path = request.url.path[len(request.scope.get("root_path", "")):]
        parts = [part for part in path.split("/") if part]
        method = "POST" if parts[-1:] == ["predict"] else "GET"
        known = parts in ([], ["healthz"], ["predict"]) or (
            self.multiplexed and len(parts) in (2, 3) and parts[0] == "ensembles" and parts[2:] in ([], ["predict"]))
        if not known:
            raise RequestError(404, "path", path, f"No route {path}: GET /, GET /healthz, POST /predict"
                               + (", GET /ensembles/<id>, POST /ensembles/<id>/predict." if self.multiplexed else "."))
        if request.method != method:
            raise RequestError(405, "method", request.method, f"{path} takes {method}, not {request.method}.")
        if parts == ["healthz"]:
            return {"status": "ok"}
        ensemble_id = parts[1] if parts[:1] == ["ensembles"] else None
        if method == "GET":
            return await self._describe(ensemble_id)
        return await self.predict(await self._body(request), ensemble_id)


def ensemble_app(ensemble, *, num_replicas: int = 1, use_gpu: bool = False, cpus_per_replica: float = 1.0,
                 max_batch_size: int = 32, batch_wait_ms: float = 2.0, max_ongoing_requests: int = 128,
                 max_body_bytes: int = MAX_BODY_BYTES, max_ensembles_per_replica: int = 3,
                 member_factory=None) -> serve.Application:
    """A Serve application for the saved ensemble at `ensemble` (a folder or URI), or for every
    ensemble in the folder `ensemble` (multiplexed). Checked here, before anything is deployed.

    `max_batch_size` requests (1: no batching) wait at most `batch_wait_ms` for each other; a
    replica takes `max_ongoing_requests` at once, so that is the most a batch can gather.
    `member_factory` rebuilds ensembles of factory-built members (importable where replicas run).
    """
    # replicas may run in another directory (a cluster's workers do): a local path goes absolute
    location = str(ensemble) if is_uri(ensemble) else str(Path(ensemble).resolve())
    num_replicas = check_int("ensemble_app", "num_replicas", num_replicas, minimum=1)
    max_batch_size = check_int("ensemble_app", "max_batch_size", max_batch_size, minimum=1)
    max_ongoing_requests = check_int("ensemble_app", "max_ongoing_requests", max_ongoing_requests, minimum=1)
    max_body_bytes = check_int("ensemble_app", "max_body_bytes", max_body_bytes, minimum=1)
    max_ensembles = check_int("ensemble_app", "max_ensembles_per_replica", max_ensembles_per_replica, minimum=1)
    batch_wait_ms = check_float("ensemble_app", "batch_wait_ms", batch_wait_ms, minimum=0.0)
    cpus_per_replica = check_float("ensemble_app", "cpus_per_replica", cpus_per_replica, minimum=0.0)
    check_store(location, "ensemble")
    if not is_uri(location) and not Path(location).is_dir():
        raise ValueError(f"The 'ensemble' parameter of ensemble_app must be a saved ensemble or a folder of "
                         f"them. Got {location!r} instead: there is no such folder.")
    multiplexed = not has_ensemble(location)
    if multiplexed and not ensemble_ids(location):
        raise ValueError(f"The 'ensemble' parameter of ensemble_app must be a saved ensemble or a folder of "
                         f"them. Got {location!r} instead: it holds no {MANIFEST}, nor do its sub-folders.")
    member_factory = check_callable("ensemble_app", "member_factory", member_factory)
    if not multiplexed:  # a missing member or a damaged file is an error here, not in a replica
        load_ensemble(location, member_factory=member_factory)
    return EnsembleServer.options(
        num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": int(bool(use_gpu))},
    ).bind(location, multiplexed, max_batch_size=max_batch_size, batch_wait_s=batch_wait_ms / 1000,
           max_body_bytes=max_body_bytes, max_ensembles_per_replica=max_ensembles, use_gpu=bool(use_gpu),
           member_factory=member_factory)


def app_builder(args: dict) -> serve.Application:
    """The entry point of a Serve config (`import_path: ray_ensembles.serving:app_builder`): its
    `args` are `ensemble` and ensemble_app's keyword arguments. `serve run` passes strings from its
    command line, so numbers and flags are converted here."""
    args = dict(args)
    if "ensemble" not in args:
        raise ValueError("The Serve config's args must name the 'ensemble' to serve. Got "
                         f"{sorted(args)} instead.")
    defaults = ensemble_app.__kwdefaults__
    unknown = sorted(set(args) - set(defaults) - {"ensemble"})
    if unknown:
        raise ValueError(f"Unknown args {unknown} in the Serve config; ensemble_app takes {sorted(defaults)}.")
    if isinstance(args.get("member_factory"), str):
        args["member_factory"] = import_callable(args["member_factory"], "The Serve config's arg 'member_factory'")
    for name, value in args.items():
        if name not in ("ensemble", "member_factory") and isinstance(value, str):
            kind = type(defaults[name])
            args[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return ensemble_app(args.pop("ensemble"), **args)
