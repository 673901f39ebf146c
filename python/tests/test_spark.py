"""themescan.spark on a real standalone Spark cluster: a master and two one-core workers on
the loopback address, started with pyspark's own launcher (`bin/spark-class`) and Java from
the machine."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pyspark = pytest.importorskip("pyspark")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from conftest import REPO, assert_same_analysis, classify_reference, project_texts  # noqa: E402

SPARK_HOME = Path(pyspark.__file__).parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {seconds} s")


class Cluster:
    """A standalone master and `workers` workers of one core each, as child processes."""

    def __init__(self, root: Path, workers: int = 2):
        self.root = root
        self.env = dict(
            os.environ,
            SPARK_HOME=str(SPARK_HOME),
            SPARK_LOCAL_IP="127.0.0.1",
            SPARK_LOG_DIR=str(root / "logs"),
            PYSPARK_PYTHON=sys.executable,
            PYSPARK_DRIVER_PYTHON=sys.executable,
        )
        self.port = free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.procs = []
        self.worker_dirs = []
        try:
            self._start(workers)
        except BaseException:
            self.stop()
            raise

    def _start(self, workers):
        root = self.root
        self.procs.append(
            self._launch(
                "master",
                [
                    "org.apache.spark.deploy.master.Master",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--webui-port",
                    str(free_port()),
                ],
            )
        )
        wait_for(self._master_up, 60, "spark master")
        for k in range(workers):
            work = root / f"worker{k}"
            work.mkdir(parents=True)
            self.worker_dirs.append(work)
            self.procs.append(
                self._launch(
                    f"worker{k}",
                    [
                        "org.apache.spark.deploy.worker.Worker",
                        "--host",
                        "127.0.0.1",
                        "--cores",
                        "1",
                        "--memory",
                        "2g",
                        "--work-dir",
                        str(work),
                        "--webui-port",
                        str(free_port()),
                        self.url,
                    ],
                )
            )

    def _launch(self, name, args):
        log = open(self.root / f"{name}.log", "w")
        return subprocess.Popen(
            [str(SPARK_HOME / "bin" / "spark-class")] + args,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _master_up(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def executors(self):
        """PIDs of executor JVMs, by worker index (from /proc: `ps` would cut the long
        command lines)."""
        out = {}
        for pid, args in processes():
            if "CoarseGrainedExecutorBackend" not in args:
                continue
            try:
                cwd = os.path.realpath(f"/proc/{pid}/cwd")
            except OSError:
                continue
            for k, d in enumerate(self.worker_dirs):
                if cwd.startswith(os.path.realpath(d)):
                    out.setdefault(k, []).append(pid)
        return out

    def stop(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    from pyspark.sql import SparkSession

    root = tmp_path_factory.mktemp("spark")
    cluster = Cluster(root)
    session = None
    try:
        os.environ.update(
            SPARK_LOCAL_IP="127.0.0.1",
            PYSPARK_PYTHON=sys.executable,
            PYSPARK_DRIVER_PYTHON=sys.executable,
        )
        session = (
            SparkSession.builder.master(cluster.url)
            .appName("themescan-tests")
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.executor.cores", "1")
            .config("spark.executor.memory", "1500m")
            .config("spark.task.maxFailures", "4")
            .config("spark.sql.execution.arrow.maxRecordsPerBatch", "64")
            .config("spark.ui.enabled", "false")
            .getOrCreate()
        )
        session.sparkContext.setLogLevel("ERROR")
        # The driver counts itself among the block managers: three means both executors are up.
        wait_for(
            lambda: session.sparkContext._jsc.sc().getExecutorMemoryStatus().size() >= 3,
            120,
            "two executors",
        )
        yield session, cluster
    finally:
        if session is not None:
            session.stop()
        cluster.stop()


def records_with_bad_ones(n=5000, bad_share=0.05, seed=7):
    """`n` records, `bad_share` of them bad: null, empty or all-whitespace texts, and three
    huge ones (about 100 kB, analysed in segments: not errors, but partitions that take far
    longer than the rest)."""
    rng = random.Random(seed)
    texts = project_texts(n, max_chars=300)
    bad = sorted(rng.sample(range(n), int(n * bad_share)))
    huge = " ".join(project_texts(40, max_chars=2_500))
    kinds = {i: [None, "", "  \n\t "][k % 3] for k, i in enumerate(bad)}
    for i in bad[:3]:
        kinds[i] = huge
    records = [{"id": f"r{i:05d}", "text": kinds.get(i, texts[i])} for i in range(n)]
    return records, set(bad)


def test_classify_on_the_cluster_gives_one_row_per_record_as_classify_does(spark, tmp_path):
    session, _ = spark
    import themescan.spark

    records, bad = records_with_bad_ones()
    src = tmp_path / "in.parquet"
    pq.write_table(
        pa.table(
            {"id": [r["id"] for r in records], "text": [r["text"] for r in records]},
            schema=pa.schema([("id", pa.string()), ("text", pa.string())]),
        ),
        src,
        row_group_size=500,
    )
    df = session.read.parquet(str(src)).repartition(8)
    out_path = tmp_path / "out.parquet"
    started = time.perf_counter()
    themescan.spark.classify(df).write.parquet(str(out_path))
    spark_seconds = time.perf_counter() - started
    rows = pq.read_table(out_path).to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(records) and set(ids) == {r["id"] for r in records}

    good = [r for r in records if isinstance(r["text"], str) and r["text"].strip()]
    started = time.perf_counter()
    want = classify_reference(good, tmp_path, threads=2)
    classify_seconds = time.perf_counter() - started
    by_id = {r["id"]: r for r in rows}
    for r in records:
        row = by_id[r["id"]]
        if r["id"] in want:
            assert row["error"] is None, row
            assert_same_analysis(row, want[r["id"]])
        else:
            assert row["error"] and row["themes"] == [], row
    print(
        f"\n{len(records)} records: spark (2 workers x 1 core) {len(records) / spark_seconds:.1f} "
        f"records/s, classify on the good ones (2 threads) {len(good) / classify_seconds:.1f} records/s",
        file=sys.stderr,
    )


def test_a_killed_executor_loses_and_duplicates_nothing(spark, tmp_path):
    session, cluster = spark
    import themescan.spark

    n = 800
    texts = project_texts(n, max_chars=600)
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [f"k{i:05d}" for i in range(n)], "text": texts}), src)
    df = session.read.parquet(str(src)).repartition(8)
    out_path = tmp_path / "out.parquet"
    killed = []

    def kill_one_executor():
        # Wait until both executors are busy with Python workers, then kill one JVM.
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            pids = cluster.executors()
            if 0 in pids and 1 in pids and _has_python_children(pids[0][0]):
                time.sleep(3)
                os.kill(pids[0][0], signal.SIGKILL)
                killed.append(pids[0][0])
                return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_one_executor)
    killer.start()
    themescan.spark.classify(df).write.parquet(str(out_path))
    killer.join()
    assert killed, "no executor was running Python when the job ran"
    ids = [r["id"] for r in pq.read_table(out_path, columns=["id"]).to_pylist()]
    assert len(ids) == n, f"{len(ids)} rows for {n} records"
    assert set(ids) == {f"k{i:05d}" for i in range(n)}


def processes():
    """(pid, command line) of every process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        yield int(entry), args


def _has_python_children(pid):
    """Whether `pid` has a Python child (PySpark's worker daemon)."""
    for child, args in processes():
        try:
            with open(f"/proc/{child}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and "python" in args:
            return True
    return False


def test_binary_text_column_with_invalid_utf8_gives_error_rows(spark, tmp_path):
    session, _ = spark
    import themescan.spark

    good = "Interpol and Europol took down 300 propaganda channels of the Islamic State."
    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "text": pa.array([good.encode(), b"\xff\xfe broken", None], type=pa.binary()),
        }
    )
    src = tmp_path / "bin.parquet"
    pq.write_table(table, src)
    rows = {
        r["id"]: r
        for r in (
            themescan.spark.classify(session.read.parquet(str(src))).toArrow().to_pylist()
            if hasattr(pyspark.sql.DataFrame, "toArrow")
            else [r.asDict(recursive=True) for r in themescan.spark.classify(session.read.parquet(str(src))).collect()]
        )
    }
    assert rows["a"]["error"] is None and "takedown" in rows["a"]["labels"]
    assert "invalid UTF-8" in rows["b"]["error"]
    assert rows["c"]["error"]
