"""Batch classification on Apache Spark, on the cluster you already have.

``classify(df)`` runs the crate's analyzer inside Spark's Python workers through
``DataFrame.mapInArrow``: record batches go from the JVM to Python as Arrow, through the Rust
analyzer, and back as Arrow. Each Python worker process builds one :class:`themescan.Analyzer`
the first time it needs one and keeps it for every later task (Spark reuses Python workers by
default), so the model is loaded once per worker, not once per task.

Spark's own scheduling gives the fault tolerance: a task whose executor dies is run again
elsewhere, and Spark's output commit protocol writes each partition once, so a job that
loses a worker still yields every record exactly once.

How the model and heads reach the workers: every worker must be able to read them at the same
path. Either pass paths on storage every worker mounts (``model=``, ``heads=``), or ship them
with the job (``spark-submit --archives themescan-model.tar.gz#tsmodel``) and pass the
unpacked folder names relative to the worker's directory (``model="tsmodel/multilingual-e5-small"``).
The ``themescan`` wheel itself must be installed in the workers' Python (or shipped with
``--py-files``/a packed environment, as for any Python dependency).

Example::

    from pyspark.sql import SparkSession
    import themescan.spark

    spark = SparkSession.builder.getOrCreate()
    df = spark.read.parquet("articles.parquet")          # columns id, text
    out = themescan.spark.classify(df, threads_per_task=1)
    out.write.parquet("classified.parquet")
"""

from __future__ import annotations

import os
import threading
from typing import Iterator, Optional, Sequence

import themescan

__all__ = ["classify", "spark_schema"]

# One analyzer per Python worker process, per configuration.
_ANALYZERS: dict = {}
_LOCK = threading.Lock()


def _analyzer(model, heads, threads, cpu_path, batch_tokens, theme_sets) -> "themescan.Analyzer":
    key = (model, heads, threads, cpu_path, batch_tokens, theme_sets, os.getpid())
    with _LOCK:
        analyzer = _ANALYZERS.get(key)
        if analyzer is None:
            analyzer = themescan.Analyzer(
                model=model,
                heads=heads,
                threads=threads,
                cpu_path=cpu_path,
                batch_tokens=batch_tokens,
                theme_sets=list(theme_sets),
            )
            _ANALYZERS[key] = analyzer
        return analyzer


def spark_schema():
    """The Spark ``StructType`` of :func:`classify`'s output (``themescan.arrow_schema()``)."""
    from pyspark.sql.types import (
        ArrayType,
        FloatType,
        LongType,
        StringType,
        StructField,
        StructType,
    )

    def span(*extra):
        return list(extra) + [
            StructField("start", LongType()),
            StructField("end", LongType()),
            StructField("score", FloatType()),
        ]

    return StructType(
        [
            StructField("id", StringType()),
            StructField(
                "themes",
                ArrayType(
                    StructType(
                        [StructField("theme", StringType()), StructField("score", FloatType())]
                    )
                ),
            ),
            StructField("labels", ArrayType(StringType())),
            StructField(
                "evidence", ArrayType(StructType(span(StructField("theme", StringType()))))
            ),
            StructField(
                "entities",
                ArrayType(
                    StructType(
                        span(StructField("text", StringType()), StructField("label", StringType()))
                    )
                ),
            ),
            StructField("error", StringType()),
        ]
    )


def _texts(column) -> list:
    """A text column as Python values; binary values are decoded as UTF-8, and bytes that
    are not UTF-8 become an error marker the analyzer reports for that row only."""
    import pyarrow as pa

    values = column.to_pylist()
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        out = []
        for v in values:
            if v is None:
                out.append(None)
                continue
            try:
                out.append(v.decode("utf-8"))
            except UnicodeDecodeError as e:
                out.append(_InvalidUtf8(e.start))
        return out
    return values


class _InvalidUtf8:
    """A binary text that is not UTF-8 (the analyzer reports it as a non-string value)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def __str__(self) -> str:  # never analysed; named in the error row
        return f"invalid UTF-8 at byte {self.at}"


def classify(
    df,
    id_col: str = "id",
    text_col: str = "text",
    threads_per_task: int = 1,
    model: Optional[str] = None,
    heads: Optional[str] = None,
    cpu_path: str = "auto",
    batch_tokens: Optional[int] = None,
    records_per_batch: int = 32,
    theme_sets: Sequence[str] = (),
):
    """Classifies a DataFrame's texts; returns a DataFrame with :func:`spark_schema`
    (``id``, ``themes``, ``labels``, ``evidence``, ``entities``, ``error``), one row per input
    row.

    Args:
        df: a DataFrame with an id column (any type; written as a string) and a text column
            (string, or binary holding UTF-8).
        threads_per_task: encoder threads per Python worker; match it to
            ``spark.task.cpus``.
        model, heads, cpu_path, batch_tokens, theme_sets: as for :class:`themescan.Analyzer`;
            the paths must be readable on every worker.
        records_per_batch: records analysed per call (their windows share encoder batches).

    Bad records (null, empty or non-UTF-8 text) give rows with ``error`` set; they never fail
    the job.
    """
    from pyspark.sql import functions as F

    selected = df.select(
        F.col(id_col).cast("string").alias("id"), F.col(text_col).alias("text")
    )
    settings = (model, heads, threads_per_task, cpu_path, batch_tokens, tuple(theme_sets))

    def run(batches: Iterator) -> Iterator:
        analyzer = _analyzer(*settings)
        for batch in batches:
            ids = batch.column(0).to_pylist()
            texts = _texts(batch.column(1))
            for start in range(0, len(texts), records_per_batch):
                part_texts = texts[start : start + records_per_batch]
                part_ids = ids[start : start + records_per_batch]
                rows = analyzer.analyze_many(
                    [t if not isinstance(t, _InvalidUtf8) else None for t in part_texts],
                    ids=part_ids,
                )
                for row, t in zip(rows, part_texts):
                    if isinstance(t, _InvalidUtf8):
                        row["error"] = str(t)
                yield themescan.rows_to_arrow(rows)

    return selected.mapInArrow(run, spark_schema())
