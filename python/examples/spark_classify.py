"""Classify a JSONL or Parquet file of articles on Spark and write Parquet.

    python python/examples/spark_classify.py --input IN.jsonl --output OUT.parquet \
        [--master local[2]] [--partitions N] [--threads-per-task 1] [--model DIR] [--heads DIR]

The input needs an `id` and a `text` field per record (JSONL: one object per line; broken
lines are reported by Spark's JSON reader as rows with null fields and come out with `error`
set). Prints records/s when done. On an existing cluster, run the same file with
`spark-submit --master spark://HOST:7077 python/examples/spark_classify.py ...` (or as a
Databricks Python task), with the themescan wheel installed on the workers and the model at a
path every worker can read.
"""

import argparse
import sys
import time

from pyspark.sql import SparkSession

import themescan.spark


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="IN.jsonl or IN.parquet")
    p.add_argument("--output", required=True, help="OUT.parquet (a folder, overwritten)")
    p.add_argument("--master", default=None, help="Spark master URL (default: Spark's own)")
    p.add_argument("--partitions", type=int, default=None, help="repartition the input")
    p.add_argument("--threads-per-task", type=int, default=1)
    p.add_argument("--model", default=None, help="encoder folder readable on every worker")
    p.add_argument("--heads", default=None, help="heads folder readable on every worker")
    args = p.parse_args()

    builder = SparkSession.builder.appName("themescan-classify")
    if args.master:
        builder = builder.master(args.master)
    spark = builder.getOrCreate()
    if args.input.endswith(".parquet"):
        df = spark.read.parquet(args.input)
    else:
        df = spark.read.schema("id string, text string").json(args.input)
    if args.partitions:
        df = df.repartition(args.partitions)
    started = time.perf_counter()
    out = themescan.spark.classify(
        df,
        threads_per_task=args.threads_per_task,
        model=args.model,
        heads=args.heads,
    )
    out.write.mode("overwrite").parquet(args.output)
    seconds = time.perf_counter() - started
    written = spark.read.parquet(args.output)
    n = written.count()
    errors = written.filter("error is not null and size(themes) = 0").count()
    print(
        f"{n} records ({errors} with errors) in {seconds:.1f} s: {n / seconds:.2f} records/s",
        file=sys.stderr,
    )
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
