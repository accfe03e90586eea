"""`dvc repro` end to end on a tiny model, in a fresh git + DVC repository (conftest.reproduced),
then in copies of it: ratio changes, the run-cache, MLflow runs, the method-gated stages."""
import json
import sqlite3

from conftest import copy_repo, set_params, sh
from stages.pipeline import stage_modules

UPSTREAM = ("collect-calibration", "compute-covariances", "compute-spectra", "compute-fisher")


def mlflow_runs(work):
    """(run ids, the compress.ratio each run logged) of the MLflow store at the root of `work`."""
    with sqlite3.connect(work / "mlflow.db") as db:
        runs = db.execute("select run_uuid from runs").fetchall()
        ratios = sorted(v for (v,) in db.execute("select value from params where key = 'compress.ratio'"))
    return runs, ratios


def test_repro_ratio_change_and_run_cache(tmp_path, reproduced):
    original, first = reproduced  # a first `dvc repro` in a fresh repository: every stage ran
    for stage, _ in stage_modules():
        assert f"Running stage '{stage}'" in first
    runs, ratios = mlflow_runs(original)
    assert len(runs) == 1 and ratios == ["0.2"]  # one MLflow run, of that evaluation
    assert len(list(original.glob("mlartifacts/*/artifacts/samples.json"))) == 1
    work, env, dvc = copy_repo(reproduced, tmp_path / "repo")
    metrics_20 = json.loads((work / "metrics/evaluate.json").read_text())
    assert abs(metrics_20["ratio"]["linears"] - 0.2) < 0.02
    assert metrics_20["compressed"]["params_linears"] < metrics_20["dense"]["params_linears"]
    for model in ("dense", "compressed"):  # zero-shot scores of both, on the first 2 items of the task asked for
        zeroshot = metrics_20[model]["zeroshot"]
        assert zeroshot["limit"] == 2 and list(zeroshot["tasks"]) == ["piqa"]
        assert all(s["items"] == 2 for s in zeroshot["tasks"].values()) and 0 <= zeroshot["mean"]["acc"] <= 1
    samples = json.loads((work / "metrics/samples.json").read_text())
    assert samples["max_new_tokens"] == 6 and len(samples["samples"]) == 4
    assert all({"prompt", "dense", "compressed"} == set(s) for s in samples["samples"])

    set_params(work, compress__ratio=0.4)
    second = sh(dvc + ["repro"], work, env)
    for stage in (*UPSTREAM, "compute-sensitivity", "evaluate-dense"):
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

    # one MLflow run per evaluation actually executed (here only the one at 0.4; the run at 0.2 went to
    # the original's store), in the store at the repository root
    runs, ratios = mlflow_runs(work)
    assert len(runs) == 1 and ratios == ["0.4"]
    with sqlite3.connect(work / "mlflow.db") as db:
        runs_per_metric = dict(db.execute("select key, count(*) from metrics group by key").fetchall())
    # zero-shot scores of both models in the run, and the generation samples beside them
    assert runs_per_metric["compressed.zeroshot.mean.acc"] == runs_per_metric["dense.zeroshot.tasks.piqa.acc"] == 1
    assert len(list(work.glob("mlartifacts/*/artifacts/samples.json"))) == 1


def test_zeroshot_limit_reruns_only_the_evaluations(tmp_path, reproduced):
    # the zero-shot protocol feeds both evaluations, and nothing before them
    work, env, dvc = copy_repo(reproduced, tmp_path / "repo")
    metrics_20 = json.loads((work / "metrics/evaluate.json").read_text())
    set_params(work, zeroshot__limit=3)
    fourth = sh(dvc + ["repro"], work, env)
    for stage in (*UPSTREAM, "compute-sensitivity", "allocate-ranks", "truncate-and-update"):
        assert f"Stage '{stage}' didn't change, skipping" in fourth
    for stage in ("evaluate-dense", "evaluate"):
        assert f"Running stage '{stage}'" in fourth
    metrics_limit_3 = json.loads((work / "metrics/evaluate.json").read_text())
    assert all(s["items"] == 3 for s in metrics_limit_3["dense"]["zeroshot"]["tasks"].values())
    assert metrics_limit_3["compressed"]["ppl"] == metrics_20["compressed"]["ppl"]


def test_sensitivity_measures_once_and_a_ratio_change_reruns_its_solve(tmp_path, reproduced):
    # the sensitivity allocation measures once; a ratio change reruns its solve and what follows
    work, env, dvc = copy_repo(reproduced, tmp_path / "repo")
    set_params(work, compress__allocation="sensitivity")
    fifth = sh(dvc + ["repro"], work, env)
    for stage in ("compute-sensitivity", "allocate-ranks", "truncate-and-update", "evaluate"):
        assert f"Running stage '{stage}'" in fifth
    ranks = json.loads((work / "artifacts/ranks.json").read_text())
    assert ranks["strategy"] == "sensitivity" and abs(ranks["linear_ratio"] - 0.2) < 0.02
    assert ranks["solve"]["mip_gap"] <= 1e-6 and ranks["solve"]["predicted_kl"] > 0
    set_params(work, compress__ratio=0.4)  # up to the solve: what follows it is test_repro_ratio_change's
    sixth = sh(dvc + ["repro", "allocate-ranks"], work, env)
    for stage in ("collect-calibration", "compute-covariances", "compute-spectra", "compute-sensitivity"):
        assert f"Stage '{stage}' didn't change, skipping" in sixth
    assert "Running stage 'allocate-ranks'" in sixth
    assert abs(json.loads((work / "artifacts/ranks.json").read_text())["linear_ratio"] - 0.4) < 0.02


def test_anchored_refined_method_reruns_from_the_gated_stages(tmp_path, reproduced):
    # the anchored, refined method streams the windows through truncate-and-update alone (the two
    # method-gated stages rerun on a method change, to write their empty files)
    work, env, dvc = copy_repo(reproduced, tmp_path / "repo")
    set_params(work, compress__method="aa-svd", compress__allocation=None, compress__refine__steps=4,
               compress__ratio=0.4)
    seventh = sh(dvc + ["repro"], work, env)
    for stage in ("collect-calibration", "compute-covariances", "compute-spectra", "evaluate-dense"):
        assert f"Stage '{stage}' didn't change, skipping" in seventh
    report = json.loads((work / "metrics/compress.json").read_text())
    assert report["recipe"]["anchor"] is not None and report["recipe"]["refine_steps"] == 4
    assert sorted(report["refine"]) == ["0", "1"] and sorted(report["stream_gap"]) == ["0", "1"]
    assert abs(json.loads((work / "metrics/evaluate.json").read_text())["ratio"]["linears"] - 0.4) < 0.02
