"""Experiments on DVC's queue (`dvc exp run --queue`, `dvc queue start --jobs 2`), and the one
SQLite MLflow store they all log to: writers that arrive at once lose no run and no metric."""
import json
import os
import sqlite3
import subprocess
import sys
import time

from conftest import ROOT, copy_repo, sh

WRITER = """
import os, sys, time
sys.path.insert(0, {root!r})
from stages.tracking import log_run
import mlflow  # imported before the wait: the writers then start within milliseconds of each other
open(os.path.join({ready!r}, sys.argv[1]), "w").close()
while not os.path.exists({go!r}):
    time.sleep(0.001)
index = int(sys.argv[1])
log_run("clash", {{"writer": index}}, {{f"m{{k}}": float(index * 100 + k) for k in range(40)}}, [])
"""


def stored_runs(db_path):
    """{writer param: number of metrics} of every run in the store."""
    with sqlite3.connect(db_path) as db:
        rows = db.execute("select p.value, count(m.key) from runs r join params p on p.run_uuid = r.run_uuid "
                          "and p.key = 'writer' left join latest_metrics m on m.run_uuid = r.run_uuid "
                          "group by r.run_uuid").fetchall()
    return dict(rows)


def test_writers_that_start_at_once_on_a_new_store_lose_nothing(tmp_path):
    go, ready = tmp_path / "go", tmp_path / "ready"
    ready.mkdir()
    script = WRITER.format(root=str(ROOT), go=str(go), ready=str(ready))
    env = {**os.environ, "DVC_ROOT": str(tmp_path)}
    writers = [subprocess.Popen([sys.executable, "-c", script, str(i)], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(4)]
    deadline = time.monotonic() + 300
    while len(list(ready.iterdir())) < len(writers):  # every writer has imported mlflow and waits
        assert all(w.poll() is None for w in writers), "a writer ended before the start"
        assert time.monotonic() < deadline, "the writers did not get ready in 300 s"
        time.sleep(0.05)
    # the store does not exist yet: the first writers create it, its schema included
    assert not (tmp_path / "mlflow.db").exists()
    go.touch()
    for writer in writers:
        out, _ = writer.communicate(timeout=300)
        assert writer.returncode == 0, out[-3000:]
    assert stored_runs(tmp_path / "mlflow.db") == {str(i): 40 for i in range(4)}


def wait_for_queue(work, env, dvc, timeout_s=600):
    """Poll `dvc queue status` until no experiment is queued or running; returns its last output."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = sh(dvc + ["queue", "status"], work, env)
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"the queue did not drain in {timeout_s} s:\n{status}"
        time.sleep(2)


def test_two_queued_experiments_on_two_workers_each_log_their_run(tmp_path, reproduced):
    work, env, dvc = copy_repo(reproduced, tmp_path / "repo")
    sh(["git", "add", "-A"], work, env)  # an experiment starts from a commit
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], work, env)
    for ratio in (0.3, 0.4):
        sh(dvc + ["exp", "run", "--queue", "-n", f"ratio-{ratio}", "-S", f"compress.ratio={ratio}"], work, env)
    sh(dvc + ["queue", "start", "--jobs", "2"], work, env)
    try:
        status = wait_for_queue(work, env, dvc)
        logs = "" if status.count("Success") == 2 else "\n".join(
            subprocess.run(dvc + ["queue", "logs", name], cwd=work, env=env, capture_output=True, text=True).stdout
            for name in ("ratio-0.3", "ratio-0.4"))
        assert status.count("Success") == 2, f"{status}\n{logs[-4000:]}"
    finally:
        subprocess.run(dvc + ["queue", "stop"], cwd=work, env=env, capture_output=True)

    shown = json.loads(subprocess.run(dvc + ["exp", "show", "--json"], cwd=work, env=env, capture_output=True,
                                      text=True, check=True).stdout)
    experiments = {e["name"]: e for commit in shown for e in (commit.get("experiments") or [])}
    assert {"ratio-0.3", "ratio-0.4"} <= set(experiments), sorted(experiments)
    for name in ("ratio-0.3", "ratio-0.4"):
        revision = experiments[name]["revs"][0]["data"]
        ratio = revision["params"]["params.yaml"]["data"]["compress"]["ratio"]
        linears = revision["metrics"]["metrics/evaluate.json"]["data"]["ratio"]["linears"]
        assert abs(linears - ratio) < 0.03 and f"{ratio}" in name

    # each experiment's MLflow run, in the one store at the repository root (not the queue's copy)
    with sqlite3.connect(work / "mlflow.db") as db:
        runs = dict(db.execute("select t.value, count(m.key) from tags t join latest_metrics m "
                               "on m.run_uuid = t.run_uuid where t.key = 'dvc_exp_name' group by t.value"))
    assert set(runs) == {"ratio-0.3", "ratio-0.4"} and runs["ratio-0.3"] == runs["ratio-0.4"] > 0
