"""Where tables, runs and ensembles live: a local path, or a URI that pyarrow.fs understands.

Users point at an S3-compatible store in either of the two ways pyarrow users expect: the
standard AWS environment (`AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3`, the credentials, the
region), or the URI's own query, `s3://bucket/path?endpoint_override=host:port&scheme=http`.
pyarrow 26 and Ray 2.60 honour both by themselves: Ray Train's and Tune's `storage_path` and Ray
Data's paths go through `pyarrow.fs.FileSystem.from_uri` too (tests/test_s3.py shows pyarrow with
either; tests/test_e2e.py runs Train, Tune and Data on two nodes with the endpoint in the query
alone). What breaks is a path appended to a URI that has a query, so every location in the
package is resolved and joined here.
"""

from __future__ import annotations

import uuid
from pathlib import Path


def is_uri(location) -> bool:
    return "://" in str(location)


def filesystem_for(location, name: str = "data"):
    """(pyarrow filesystem, path) for a local path or any URI pyarrow.fs understands
    (s3://, gs://, hdfs://, file://); a clear error naming `name` for an unsupported scheme."""
    import pyarrow
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(str(location))
    except (pyarrow.ArrowInvalid, ValueError) as err:
        if is_uri(location):
            raise ValueError(f"The '{name}' parameter must be a local path or a URI that pyarrow.fs "
                             f"supports. Got {location!r} instead ({err}).") from None
        return pyarrow.fs.LocalFileSystem(), str(Path(location).resolve())


def join(location, *parts: str) -> str:
    """`location` with `parts` appended to its path; a URI's query stays at the end."""
    if not is_uri(location):
        return str(Path(location).joinpath(*parts))
    base, sep, query = str(location).partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def run_ensemble_path(root, name: str) -> str:
    """Where a run (or a sweep's trial) called `name` under `root` keeps its ensemble."""
    return join(root, name, "ensemble")


def check_store(location, name: str, *, write: bool = False):
    """Before any work: a URI's store answers, takes the credentials and has the bucket, and
    (`write`) lets this program write there. One ValueError naming `name` and the URI otherwise.
    The write check puts an empty object of its own under the path and deletes it."""
    if not is_uri(location):
        return
    import pyarrow.fs

    filesystem, path = filesystem_for(location, name)
    if filesystem.type_name not in ("s3", "gcs"):  # no buckets: reading or writing tells
        return
    bucket = path.split("/", 1)[0]
    try:
        if filesystem.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            raise ValueError(f"The '{name}' location {location} is in a bucket that does not exist "
                             f"({bucket!r}).")
        if write:
            probe = f"{path.rstrip('/')}/.ray_ensembles-probe-{uuid.uuid4().hex[:12]}"
            with filesystem.open_output_stream(probe):
                pass
            filesystem.delete_file(probe)
    except OSError as err:
        raise ValueError(store_failure(location, name, err)) from None


def store_failure(location, name: str, err: BaseException) -> str:
    """The one-line message for a store that failed: the option, the URI and the store's words."""
    detail = " ".join(str(err).split())
    return f"The '{name}' location {location} failed: {detail}"
