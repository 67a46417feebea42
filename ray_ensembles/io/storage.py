"""The on-disk format: an ensemble is a directory.

    manifest.json            format, library version, task, config, normalisation statistics,
                             and one entry per member: id, seed, file name, SHA-256 (`manifest`)
    member_003.safetensors   member 3's tensors (safetensors: no pickle, so loading runs no code)

This module owns the format: `write_ensemble` is the one writer and `read_members` the one reader
of member files, used alike by loading, resuming and the Ray coordinator.

Member files are self-describing (their safetensors metadata repeats id, seed and step), so Ray
workers can each write their own members into one checkpoint and a coordinator can assemble the
manifest afterwards. Training checkpoints are the same directories with extra tensors in each
member file (online weights, Adam moments), so any checkpoint loads as an ensemble.

Writes are atomic (`directories`): locally, a new directory swapped in at once; at a URI (s3://,
gs://, ...), the same directory as objects, the old manifest deleted first and the new one
written last. Only a previous ensemble is ever replaced. Loading a URI downloads the manifest,
then the files it names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .directories import atomic_directory, check_writable, files_at, publish, refuse_strangers
from .locations import filesystem_for, is_uri, store_failure
from .manifest import MANIFEST, Manifest, member_filename, upgrade_config

_METADATA_KEY = "ray_ensembles"


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix` (e.g. "model."), with it removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_member_file(directory: Path, member_id: int, tensors: dict[str, torch.Tensor],
                      metadata: dict) -> str:
    """Write one member file atomically; returns its SHA-256."""
    data = safetensors_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                            metadata={_METADATA_KEY: json.dumps(metadata)})
    path = Path(directory) / member_filename(member_id)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return sha256_bytes(data)


def read_member_file(path: Path, expected_sha256: str | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a member file, refusing anything that is not a valid one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"Member file {path} is missing.") from None
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
        raise ValueError(f"Member file {path} does not match the SHA-256 in the manifest: it is "
                         "corrupt, truncated or was modified after saving.")
    try:
        tensors = safetensors_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        metadata = json.loads(header["__metadata__"][_METADATA_KEY])
    except (SafetensorError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"Member file {path} is not a ray_ensembles safetensors file ({err}).") from None
    return tensors, metadata


def member_metadata(ensemble, index: int) -> dict:
    """What a member file says about itself: enough to tell which ensemble it belongs to."""
    return {"member_id": ensemble.member_ids[index], "seed": ensemble.member_seeds[index],
            "task": ensemble.task, "config": ensemble.member_config(index)}


def weight_files(ensemble) -> dict[int, tuple[dict[str, torch.Tensor], dict]]:
    """Per member id: the tensors (`model.*`, the weights) and metadata of its file."""
    return {m: ({f"model.{k}": v for k, v in ensemble.members.member_state(i).items()},
                member_metadata(ensemble, i)) for i, m in enumerate(ensemble.member_ids)}


def write_ensemble(path, ensemble, member_files: dict | None = None, training: dict | None = None) -> Path:
    """Write `ensemble` as a directory that atomically replaces `path`: the member files, then
    the manifest. `member_files` (per member id: tensors and metadata) are the members' weights
    unless a training checkpoint passes its own, with the optimiser's state; `training` is the
    loop's state, recorded in the manifest of a checkpoint. `path` may be a URI (`publish`)."""
    if is_uri(path):
        with tempfile.TemporaryDirectory(prefix="ensemble-") as local:
            publish(write_ensemble(Path(local) / "ensemble", ensemble, member_files, training), str(path),
                    index=MANIFEST, is_ours=_is_ours, what="an ensemble")
        return str(path)
    member_files = weight_files(ensemble) if member_files is None else member_files
    path = Path(path)
    with atomic_directory(path, is_ours=is_ensemble_directory, what="an ensemble") as tmp:
        entries = []
        for i, m in enumerate(ensemble.member_ids):
            tensors, metadata = member_files[m]
            sha = write_member_file(tmp, m, tensors, metadata)
            entries.append({"id": m, "seed": ensemble.member_seeds[i], "file": member_filename(m), "sha256": sha,
                            **({"config": ensemble.member_config(i)} if ensemble.is_combined else {})})
        Manifest(ensemble.task, ensemble.config, ensemble.standardizer.state(), entries, ensemble.calibration,
                 training).write(tmp)
    return path


def _is_ours(name: str) -> bool:
    return name == MANIFEST or (name.startswith("member_") and name.endswith(".safetensors"))


