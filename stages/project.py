"""A scratch copy of this DVC project (pipelines, code, data) in a fresh git + DVC repository:
where bench.ratio_change measures what a change reruns, and where the tests run `dvc repro`.
No stage imports it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from stages.pipeline import ROOT


def run(args, cwd, env):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def project_env() -> tuple[dict, list[str]]:
    """The environment a scratch project's commands run in, and the dvc command."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "PYTHONPATH": ""}
    return env, [sys.executable, "-m", "dvc"]


def scratch_project(work: Path) -> tuple[dict, list[str]]:
    """A fresh git + DVC repository holding the project (pipeline, code, data) in `work`.
    Returns the environment for subprocesses and the dvc command."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, work / name)
    for name in ("stages", "svdcore", "data"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    (work / "sweep").mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / "sweep" / name, work / "sweep" / name)
    env, dvc = project_env()
    run(["git", "init", "-q"], work, env)
    run(dvc + ["init", "-q"], work, env)
    return env, dvc


def set_params(work: Path, changes: dict) -> None:
    """changes: {"compress.ratio": 0.4, ...} written into work/params.yaml."""
    params = yaml.safe_load((work / "params.yaml").read_text())
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
