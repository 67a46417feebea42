"""The on-disk format: an ensemble is a directory.

    manifest.json            format, library version, task, config, normalisation statistics,
                             and one entry per member: id, seed, file name, SHA-256
    member_003.safetensors   member 3's tensors (safetensors: no pickle, so loading runs no code)

This module owns the format: `write_ensemble` is the one writer and `read_members` the one reader
of member files, used alike by loading, resuming and the Ray coordinator.

Member files are self-describing (their safetensors metadata repeats id, seed and step), so Ray
workers can each write their own members into one checkpoint and a coordinator can assemble the
manifest afterwards. Training checkpoints are the same directories with extra tensors in each
member file (online weights, Adam moments), so any checkpoint loads as an ensemble.

Writes are atomic: everything goes to a new directory beside the target, manifest last, which
then takes the target's place in one atomic exchange (Linux renameat2, macOS renamex_np), so at
every instant the path holds the old ensemble or the new one. Only a previous ensemble is ever
replaced: an existing file or any other non-empty folder is refused. New directories and files
get the user's umask.

An ensemble at a URI (s3://, gs://, ...) is the same directory as objects. A store renames
nothing at once, so `publish` deletes the old manifest first and writes the new one last: at
every instant the URI holds the old ensemble, no ensemble (no manifest: loading refuses it), or
the new one. Loading a URI downloads the manifest, then the files it names.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from ._version import __version__
from .locations import filesystem_for, is_uri, store_failure

FORMAT = "ray_ensembles.ensemble"
# 2: per-member Adam step counts, restart attempts and epoch loss sums in checkpoints, float64
# normalisation statistics and the target's dtype. 3: a regression config's nll_beta (members
# before it trained on the plain NLL). 4: an optional post-hoc calibration, and each member's own
# configuration in an ensemble combined from several; written only by such ensembles, so that a
# reader that would ignore them refuses them instead. Versions 1 to 3 still load.
FORMAT_VERSION = 4
MANIFEST = "manifest.json"
_METADATA_KEY = "ray_ensembles"


def member_filename(member_id: int) -> str:
    return f"member_{member_id:03d}.safetensors"


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
            publish(write_ensemble(Path(local) / "ensemble", ensemble, member_files, training), str(path))
        return str(path)
    member_files = weight_files(ensemble) if member_files is None else member_files
    path = Path(path)
    with atomic_directory(path) as tmp:
        entries = []
        for i, m in enumerate(ensemble.member_ids):
            tensors, metadata = member_files[m]
            sha = write_member_file(tmp, m, tensors, metadata)
            entries.append({"id": m, "seed": ensemble.member_seeds[i], "file": member_filename(m), "sha256": sha,
                            **({"config": ensemble.member_config(i)} if ensemble.is_combined else {})})
        calibration = ensemble.calibration
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION if calibration or ensemble.is_combined else 3,
                    "library_version": __version__, "task": ensemble.task, "config": ensemble.config,
                    "normalization": ensemble.standardizer.state(), "members": entries}
        if calibration:
            manifest["calibration"] = calibration
        if training is not None:
            manifest["training"] = training
        write_manifest(tmp, manifest)
    return path


def _is_ours(name: str) -> bool:
    return name == MANIFEST or (name.startswith("member_") and name.endswith(".safetensors"))


def _files_at(filesystem, root: str) -> list[str]:
    import pyarrow.fs

    return [info.base_name for info in filesystem.get_file_info(pyarrow.fs.FileSelector(
        root, allow_not_found=True)) if info.type == pyarrow.fs.FileType.File]


def _refuse_strangers(location: str, present: list[str]):
    strangers = [name for name in present if not _is_ours(name)]
    if strangers:
        raise ValueError(f"Refusing to write an ensemble to {location}: it holds files that are "
                         f"not an ensemble's ({strangers[:3]}). Choose a new location.")


def check_ensemble_location(location):
    """Refuse, before any work, a folder or URI that saving an ensemble there would refuse."""
    if not is_uri(location):
        check_writable(Path(location), is_ours=is_ensemble_directory, what="an ensemble")
        return
    filesystem, root = filesystem_for(location, "path")
    try:
        _refuse_strangers(location, _files_at(filesystem, root))
    except OSError as err:
        raise OSError(store_failure(location, "path", err)) from err


def publish(directory: Path, location: str):
    """Copy the ensemble directory `directory` to the URI `location`: the old manifest goes
    first, the new one last (the module's docstring says why). Only an ensemble, or member files
    an interrupted publish left, are replaced; a store that fails is an OSError naming the URI."""
    filesystem, root = filesystem_for(location, "path")
    try:
        present = _files_at(filesystem, root)
        _refuse_strangers(location, present)
        if MANIFEST in present:
            filesystem.delete_file(f"{root}/{MANIFEST}")
        files = sorted(directory.iterdir(), key=lambda f: f.name == MANIFEST)  # the manifest last
        for file in files:
            with filesystem.open_output_stream(f"{root}/{file.name}") as out:
                out.write(file.read_bytes())
        for stale in set(present) - {f.name for f in files}:  # an older ensemble's other members
            filesystem.delete_file(f"{root}/{stale}")
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
            names = [e["file"] for e in read_manifest(Path(local))["members"]]
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
        shas = {e["id"]: e["sha256"] for e in read_manifest(directory)["members"]}
    loaded = []
    for i, m in enumerate(ids):
        path = directory / member_filename(m)
        tensors, meta = read_member_file(path, shas.get(m))
        if isinstance(meta.get("config"), dict):
            _upgrade_config(meta.get("task"), meta["config"])
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


def check_writable(path: Path, *, is_ours, what: str, overwrite: bool = False,
                   protect: tuple = ()) -> Path:
    """`path`, resolved, if writing `what` there destroys nothing this library did not write:
    it is absent, an empty folder, or a folder that `is_ours` (a previous output), or
    `overwrite` is set. Never a file, the working directory, a folder holding one of `protect`
    (an input) or a folder inside one, whatever `overwrite` says."""
    path = Path(path).resolve()
    for inside in (Path.cwd(), *map(Path, protect)):
        inside = inside.resolve()
        if path == inside or path in inside.parents:
            raise ValueError(f"Refusing to write {what} to {path}: it holds {inside}, which would be "
                             "replaced. Choose a new folder.")
    for source in (Path(p).resolve() for p in protect):
        if source in path.parents:
            raise ValueError(f"Refusing to write {what} to {path}: it lies inside the input {source}, "
                             "which it would change. Choose a folder outside it.")
    if not path.exists():
        return path
    if not path.is_dir():
        raise ValueError(f"Refusing to write {what} to {path}: a file is there. Choose a new folder.")
    if not overwrite and any(path.iterdir()) and not is_ours(path):
        raise ValueError(f"Refusing to write {what} to {path}: the folder holds files that are not "
                         f"{what}. Choose a new or empty folder.")
    return path


def is_ensemble_directory(path: Path) -> bool:
    try:
        read_manifest(path)
    except ValueError:
        return False
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step; False where the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform == "darwin":  # renamex_np(from, to, RENAME_SWAP)
            result = libc.renamex_np(os.fsencode(a), os.fsencode(b), ctypes.c_uint(2))
        else:  # renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_EXCHANGE)
            result = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), ctypes.c_uint(2))
    except (OSError, AttributeError):
        return False
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_directory(new: Path, path: Path):
    """Put directory `new` at `path`, atomically: the old contents are gone only once the new
    ones are in place. Where no atomic exchange exists, there is a moment between two renames."""
    if not path.exists():
        os.rename(new, path)
    elif _exchange(new, path):
        shutil.rmtree(new)  # the old contents, now at the temporary name
    else:
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
        os.rename(path, old)
        os.rename(new, path)
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_directory(path: Path):
    """Yield a new directory beside `path` that replaces it only if the block completes.
    `path` must be absent, empty or a previous ensemble (`check_writable`)."""
    path = check_writable(path, is_ours=is_ensemble_directory, what="an ensemble")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()  # mode 0777 less the umask, unlike tempfile's 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, path)


def write_manifest(directory: Path, manifest: dict):
    tmp = Path(directory) / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, Path(directory) / MANIFEST)


def read_manifest(path: Path) -> dict:
    """The manifest of ensemble directory `path`, checked against the format."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise ValueError(f"{path} is not a saved ensemble: it has no {MANIFEST}.")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"The manifest {file} is not valid JSON ({err}).") from None
    _check_manifest(manifest, file)
    _upgrade_config(manifest["task"], manifest["config"])
    return manifest


def _upgrade_config(task: str, config: dict):
    """A config saved before format version 3 has no nll_beta: its members trained on the plain
    NLL. Applied alike to the manifest's and to each member file's."""
    if task == "regression":
        config.setdefault("nll_beta", 0.0)


def _check_manifest(manifest, file):
    def bad(why):
        raise ValueError(f"The manifest {file} is invalid: {why}.")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        bad(f"'format' must be {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        bad(f"'format_version' {version!r} is not supported by ray_ensembles {__version__} "
            f"(reads 1 to {FORMAT_VERSION})")
    for key, kind in [("library_version", str), ("task", str), ("config", dict),
                      ("normalization", dict), ("members", list)]:
        if not isinstance(manifest.get(key), kind):
            bad(f"'{key}' must be a {kind.__name__}")
    if not manifest["members"]:
        bad("it lists no members")
    ids = []
    for entry in manifest["members"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
            bad(f"member entry {entry!r} has no integer 'id'")
        # the file name is derived, never taken from the file, so it cannot point elsewhere
        if entry.get("file") != member_filename(entry["id"]):
            bad(f"member {entry['id']} file must be {member_filename(entry['id'])!r}")
        if not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("seed"), int):
            bad(f"member {entry['id']} needs 'sha256' and 'seed'")
        if not isinstance(entry.get("config", {}), dict):
            bad(f"member {entry['id']}'s 'config' must be a dict")
        ids.append(entry["id"])
    if len(set(ids)) != len(ids):
        bad(f"member ids repeat: {ids}")
