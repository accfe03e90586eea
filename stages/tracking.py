"""One MLflow run per evaluation, in a SQLite store at the repository root, and what a run
records of DVC (the repository root, the model's DVC hash). The stages' business: svdcore knows
nothing of DVC or MLflow.

mlflow is imported lazily: a stage that logs nothing does not pay for the import.
"""
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path


def repository_root() -> Path:
    """DVC_ROOT, which DVC sets for stage commands (for `dvc exp run --temp` and queued runs it
    names the parent repository, not the temporary copy), else the working directory."""
    return Path(os.environ.get("DVC_ROOT", os.getcwd())).resolve()


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_sha(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def output_md5(stage: str, path: str, lock: Path = Path("dvc.lock")) -> str:
    """The DVC hash of a stage's output as dvc.lock records it (a directory's ends in .dir): what
    `dvc checkout` brings back. DVC writes a stage's lock entry as soon as the stage finishes, so
    the stages after it can read it. "unknown" when the lock does not hold it."""
    import yaml

    try:
        outs = yaml.safe_load(lock.read_text())["stages"][stage]["outs"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "unknown"
    return next((o.get("md5", "unknown") for o in outs if o.get("path") == path), "unknown")


def numeric_metrics(tree: dict) -> dict:
    """The numbers of a nested dict, flattened (MLflow takes floats only)."""
    return {k: float(v) for k, v in flatten(tree).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@contextmanager
def opened_experiment(experiment: str):
    """Point MLflow at the store at the repository root and make `experiment` (created if new)
    the active one, holding the store's lock file (mlflow.db.lock) until the block ends; yields the
    tags every run carries (git sha, DVC experiment name). Processes that log at once (queued DVC
    experiments under `dvc queue start --jobs N`) take turns: SQLite has one writer at a time, and
    MLflow's set-up of a new store (its schema migrations) must not run twice at once."""
    import mlflow
    from filelock import FileLock

    root = repository_root()
    with FileLock(str(root / "mlflow.db.lock")):
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=(root / "mlartifacts").as_uri())
        mlflow.set_experiment(experiment)
        tags = {"git_sha": git_sha(root)}
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
        yield tags


def log_run(experiment: str, params: dict, metrics: dict, artifacts: list[str], tags: dict | None = None) -> str:
    """Log params, numeric metrics, artifact files and extra tags; return the run id."""
    import mlflow

    with opened_experiment(experiment) as common, mlflow.start_run(run_name=os.environ.get("DVC_EXP_NAME")) as run:
        mlflow.log_params({k: str(v) for k, v in flatten(params).items()})
        mlflow.log_metrics(numeric_metrics(metrics))
        mlflow.set_tags({**common, **(tags or {})})
        for path in artifacts:
            if Path(path).is_file():
                mlflow.log_artifact(path)
    return run.info.run_id
