#!/usr/bin/env python
"""Predictions with uncertainty for a Parquet or CSV table of any size.

    python jobs/predict.py --ensemble out/ensemble --data table.parquet --output preds/
    python jobs/predict.py --ensemble s3://b/ens --data s3://b/big.parquet --output s3://b/preds --num-workers 8 --use-gpu

Writes Parquet to the --output folder: the input's other (id or key) columns, then `mean`,
`variance`, `aleatoric`, `epistemic`, `lower_<c>`, `upper_<c>` (central interval of the
moment-matched Gaussian at coverage c), or for a classifier `prob_<k>`, `entropy`,
`mutual_information` and `predicted`. Features are matched by the names stored with the ensemble.

It streams: batches of --batch-size rows, read, predicted and written one at a time, so memory
does not grow with the file. Without --num-workers it runs in this process; with it, as Ray Data
`map_batches` on that many actors, each loading the ensemble once (one GPU each with --use-gpu).
"""

from __future__ import annotations

import argparse
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.csv
import pyarrow.dataset
import pyarrow.fs
import pyarrow.parquet as pq
from common import fail

from ray_ensembles.data import filesystem_for
from ray_ensembles.inference import BatchPredictor, feature_columns, load_any


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ensemble", required=True, help="saved ensemble: a folder or URI")
    p.add_argument("--data", required=True, help="Parquet or CSV: a file, folder or URI")
    p.add_argument("--output", required=True, help="Parquet output folder (local or URI)")
    p.add_argument("--batch-size", type=int, default=65536)
    p.add_argument("--num-workers", type=int, default=0, help="Ray Data actors (0: stream in this process)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--features", default=None, help="feature columns, if the ensemble has no names")
    p.add_argument("--keep-columns", default=None, help="input columns to copy (default: all non-features)")
    p.add_argument("--coverage", type=float, default=0.9)
    return p.parse_args(argv)


def open_input(path: str):
    """(filesystem, path, format) of the input, checked to exist."""
    filesystem, inner = filesystem_for(path, "--data")
    info = filesystem.get_file_info(inner)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise ValueError(f"The '--data' option names a file that does not exist. Got {path!r} instead.")
    fmt = "csv" if inner.lower().endswith((".csv", ".csv.gz")) else "parquet"
    return filesystem, inner, fmt


def input_batches(filesystem, path: str, fmt: str, batch_size: int):
    """The input as a stream of pyarrow tables of at most batch_size rows."""
    if fmt == "parquet":
        dataset = pyarrow.dataset.dataset(path, filesystem=filesystem, format="parquet")
        # no read-ahead and no pre-buffering: with pyarrow's defaults the job's peak memory grew
        # from 0.5 GiB at 1M rows to 1.4 GiB at 10M; without them it stays flat
        options = pyarrow.dataset.ParquetFragmentScanOptions(pre_buffer=False)
        for batch in dataset.to_batches(batch_size=batch_size, batch_readahead=0, fragment_readahead=0,
                                        fragment_scan_options=options):
            yield pa.Table.from_batches([batch])
    else:
        reader = pyarrow.csv.open_csv(filesystem.open_input_stream(path),
                                      read_options=pyarrow.csv.ReadOptions(block_size=1 << 22))
        for batch in reader:
            for start in range(0, batch.num_rows, batch_size):
                yield pa.Table.from_batches([batch.slice(start, batch_size)])


def schema_of(filesystem, path: str, fmt: str) -> pa.Schema:
    if fmt == "parquet":
        return pyarrow.dataset.dataset(path, filesystem=filesystem, format="parquet").schema
    return next(input_batches(filesystem, path, fmt, 1)).schema


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth dictionary-encoding in the output: all but the floats. The predictions'
    many distinct floats made pyarrow's default dictionary attempt 5x the cost of the writes
    (and the file 1.5x the size)."""
    return [f.name for f in schema if not pa.types.is_floating(f.type)] + ["predicted"]


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.batch_size < 1 or args.num_workers < 0 or not 0 < args.coverage < 1:
            raise ValueError(f"'--batch-size' must be >= 1, '--num-workers' >= 0 and '--coverage' in (0, 1). "
                             f"Got {args.batch_size}, {args.num_workers}, {args.coverage} instead.")
        ensemble = load_any(args.ensemble)  # a clear error for a missing or damaged ensemble
        filesystem, path, fmt = open_input(args.data)
        features = args.features.split(",") if args.features else None
        schema = schema_of(filesystem, path, fmt)
        features = feature_columns(ensemble, schema.names, features)
        keep = args.keep_columns.split(",") if args.keep_columns else None
    except ValueError as err:
        fail(str(err))

    # write next to the target, then rename: a failed run leaves no half-written output
    local_output = "://" not in args.output
    final = Path(args.output) if local_output else None
    target = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}") if local_output else args.output
    kwargs = dict(features=features, coverage=args.coverage, use_gpu=args.use_gpu, keep=keep)
    rows = 0
    if args.num_workers == 0:
        predictor = BatchPredictor(ensemble, **kwargs)  # the one loaded above: read it once
        Path(target).mkdir(parents=True)
        writer = None
        for table in input_batches(filesystem, path, fmt, args.batch_size):
            out = predictor(table)
            writer = writer or pq.ParquetWriter(str(Path(target) / "part-00000.parquet"), out.schema,
                                                use_dictionary=dictionary_columns(schema))
            writer.write_table(out)
            rows += out.num_rows
        if writer is not None:
            writer.close()
    else:
        import ray
        import ray.data
        if not ray.is_initialized():
            ray.init()
        # Read and write tasks ask for no CPU. The predicting actors hold theirs for the whole run,
        # so a read that waited for a CPU could wait forever: behind them, and behind other jobs'
        # tasks that wait in turn (seen in jobs/load_test.py with Tune trials beside this job).
        # (Ray Data's V2 Parquet reader adds a file-listing task that always asks for one CPU.)
        ray.data.DataContext.get_current().use_datasource_v2 = False
        no_cpu = {"num_cpus": 0}
        read = ray.data.read_parquet if fmt == "parquet" else ray.data.read_csv
        dataset = read(args.data if "://" in args.data else path, ray_remote_args=no_cpu)
        dataset = dataset.map_batches(BatchPredictor, fn_constructor_kwargs=dict(kwargs, ensemble=args.ensemble),
                                      batch_size=args.batch_size, batch_format="pyarrow",
                                      concurrency=args.num_workers, num_cpus=args.cpus_per_worker,
                                      num_gpus=1 if args.use_gpu else 0)
        dataset.write_parquet(str(target), ray_remote_args=no_cpu, use_dictionary=dictionary_columns(schema))
        rows = pq.ParquetDataset(str(target)).read(columns=[]).num_rows if local_output else -1
    if local_output:
        if final.exists():
            shutil.rmtree(final)
        Path(target).rename(final)
    print(f"wrote {rows if rows >= 0 else 'all'} rows of predictions to {args.output}")


if __name__ == "__main__":
    main()
