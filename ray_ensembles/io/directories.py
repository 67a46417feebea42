"""Writing a directory so that a reader finds the old one or the new one, never a mix.

Locally, everything goes to a new directory beside the target, which then takes the target's
place in one atomic exchange (Linux renameat2, macOS renamex_np). A store (s3://, gs://, ...)
renames nothing at once, so `publish` deletes the old index file first and writes the new one
last: the URI holds the old contents, none (no index: readers refuse it), or the new ones.
Only what this library wrote is ever replaced (`check_writable`). New directories and files get
the user's umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import uuid
from pathlib import Path

from .locations import filesystem_for, store_failure


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
def atomic_directory(path: Path, *, is_ours, what: str):
    """Yield a new directory beside `path` that replaces it only if the block completes.
    `path` must be absent, empty or a previous one of `what` (`check_writable`)."""
    path = check_writable(path, is_ours=is_ours, what=what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()  # mode 0777 less the umask, unlike tempfile's 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, path)


def files_at(filesystem, root: str) -> list[str]:
    import pyarrow.fs

    return [info.base_name for info in filesystem.get_file_info(pyarrow.fs.FileSelector(
        root, allow_not_found=True)) if info.type == pyarrow.fs.FileType.File]


def refuse_strangers(location: str, present: list[str], is_ours, what: str):
    strangers = [name for name in present if not is_ours(name)]
    if strangers:
        raise ValueError(f"Refusing to write {what} to {location}: it holds files that are "
                         f"not {what}'s ({strangers[:3]}). Choose a new location.")


def publish(directory: Path, location: str, *, index: str, is_ours, what: str):
    """Copy `directory` to the URI `location`: the old `index` file goes first, the new one last
    (the module's docstring says why). Only files that `is_ours` (by name) are replaced; a store
    that fails is an OSError naming the URI."""
    filesystem, root = filesystem_for(location, "path")
    try:
        present = files_at(filesystem, root)
        refuse_strangers(location, present, is_ours, what)
        if index in present:
            filesystem.delete_file(f"{root}/{index}")
        files = sorted(directory.iterdir(), key=lambda f: f.name == index)  # the index last
        for file in files:
            with filesystem.open_output_stream(f"{root}/{file.name}") as out:
                out.write(file.read_bytes())
        for stale in set(present) - {f.name for f in files}:  # an older ensemble's other members
            filesystem.delete_file(f"{root}/{stale}")
    except OSError as err:
        raise OSError(store_failure(location, "path", err)) from err
