"""The manifest of an ensemble directory, and its one reader and writer: no other module reads
or writes a manifest key.

    {"format": "ray_ensembles.ensemble", "format_version": 3, "library_version": "...",
     "task": "regression", "config": {...}, "normalization": {...},
     "members": [{"id": 0, "seed": ..., "file": "member_000.safetensors", "sha256": "..."}, ...],
     "calibration": {...}, "training": {...}}          (the last two only where there are such)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .._version import __version__

FORMAT = "ray_ensembles.ensemble"
# 2: per-member Adam step counts, restart attempts and epoch loss sums in checkpoints, float64
# normalisation statistics and the target's dtype. 3: a regression config's nll_beta (members
# before it trained on the plain NLL). 4: an optional post-hoc calibration, and each member's own
# configuration in an ensemble combined from several; written only by such ensembles, so that a
# reader that would ignore them refuses them instead. 5: inputs of any shape (a config's dim_in a
# list) and unstandardised inputs (its standardize_inputs false), written only by such ensembles.
# 6: conformal scores in the calibration, written only by ensembles that have them.
# Versions 1 to 5 still load.
FORMAT_VERSION = 6
MANIFEST = "manifest.json"


def member_filename(member_id: int) -> str:
    return f"member_{member_id:03d}.safetensors"


def upgrade_config(task: str, config: dict):
    """A config saved before format version 3 has no nll_beta: its members trained on the plain
    NLL. Applied alike to the manifest's and to each member file's."""
    if task == "regression":
        config.setdefault("nll_beta", 0.0)


@dataclasses.dataclass
class Manifest:
    """`members`: per member its id, seed, file, SHA-256, and in an ensemble combined from several
    its own config. `training`: the loop's state, in a checkpoint's manifest only."""

    task: str
    config: dict
    normalization: dict
    members: list[dict]
    calibration: dict | None = None
    training: dict | None = None
    library_version: str = __version__

    @property
    def entries(self) -> dict[int, dict]:
        """Each member's entry, by id, in the saved order."""
        return {e["id"]: e for e in self.members}

    def member_configs(self, ids) -> list[dict] | None:
        """The configs of members `ids` where each has its own (a combined ensemble), else None."""
        entries = self.entries
        return [entries[m]["config"] for m in ids] if "config" in entries[ids[0]] else None

    def write(self, directory: Path):
        # the lowest version whose readers take everything in it
        shaped = any(isinstance(c.get("dim_in"), list) or "standardize_inputs" in c
                     for c in [self.config, *(e.get("config", {}) for e in self.members)])
        version = 6 if "conformal_scores" in (self.calibration or {}) else 5 if shaped else \
            4 if self.calibration or any("config" in e for e in self.members) else 3
        data = {"format": FORMAT, "format_version": version, "library_version": self.library_version,
                "task": self.task, "config": self.config, "normalization": self.normalization,
                "members": self.members}
        if self.calibration:
            data["calibration"] = self.calibration
        if self.training is not None:
            data["training"] = self.training
        tmp = Path(directory) / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, Path(directory) / MANIFEST)

    @classmethod
    def read(cls, path) -> "Manifest":
        """The manifest of ensemble directory `path`, checked against the format."""
        path = Path(path)
        file = path / MANIFEST
        if not file.is_file():
            raise ValueError(f"{path} is not a saved ensemble: it has no {MANIFEST}.")
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"The manifest {file} is not valid JSON ({err}).") from None
        _check(data, file)
        upgrade_config(data["task"], data["config"])
        return cls(data["task"], data["config"], data["normalization"], data["members"], data.get("calibration"),
                   data.get("training"), data["library_version"])


def _check(manifest, file):
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
