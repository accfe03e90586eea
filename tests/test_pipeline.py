"""`dvc repro` end to end on a tiny model, in a fresh git + DVC repository."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ROOT

STAGES = ["collect-calibration", "compute-covariances", "allocate-ranks", "truncate-and-update",
          "evaluate-dense", "evaluate"]


def sh(args, cwd, env):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def set_params(work, **changes):
    params = yaml.safe_load((work / "params.yaml").read_text())
    for path, value in changes.items():
        section, key = path.split("__") if "__" in path else (None, path)
        (params[section] if section else params)[key] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_repro_ratio_change_and_run_cache(tmp_path, tiny_model_dir):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, work / name)
    for name in ("stages", "svdcore", "data"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "PYTHONPATH": ""}
    dvc = [sys.executable, "-m", "dvc"]
    sh(["git", "init", "-q"], work, env)
    sh(dvc + ["init", "-q"], work, env)
    set_params(work, device="cpu", model__name=str(tiny_model_dir), calibration__samples=6,
               calibration__seqlen=32, covariances__batch_size=2, evaluate__seqlen=32,
               evaluate__max_windows=3, compress__ratio=0.2)

    first = sh(dvc + ["repro"], work, env)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first
    metrics_20 = json.loads((work / "metrics/evaluate.json").read_text())
    assert abs(metrics_20["ratio"]["linears"] - 0.2) < 0.02
    assert metrics_20["compressed"]["params_linears"] < metrics_20["dense"]["params_linears"]

    set_params(work, compress__ratio=0.4)
    second = sh(dvc + ["repro"], work, env)
    for stage in ("collect-calibration", "compute-covariances", "evaluate-dense"):
        assert f"Stage '{stage}' didn't change, skipping" in second
    for stage in ("allocate-ranks", "truncate-and-update", "evaluate"):
        assert f"Running stage '{stage}'" in second
    metrics_40 = json.loads((work / "metrics/evaluate.json").read_text())
    assert abs(metrics_40["ratio"]["linears"] - 0.4) < 0.02
    assert metrics_40["compressed"]["ppl"] != metrics_20["compressed"]["ppl"]
    assert metrics_40["dense"] == metrics_20["dense"]

    set_params(work, compress__ratio=0.2)
    third = sh(dvc + ["repro"], work, env)
    for stage in ("allocate-ranks", "truncate-and-update", "evaluate"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in third
    assert "Running stage" not in third
    assert json.loads((work / "metrics/evaluate.json").read_text()) == metrics_20

    # one MLflow run per evaluation actually executed, in the store at the repository root
    with sqlite3.connect(work / "mlflow.db") as db:
        runs = db.execute("select run_uuid from runs").fetchall()
        ratios = sorted(v for (v,) in db.execute("select value from params where key = 'compress.ratio'"))
    assert len(runs) == 2 and ratios == ["0.2", "0.4"]
