#!/usr/bin/env python
"""Predictions with uncertainty for a Parquet or CSV table of any size.

    python jobs/predict.py --ensemble out/ensemble --data table.parquet --output preds/
    python jobs/predict.py --ensemble s3://b/ens --data s3://b/big.parquet --output s3://b/preds --num-workers 8 --use-gpu

Writes Parquet to the --output folder, which must be new, empty or a previous output of this job
(or --overwrite): the input's other (id or key) columns, then `mean`,
`variance`, `aleatoric`, `epistemic`, `lower_<c>`, `upper_<c>` (central interval of the
moment-matched Gaussian at coverage c), or for a classifier `prob_<k>`, `entropy`,
`mutual_information` and `predicted`. Features are matched by the names stored with the ensemble.

It streams, so memory does not grow with the file. Without --num-workers it runs in this process:
--threads pieces of the input at a time (Parquet row groups; a CSV file is one piece), each read,
predicted and written in batches of --batch-size rows into its own part file. With --num-workers
it runs as Ray Data `map_batches` on that many actors, each loading the ensemble once (one GPU
each with --use-gpu).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute
import pyarrow.csv
import pyarrow.dataset
import pyarrow.fs
import pyarrow.parquet as pq
from common import add_console_arguments, fail, import_callable, say, start_ray, use_parquet_reader_v1

from ray_ensembles.io.locations import check_store, filesystem_for, is_uri

MARKER = "_ray_ensembles_predictions.json"  # marks a folder this job wrote; Parquet readers skip "_" files


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ensemble", required=True, help="saved ensemble: a folder or URI")
    p.add_argument("--data", required=True, help="Parquet or CSV: a file, folder or URI; or a NumPy .npz "
                                                  "file whose array X holds the inputs (images, say)")
    p.add_argument("--member-factory", default=None, metavar="MODULE:FUNCTION",
                   help="the callable that built the members of an ensemble trained with one")
    p.add_argument("--output", required=True, help="Parquet output folder (local or URI)")
    p.add_argument("--batch-size", type=int, default=65536)
    p.add_argument("--num-workers", type=int, default=0, help="Ray Data actors (0: stream in this process)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None,
                   help="without --num-workers: pieces of the input predicted at once (default: torch's threads)")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--features", default=None, help="feature columns, if the ensemble has no names")
    p.add_argument("--keep-columns", default=None, help="input columns to copy (default: all non-features)")
    p.add_argument("--coverage", type=float, default=0.9)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output folder even if this job did not write it")
    add_console_arguments(p, tracking=False)
    return p.parse_args(argv)


def check_output(args) -> str:
    """The output folder, checked before any work: never a file, the input, the ensemble, the
    working directory or a folder holding them, and only a previous output of this job (or
    anything, with --overwrite) if it exists and is not empty."""
    def ours(path) -> bool:
        return (Path(path) / MARKER).is_file()

    if is_uri(args.output):
        filesystem, root = filesystem_for(args.output, "--output")
        listing = filesystem.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
        if listing and not args.overwrite and not any(i.base_name == MARKER for i in listing):
            raise ValueError(f"Refusing to write predictions to {args.output}: it holds files this job "
                             "did not write. Choose a new folder, or pass --overwrite.")
        return args.output
    from ray_ensembles.io import directories

    protect = [p for p in (args.data, args.ensemble) if not is_uri(p)]
    return str(directories.check_writable(Path(args.output), is_ours=ours, what="predictions",
                                      overwrite=args.overwrite, protect=protect))


def input_pieces(dataset) -> list:
    """The input as independent pieces, in order: each row group of each file of a Parquet
    dataset, or None, the whole CSV file, when `dataset` is None. Pieces are predicted in
    parallel, each into its own output file."""
    if dataset is None:
        return [None]
    return [group for fragment in dataset.get_fragments() for group in fragment.split_by_row_group()]


# No read-ahead and no pre-buffering: with pyarrow's defaults the job's peak memory grew from
# 0.5 GiB at 1M rows to 1.4 GiB at 10M; without them it stays flat.
NO_READ_AHEAD = dict(batch_readahead=0, fragment_scan_options=pyarrow.dataset.ParquetFragmentScanOptions(pre_buffer=False))


def piece_batches(piece, filesystem, path: str, batch_size: int):
    """One piece of the input (None: the CSV file at `path`) as a stream of pyarrow tables of at
    most batch_size rows."""
    if piece is not None:
        for batch in piece.to_batches(batch_size=batch_size, **NO_READ_AHEAD):
            yield pa.Table.from_batches([batch])
    else:
        reader = pyarrow.csv.open_csv(filesystem.open_input_stream(path),
                                      read_options=pyarrow.csv.ReadOptions(block_size=1 << 22))
        for batch in reader:
            for start in range(0, batch.num_rows, batch_size):
                yield pa.Table.from_batches([batch.slice(start, batch_size)])


def first_rows(dataset, filesystem, path: str, rows: int = 10_000) -> pa.Table:
    """The input's first rows (at most `rows`), for its schema and the output's encodings."""
    if dataset is not None:
        return dataset.scanner(fragment_readahead=0, **NO_READ_AHEAD).head(rows)
    first = next(piece_batches(None, filesystem, path, rows), None)
    if first is None:
        raise ValueError(f"The '--data' table {path} has no rows.")
    return first


def dictionary_columns(sample: pa.Table) -> list[str]:
    """The columns worth dictionary-encoding in the output: those whose values repeat in the
    sample (keys, categories), plus the predicted class. A dictionary attempt on columns of
    distinct values (the predictions, row ids) made writes up to 5x slower and files larger."""
    def scalar(kind):  # tensors and lists (images, say) have no distinct count, nor repeat
        return not (pa.types.is_nested(kind) or isinstance(kind, pa.BaseExtensionType))

    return [name for name, column in zip(sample.column_names, sample.columns) if scalar(column.type)
            and pyarrow.compute.count_distinct(column).as_py() <= sample.num_rows // 2] + ["predicted"]


def predict_pieces(predictor, pieces, read, write_to: str, use_dictionary: list[str], threads: int) -> int:
    """Predict the pieces, `threads` at a time, piece i into `<write_to>/part-<i>.parquet`, so the
    files in name order hold the rows in input order. Returns the number of rows written.

    Pieces in parallel rather than torch's own threads on one stream: a single stream decodes and
    encodes Parquet on one core while the other waits, and small batched matmuls gain little
    from a second thread. Two pieces at a time with one torch thread each gave 1.4-1.8x the rows
    per second on 2 cores.
    """
    import torch

    pool_size = min(threads, len(pieces)) or 1
    torch.set_num_threads(max(1, threads // pool_size))
    filesystem, root = filesystem_for(write_to, "--output")
    filesystem.create_dir(root)

    def predict_piece(index, piece) -> int:
        writer, rows = None, 0
        for table in read(piece):
            out = predictor(table)
            writer = writer or pq.ParquetWriter(f"{root}/part-{index:05d}.parquet", out.schema,
                                                filesystem=filesystem, use_dictionary=use_dictionary)
            writer.write_table(out)
            rows += out.num_rows
        if writer is not None:
            writer.close()
        return rows

    with ThreadPoolExecutor(pool_size) as pool:  # on a failure, map cancels the pieces not yet started
        return sum(pool.map(predict_piece, range(len(pieces)), pieces))


def main(argv=None):
    # The imports made ~200k objects that live until exit. Frozen, no full collection walks them
    # again, the interpreter's own ones at exit included: a 10M-row job took 4.6 s, against 5.2 s
    # unfrozen (medians of 8 interleaved runs).
    args = parse_args(argv)
    import torch

    from ray_ensembles.io import directories
    from ray_ensembles.loop.data import is_arrays_file, read_arrays, table_source
    from ray_ensembles.model.ensemble import load_ensemble
    from ray_ensembles.model.inference import BatchPredictor, feature_columns

    gc.freeze()
    X = sample = None  # the inputs of an .npz file; the first rows of a table
    if args.threads is None:
        args.threads = torch.get_num_threads()
    try:
        if args.batch_size < 1 or args.num_workers < 0 or args.threads < 1 or not 0 < args.coverage < 1:
            raise ValueError(f"'--batch-size' and '--threads' must be >= 1, '--num-workers' >= 0 and "
                             f"'--coverage' in (0, 1). Got {args.batch_size}, {args.threads}, "
                             f"{args.num_workers}, {args.coverage} instead.")
        for location, option in [(args.ensemble, "--ensemble"), (args.data, "--data")]:
            check_store(location, option)
        check_store(args.output, "--output", write=True)
        output = check_output(args)
        factory = import_callable(args.member_factory, "--member-factory") if args.member_factory else None
        ensemble = load_ensemble(args.ensemble, member_factory=factory)  # a clear error for a missing or damaged ensemble
        if is_arrays_file(args.data):
            X = read_arrays(args.data, "--data", keys=("X",))["X"]
            ensemble.check_x(X, allow_members=False, move=False)
            if args.num_workers:
                raise ValueError("The '--num-workers' option shares a table among Ray Data actors; an .npz file is "
                                 f"predicted in this process. Got {args.num_workers} with {args.data!r} instead.")
        filesystem, path, fmt = table_source(args.data, "--data") if X is None else (None, None, None)
        features = args.features.split(",") if args.features else None
        # opened once: listing a folder and reading its footers is I/O, on S3 a round trip each
        dataset = pyarrow.dataset.dataset(path, filesystem=filesystem, format="parquet") if fmt == "parquet" else None
        if X is None:
            sample = first_rows(dataset, filesystem, path)
            if sample.num_rows == 0:
                raise ValueError(f"The '--data' table {args.data} has no rows.")
            features = feature_columns(ensemble, sample.column_names, features)
        keep = args.keep_columns.split(",") if args.keep_columns else None
    except (pyarrow.ArrowException, UnicodeDecodeError) as err:  # e.g. a CSV that is not UTF-8
        fail(f"The '--data' table {args.data} could not be read ({err}).")
    except ValueError as err:
        fail(re.sub(r"pass that callable as \w+\.load\(\.\.\., member_factory=\.\.\.\)", "pass it as --member-factory",
                    str(err)))

    # write next to the target, then swap it in: a failed run leaves no half-written output
    local_output = not is_uri(output)
    final = Path(output) if local_output else None
    target = str(final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")) if local_output else output
    kwargs = dict(features=features, coverage=args.coverage, use_gpu=args.use_gpu, keep=keep)
    use_dictionary = dictionary_columns(sample) if X is None else ["predicted"]
    started = time.perf_counter()
    try:
        if X is not None:
            say(args, f"predicting the {len(X)} inputs of shape {X.shape[1:]} in {args.data} with the "
                      f"{ensemble.num_members} members of {args.ensemble}, in this process")
            rows = predict_arrays(BatchPredictor(ensemble, **kwargs), X, target, args.batch_size, use_dictionary)
        elif args.num_workers == 0:
            say(args, f"predicting {args.data} with the {ensemble.num_members} members of {args.ensemble}, "
                      f"in this process ({args.threads} piece{'s' * (args.threads != 1)} at a time)")
            predictor = BatchPredictor(ensemble, **kwargs)  # the one loaded above: read it once
            read = functools.partial(piece_batches, filesystem=filesystem, path=path, batch_size=args.batch_size)
            rows = predict_pieces(predictor, input_pieces(dataset), read, target,
                                  use_dictionary, args.threads)
        else:
            rows = predict_on_ray_data(args, kwargs, path, fmt, target, use_dictionary)
        filesystem_out, root = filesystem_for(target, "--output")
        with filesystem_out.open_output_stream(f"{root}/{MARKER}") as marker:
            marker.write(json.dumps({"ensemble": args.ensemble, "data": args.data}).encode())
    except BaseException as err:
        if local_output and Path(target).exists():
            shutil.rmtree(target, ignore_errors=True)  # this run's own temporary folder
        if isinstance(err, (pyarrow.ArrowException, UnicodeDecodeError)):  # past the first rows
            fail(f"The '--data' table {args.data} could not be read ({err}).")
        if isinstance(err, (ValueError, FloatingPointError)):  # e.g. a null in a feature, past the first rows
            fail(str(err))
        raise
    if local_output:
        directories.replace_directory(Path(target), final)
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({"rows": rows if rows >= 0 else None, "output": args.output, "seconds": seconds}))
    else:
        print(f"wrote {rows if rows >= 0 else 'all'} rows of predictions to {args.output} in {seconds:.1f} s")


def predict_arrays(predictor, X, write_to: str, batch_size: int, use_dictionary: list[str]) -> int:
    """Inputs X (N, *shape) predicted `batch_size` rows at a time into `<write_to>/part-00000.parquet`,
    with each input's index in X as the column `row`. Returns the number of rows written."""
    import torch

    filesystem, root = filesystem_for(write_to, "--output")
    filesystem.create_dir(root)
    writer = None
    for start in range(0, len(X), batch_size):
        out = predictor.predict_inputs(torch.from_numpy(X[start:start + batch_size]), first_row=start)
        writer = writer or pq.ParquetWriter(f"{root}/part-00000.parquet", out.schema, filesystem=filesystem,
                                            use_dictionary=use_dictionary)
        writer.write_table(out)
    writer.close()
    return len(X)


