"""Shared fixtures: one analyzer for the whole session, the crate's `classify` tool as the
reference, and texts written by the project (training-data/themes) as input."""

import glob
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def analyzer():
    import themescan

    return themescan.Analyzer(threads=2)


def project_texts(n, max_chars=600):
    """`n` texts written by the project (cut to `max_chars` at a word boundary), cycling."""
    texts = []
    for path in sorted(glob.glob(str(REPO / "training-data" / "themes" / "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                t = json.loads(line)["text"]
                if len(t) > max_chars:
                    t = t[:max_chars].rsplit(" ", 1)[0]
                texts.append(t)
    step = max(1, len(texts) // n)
    picked = texts[::step][:n]
    while len(picked) < n:
        picked.extend(texts[: n - len(picked)])
    return picked


def classify_tool():
    """The crate's `classify` example, built by `cargo build --release --examples`."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    path = Path(os.environ.get("THEMESCAN_CLASSIFY", target / "release" / "examples" / "classify"))
    if not path.exists():
        pytest.fail(f"{path} not found: run `cargo build --release --examples` first")
    return path


def classify_reference(records, tmp_path, threads=2):
    """Runs `classify` on `records` (dicts with id and text); returns its rows by id."""
    src = tmp_path / "in.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    out = subprocess.run(
        [str(classify_tool()), "--input", str(src), "--quiet", "--threads", str(threads)],
        check=True,
        capture_output=True,
        cwd=REPO,
    ).stdout.decode("utf-8")
    return {row["id"]: row for row in map(json.loads, out.splitlines())}


def assert_same_analysis(got, want, tol=1e-5):
    """Same labels and entities, theme and evidence scores within `tol`."""
    assert got["labels"] == want["labels"], (got["id"], got["labels"], want["labels"])
    assert [t["theme"] for t in got["themes"]] == [t["theme"] for t in want["themes"]]
    for a, b in zip(got["themes"], want["themes"]):
        assert abs(a["score"] - b["score"]) <= tol, (got["id"], a, b)
    assert [(e["text"], e["label"], e["start"], e["end"]) for e in got["entities"]] == [
        (e["text"], e["label"], e["start"], e["end"]) for e in want["entities"]
    ], got["id"]
    for a, b in zip(got["entities"], want["entities"]):
        assert abs(a["score"] - b["score"]) <= tol
    assert [(e["theme"], e["start"], e["end"]) for e in got["evidence"]] == [
        (e["theme"], e["start"], e["end"]) for e in want["evidence"]
    ], got["id"]
