"""The Python package against the crate: same results as `classify`, bad records as error
rows, threads, Arrow, embeddings, errors."""

import threading

import numpy as np
import pytest

import themescan
from conftest import assert_same_analysis, classify_reference, project_texts


def test_rows_have_the_classify_fields(analyzer):
    row = analyzer.analyze(
        "Europol en de Belgische politie haalden honderden propagandakanalen van IS offline.",
        id="a1",
    )
    assert list(row) == list(themescan.OUTPUT_FIELDS)
    assert row["id"] == "a1"
    assert [t["theme"] for t in row["themes"]] == analyzer.theme_labels
    assert all(0.0 <= t["score"] <= 1.0 for t in row["themes"])
    assert "takedown" in row["labels"]
    assert any(e["text"] == "Europol" for e in row["entities"])
    assert row["error"] is None


def test_analyze_many_matches_the_classify_tool(analyzer, tmp_path):
    texts = project_texts(60)
    ids = [f"r{i}" for i in range(len(texts))]
    want = classify_reference([{"id": i, "text": t} for i, t in zip(ids, texts)], tmp_path)
    got = analyzer.analyze_many(texts, ids=ids)
    assert [r["id"] for r in got] == ids
    for row in got:
        assert_same_analysis(row, want[row["id"]])


def test_bad_records_give_error_rows_and_lose_nothing(analyzer):
    good = "Ein Gericht in Hamburg verurteilte einen Mann, der Geld an den IS geschickt hatte."
    texts = [good, None, 42, "", "   \n", "\ud800 lone surrogate", good + "\x00" + good, ["x"]]
    rows = analyzer.analyze_many(texts, ids=[str(i) for i in range(len(texts))])
    assert [r["id"] for r in rows] == [str(i) for i in range(len(texts))]
    assert rows[0]["error"] is None and rows[0]["themes"]
    for i in (1, 2, 3, 4, 5, 7):
        assert rows[i]["error"], (i, rows[i])
        assert rows[i]["themes"] == [] and rows[i]["labels"] == []
    assert "empty text" in rows[3]["error"]
    assert "int" in rows[2]["error"]
    # NUL is read as a space, with a warning, and offsets still point into the original.
    assert "NUL" in rows[6]["error"] and rows[6]["themes"]
    assert rows[6]["labels"] == rows[0]["labels"]


def test_single_bad_text_raises_a_themescan_error(analyzer):
    with pytest.raises(themescan.ThemescanError, match="empty text"):
        analyzer.analyze("   ")


def test_huge_text_is_analysed_whole(analyzer):
    text = " ".join(project_texts(400, max_chars=2000))
    assert len(text.encode()) > 300_000
    row = analyzer.analyze(text, id="huge")
    assert row["error"] is None
    assert row["entities"] and row["entities"][-1]["end"] > len(text.encode()) * 0.9


def test_threads_sharing_one_analyzer_agree_with_serial_calls(analyzer):
    texts = project_texts(24)
    serial = [analyzer.analyze(t, id=str(i)) for i, t in enumerate(texts)]
    results = [None] * len(texts)
    errors = []

    def work(k):
        try:
            for i in range(k, len(texts), 4):
                results[i] = analyzer.analyze(texts[i], id=str(i))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in zip(results, serial):
        assert_same_analysis(got, want)


def test_analyze_arrow_keeps_every_row_with_typed_columns(analyzer):
    pa = pytest.importorskip("pyarrow")
    texts = project_texts(5) + [None, ""]
    table = pa.table({"id": [f"x{i}" for i in range(len(texts))], "text": texts})
    out = analyzer.analyze_arrow(table)
    assert isinstance(out, pa.RecordBatch)
    assert out.schema == themescan.arrow_schema()
    assert out.num_rows == len(texts)
    assert out.column("id").to_pylist() == [f"x{i}" for i in range(len(texts))]
    errors = out.column("error").to_pylist()
    assert errors[5] and errors[6] and not any(errors[:5])
    rows = analyzer.analyze_many(texts[:5], ids=[f"x{i}" for i in range(5)])
    assert out.column("labels").to_pylist()[:5] == [r["labels"] for r in rows]


def test_embedder_returns_normalised_float32_rows():
    embedder = themescan.Embedder(threads=2)
    vectors = embedder.embed(["Europol", "Interpol", "Het regent in Utrecht."])
    assert vectors.shape == (3, embedder.hidden_size) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_a_wrong_model_folder_is_a_model_error_naming_it(tmp_path):
    with pytest.raises(themescan.ModelError, match=str(tmp_path)):
        themescan.Analyzer(model=str(tmp_path))


def test_an_unknown_cpu_path_is_a_config_error():
    with pytest.raises(themescan.ConfigError):
        themescan.Analyzer(cpu_path="fastest")


def test_the_readme_python_example_runs(capsys):
    import re

    from conftest import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "['takedown']" in printed and "(2, 384) float32" in printed


def test_a_custom_theme_set_adds_its_themes(tmp_path):
    import subprocess

    from conftest import REPO, classify_tool

    set_file = tmp_path / "set.toml"
    set_file.write_text(
        'name = "py-set"\n[[theme]]\nname = "weapons_trade"\n'
        'descriptions = ["News about arms trafficking and illegal sales of guns."]\n',
        encoding="utf-8",
    )
    train = classify_tool().with_name("train_themes")
    subprocess.run(
        [str(train), "--theme-set", str(set_file), "--out", str(tmp_path / "set"), "--threads", "2"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    analyzer = themescan.Analyzer(threads=2, theme_sets=[str(tmp_path / "set")])
    assert analyzer.theme_labels == [
        "recruitment", "takedown", "foreign_interference", "financing", "weapons_trade"
    ]
    row = analyzer.analyze(
        "Police seized 300 smuggled assault rifles and arrested four arms dealers who sold "
        "guns and grenades on dark-web markets."
    )
    assert [t["theme"] for t in row["themes"]] == analyzer.theme_labels
    assert "weapons_trade" in row["labels"]