def predict_on_ray_data(args, kwargs, path: str, fmt: str, target: str, use_dictionary: list[str]) -> int:
    """The prediction as Ray Data `map_batches` on --num-workers actors; the rows written, or -1
    when the output is a URI (not counted)."""
    import ray.data

    from ray_ensembles.model.inference import BatchPredictor

    say(args, start_ray(args), f"predicting {args.data} on {args.num_workers} Ray Data actor"
                               f"{'s' * (args.num_workers != 1)}{' (one GPU each)' if args.use_gpu else ''}")
    ray.data.DataContext.get_current().enable_progress_bars = not (args.quiet or args.json)
    # Read and write tasks ask for no CPU. The predicting actors hold theirs for the whole run,
    # so a read that waited for a CPU could wait forever: behind them, and behind other jobs'
    # tasks that wait in turn (seen in benchmarks/load_test.py with Tune trials beside this job).
    # Asking for no CPU also lifts Ray's limit on how many run at once, so they are capped at
    # one per actor: uncapped, a 10M-row job on 2 actors started 26 worker processes and took
    # 63-74 s; capped, 24-28 s. Parquet is read without read-ahead here too: with Ray's, the read
    # task of a 30M-row file held 3.6 GiB, and all the job's processes 6.2 GiB (3.9 without).
    use_parquet_reader_v1()
    io_tasks = dict(num_cpus=0, concurrency=args.num_workers)
    source = args.data if is_uri(args.data) else path
    if fmt == "parquet":
        dataset = ray.data.read_parquet(source, **io_tasks, **NO_READ_AHEAD)
    else:
        dataset = ray.data.read_csv(source, **io_tasks)
    dataset = dataset.map_batches(BatchPredictor, fn_constructor_kwargs=dict(kwargs, ensemble=args.ensemble),
                                  batch_size=args.batch_size, batch_format="pyarrow",
                                  compute=ray.data.ActorPoolStrategy(size=args.num_workers),
                                  num_cpus=args.cpus_per_worker, num_gpus=1 if args.use_gpu else 0)
    dataset.write_parquet(target, ray_remote_args={"num_cpus": 0}, concurrency=args.num_workers,
                          use_dictionary=use_dictionary)
    return pq.ParquetDataset(target).read(columns=[]).num_rows if not is_uri(target) else -1


if __name__ == "__main__":
    main()
