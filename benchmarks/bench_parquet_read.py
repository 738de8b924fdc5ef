"""What sizing Ray Data's Parquet footer readers to the files saves: `read_parquet_files` (one
FooterReader actor per 256 files) against `ray.data.read_parquet` with Ray's default pool (32
actors), side by side, alternating, on a private local Ray instance.

The files are shaped like our token shards and feature files (a few small Parquet files, as
fit-codebook and pretrain read them). Each read is planned and executed to Arrow in the driver.

    python benchmarks/bench_parquet_read.py [--files 12] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    import ray

    from pipelines.ray_stages import read_parquet_files

    ray.init(address="local", num_cpus=4, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as directory:
        paths = []
        for i in range(args.files):
            paths.append(os.path.join(directory, f"part{i}.parquet"))
            features = rng.normal(size=(4, 1024)).astype(np.float16)
            table = pa.table({"video_id": [f"v{i}"] * 4, "feature": [f.tobytes() for f in features]})
            pq.write_table(table, paths[-1])

        def seconds(read, rows: int = 4 * args.files) -> float:
            started = time.perf_counter()
            assert sum(t.num_rows for t in ray.get(read().to_arrow_refs())) == rows
            return time.perf_counter() - started

        seconds(lambda: ray.data.read_parquet(paths[:1]), 4)  # warm the worker pool for both sides
        ours, default = [], []
        for round_ in range(args.rounds):  # alternating which side goes first
            sides = [
                (default, lambda: ray.data.read_parquet(paths, columns=["video_id", "feature"])),
                (ours, lambda: read_parquet_files(paths, None, ["video_id", "feature"])),
            ]
            for figures, read in sides[:: 1 if round_ % 2 == 0 else -1]:
                figures.append(seconds(read))
    print(f"{args.files} files, {args.rounds} rounds; load {os.getloadavg()[0]:.2f}; Ray {ray.__version__}")
    print(f"{'':28}{'ours':>8}{'default':>9}{'ratio':>8}")
    for label, pick in (("s per read, best", min), ("s per read, median", np.median)):
        print(f"{label:28}{pick(ours):8.2f}{pick(default):9.2f}{pick(ours) / pick(default):8.2f}")


if __name__ == "__main__":
    main()
