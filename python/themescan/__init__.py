"""Extremism-related themes and named entities in news articles, in many languages.

A thin layer over the ``themescan`` Rust crate: one multilingual encoder pass per text window
feeds a theme head (``recruitment``, ``takedown``, ``foreign_interference``, ``financing``) and
an entity head (PER, ORG, LOC, MISC). No Python runs in the analysis itself, and the GIL is
released while the encoder works, so threads calling one ``Analyzer`` run in parallel.

Example::

    >>> import themescan
    >>> analyzer = themescan.Analyzer(threads=2)
    >>> row = analyzer.analyze("Europol haalde propagandakanalen van IS offline.", id="a1")
    >>> row["labels"]
    ['takedown']
    >>> [(e["label"], e["text"]) for e in row["entities"]]
    [('ORG', 'Europol'), ('MISC', 'IS')]

A result is a dict with the fields of a line of the crate's ``classify`` tool: ``id``,
``themes`` (every theme with its calibrated score), ``labels`` (themes over their threshold),
``evidence`` (sentences that carry each label, as byte offsets into the UTF-8 text),
``entities`` and ``error`` (``None``, a warning, or why the record could not be analysed).

The default model is found as the crate finds it: ``$THEMESCAN_MODEL_DIR``, else
``models/multilingual-e5-small`` in the source tree the package was built from (fetched by
``models/fetch.sh``); pass ``model=`` to use another folder. Nothing is downloaded.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, List, Optional, Sequence

from ._native import (
    ComputeError,
    ConfigError,
    ModelError,
    NativeAnalyzer,
    NativeEmbedder,
    ThemescanError,
)

__all__ = [
    "Analyzer",
    "Embedder",
    "ThemescanError",
    "ModelError",
    "ConfigError",
    "ComputeError",
    "OUTPUT_FIELDS",
    "rows_to_arrow",
    "arrow_schema",
]

#: The fields of every result row, in order (as a ``classify`` output line).
OUTPUT_FIELDS = ("id", "themes", "labels", "evidence", "entities", "error")


def arrow_schema():
    """The ``pyarrow.Schema`` of :meth:`Analyzer.analyze_arrow` results (and of
    ``themescan.spark.classify``): ``id`` and ``error`` strings, ``labels`` a list of strings,
    ``themes``, ``evidence`` and ``entities`` lists of structs."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("id", pa.string()),
            pa.field(
                "themes",
                pa.list_(pa.struct([("theme", pa.string()), ("score", pa.float32())])),
            ),
            pa.field("labels", pa.list_(pa.string())),
            pa.field(
                "evidence",
                pa.list_(
                    pa.struct(
                        [
                            ("theme", pa.string()),
                            ("start", pa.int64()),
                            ("end", pa.int64()),
                            ("score", pa.float32()),
                        ]
                    )
                ),
            ),
            pa.field(
                "entities",
                pa.list_(
                    pa.struct(
                        [
                            ("text", pa.string()),
                            ("label", pa.string()),
                            ("start", pa.int64()),
                            ("end", pa.int64()),
                            ("score", pa.float32()),
                        ]
                    )
                ),
            ),
            pa.field("error", pa.string()),
        ]
    )