def check_ensemble_location(location):
    """Refuse, before any work, a folder or URI that saving an ensemble there would refuse."""
    if not is_uri(location):
        check_writable(Path(location), is_ours=is_ensemble_directory, what="an ensemble")
        return
    filesystem, root = filesystem_for(location, "path")
    try:
        refuse_strangers(location, files_at(filesystem, root), _is_ours, "an ensemble")
    except OSError as err:
        raise OSError(store_failure(location, "path", err)) from err


@contextlib.contextmanager
def local_copy(location):
    """A local directory holding the ensemble at `location`: the directory itself, or for a URI
    a temporary download of its manifest and of the member files the manifest names."""
    if not is_uri(location):
        yield Path(location)
        return
    filesystem, root = filesystem_for(location, "path")
    with tempfile.TemporaryDirectory(prefix="ensemble-") as local:
        def download(name):
            try:
                with filesystem.open_input_stream(f"{root}/{name}") as source:
                    (Path(local) / name).write_bytes(source.read())
            except FileNotFoundError:
                raise ValueError(f"{location} is not a complete saved ensemble: it has no {name}.") from None
            except OSError as err:
                raise OSError(store_failure(location, "path", err)) from err

        download(MANIFEST)
        try:
            names = [e["file"] for e in Manifest.read(Path(local)).members]
        except ValueError as err:
            raise ValueError(str(err).replace(local, location)) from None
        for name in names:
            download(name)
        yield Path(local)


def read_members(directory, ensemble) -> list[tuple[dict[str, torch.Tensor], dict]]:
    """The tensors and metadata of each of `ensemble`'s members (in its member order) from
    `directory`: an ensemble directory, or a Ray checkpoint of member files without a manifest.

    Checks everything before anything is used: every member's file is present, matches the
    manifest's SHA-256 (where there is a manifest), is a safetensors file of this library, holds
    weights that fit the ensemble's architecture, and says it is that member of an ensemble of
    the same task and config; and all members are at one training step.
    """
    directory = Path(directory)
    ids = ensemble.member_ids
    missing = [m for m in ids if not (directory / member_filename(m)).is_file()]
    if missing:
        present = sorted(p.name for p in directory.glob("member_*.safetensors"))
        raise ValueError(f"{directory} lacks members {missing} of {ids}: the member file "
                         f"{member_filename(missing[0])} is missing (the folder holds {present}).")
    shas = {}
    if (directory / MANIFEST).exists():
        shas = {m: e["sha256"] for m, e in Manifest.read(directory).entries.items()}
    loaded = []
    for i, m in enumerate(ids):
        path = directory / member_filename(m)
        tensors, meta = read_member_file(path, shas.get(m))
        if isinstance(meta.get("config"), dict):
            upgrade_config(meta.get("task"), meta["config"])
        try:
            ensemble.members.check_member_state(strip_prefix(tensors, "model."), i)
        except ValueError as err:
            raise ValueError(f"Member file {path}: {err}") from None
        wrong = _differences(meta, {"member_id": m, "task": ensemble.task, **ensemble.member_config(i)})
        if wrong:
            raise ValueError(f"Member file {path} belongs to another ensemble: its {', '.join(wrong)}.")
        loaded.append((tensors, meta))
    steps = sorted({meta.get("training", {}).get("step") for _, meta in loaded}, key=str)
    if len(steps) != 1 and not ensemble.is_combined:  # a combined one's members trained apart
        raise ValueError(f"The checkpoint {directory} mixes members from steps {steps}.")
    return loaded


def load_members(directory, ensemble) -> dict[int, dict]:
    """Load every member of `ensemble` from `directory` (checked by `read_members`) into it: the
    Ray coordinator's and the torchrun rank 0's assembly, and `load`'s. Returns each member's
    metadata (seed, step, training loss)."""
    metadata = {}
    for i, (tensors, meta) in enumerate(read_members(directory, ensemble)):
        ensemble.members.load_member_state(i, strip_prefix(tensors, "model."))
        ensemble.member_seeds[i] = meta["seed"]
        metadata[ensemble.member_ids[i]] = meta
    return metadata


def _differences(meta: dict, expected: dict) -> list[str]:
    """'key value (expected value)' for each fact of a member file's metadata (its config's
    entries flattened) that differs from `expected`."""
    have = {**meta.get("config", {}), "member_id": meta.get("member_id"), "task": meta.get("task")}
    return [f"{k} is {have.get(k)!r}, not {v!r}" for k, v in expected.items() if have.get(k) != v] + \
        [f"{k} is {have[k]!r}, not absent" for k in have.keys() - expected.keys()]


def is_ensemble_directory(path: Path) -> bool:
    try:
        Manifest.read(path)
    except ValueError:
        return False
    return True