class Analyzer:
    """Finds themes, evidence sentences and named entities in articles.

    Args:
        model: encoder model folder (a local folder or a Hugging Face cache snapshot); default:
            the project's multilingual-e5-small (see the module docs).
        heads: heads folder (``themes.*``, ``themes-neighbours.safetensors`` when its card
            names a neighbour vote, ``ner.*``); default: the crate's ``models/heads``.
        threads: encoder threads (default: all cores).
        cpu_path: ``"auto"`` (int8 where the CPU has AVX-512 VNNI), ``"int8"`` or
            ``"reference"``.
        batch_tokens: padded tokens per encoder batch (default: the crate's).
        theme_sets: more heads folders to score with (custom theme sets made by
            ``train_themes --theme-set FILE --out DIR``); their themes follow those of
            ``heads`` in ``themes``, and the encoder still runs once per window.

    Raises:
        ModelError: a model or heads folder is missing or wrong (the message names the path
            and what was expected).
        ConfigError: an invalid setting.

    Example::

        >>> analyzer = themescan.Analyzer(threads=2)
        >>> rows = analyzer.analyze_many(["Eerste tekst.", "Second text."], ids=["a", "b"])
        >>> [r["id"] for r in rows]
        ['a', 'b']

    One ``Analyzer`` may be shared by threads: the GIL is released while it computes.
    """

    def __init__(
        self,
        model: Optional[str] = None,
        heads: Optional[str] = None,
        threads: Optional[int] = None,
        cpu_path: str = "auto",
        batch_tokens: Optional[int] = None,
        theme_sets: Sequence[str] = (),
    ) -> None:
        self._native = NativeAnalyzer(
            model=None if model is None else str(model),
            heads=None if heads is None else str(heads),
            threads=threads,
            cpu_path=cpu_path,
            batch_tokens=batch_tokens,
            theme_sets=[str(s) for s in theme_sets],
        )

    @property
    def theme_labels(self) -> List[str]:
        """Every theme of the loaded theme sets, in output order."""
        return self._native.theme_labels()

    def describe_compute(self) -> str:
        """What the encoder runs on, e.g. ``"int8 (AVX-512 VNNI), attention bf16"``."""
        return self._native.describe_compute()

    def analyze(self, text: str, id: Optional[str] = None) -> dict:
        """Analyses one text; returns a dict with the fields of a ``classify`` line.

        Raises:
            ThemescanError: the text could not be analysed (empty, not a string, ...), with
                the reason as message. Use :meth:`analyze_many` to get error rows instead.
        """
        row = self.analyze_many([text], ids=[id])[0]
        if row["error"] is not None and not row["themes"]:
            raise ThemescanError(row["error"])
        return row

    def analyze_many(
        self, texts: Sequence[Any], ids: Optional[Sequence[Any]] = None
    ) -> List[dict]:
        """Analyses many texts together (their windows share encoder batches).

        Returns one dict per text, in order. A bad record (``None``, a non-string, an empty
        text) gives a row with ``error`` set and empty results; the other rows are unaffected.
        """
        texts = list(texts)
        if ids is None:
            ids = [None] * len(texts)
        else:
            ids = list(ids)
            if len(ids) != len(texts):
                raise ConfigError(f"{len(ids)} ids for {len(texts)} texts")
        return [json.loads(r) for r in self._native.analyze_json(ids, texts)]

    def analyze_arrow(self, batch, id_col: str = "id", text_col: str = "text"):
        """Analyses a ``pyarrow.RecordBatch`` or ``pyarrow.Table`` with ``id`` and ``text``
        columns; returns a ``pyarrow.RecordBatch`` with :func:`arrow_schema`, one row per input
        row, in order. Null or empty texts give rows with ``error`` set."""
        import pyarrow as pa

        if isinstance(batch, pa.Table):
            batch = batch.combine_chunks()
            columns = {name: batch.column(name) for name in batch.column_names}
        else:
            columns = {name: batch.column(i) for i, name in enumerate(batch.schema.names)}
        if text_col not in columns:
            raise ConfigError(f"no `{text_col}` column in {list(columns)}")
        texts = columns[text_col].to_pylist()
        ids = columns[id_col].to_pylist() if id_col in columns else [None] * len(texts)
        ids = [None if i is None else str(i) for i in ids]
        rows = self.analyze_many(texts, ids=ids)
        return rows_to_arrow(rows)


def rows_to_arrow(rows: Iterable[dict]):
    """Result dicts as a ``pyarrow.RecordBatch`` with :func:`arrow_schema`."""
    import pyarrow as pa

    schema = arrow_schema()
    rows = list(rows)
    return pa.RecordBatch.from_pylist(
        [{k: r.get(k) for k in OUTPUT_FIELDS} for r in rows], schema=schema
    )


class Embedder:
    """Mean-pooled, L2-normalised text embeddings from the same encoder (e5 ``passage:``
    prefix added internally; long texts are averaged over their windows).

    Example::

        >>> import themescan
        >>> vectors = themescan.Embedder(threads=2).embed(["Europol", "Interpol"])
        >>> vectors.shape, vectors.dtype
        ((2, 384), dtype('float32'))
    """

    def __init__(
        self,
        model: Optional[str] = None,
        threads: Optional[int] = None,
        cpu_path: str = "auto",
        batch_tokens: Optional[int] = None,
    ) -> None:
        self._native = NativeEmbedder(
            model=None if model is None else str(model),
            threads=threads,
            cpu_path=cpu_path,
            batch_tokens=batch_tokens,
        )

    @property
    def hidden_size(self) -> int:
        """Width of an embedding (384 for multilingual-e5-small)."""
        return self._native.hidden_size()

    def embed(self, texts: Sequence[str]):
        """Embeds texts; returns a ``numpy.ndarray`` of float32, ``len(texts) × hidden_size``.

        Raises:
            ThemescanError: a text is not a string or the encoder failed.
        """
        import numpy as np

        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ThemescanError(f"text {i} must be a string, found {type(t).__name__}")
        data, hidden = self._native.embed_bytes(texts)
        return np.frombuffer(data, dtype="<f4").reshape(len(texts), hidden)
