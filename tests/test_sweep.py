"""The sweep pipeline (sweep/dvc.yaml) end to end on a tiny model: each point's model compressed
once, its perplexity and zero-shot scores, report, MLflow runs; adding a ratio reruns only the new
points, and a new zero-shot limit only the zero-shot stages, which compress nothing."""
import json

import pytest
import yaml

from conftest import ROOT, copy_repo, set_params, sh
from svdcore.methods import recipe
from stages.sweep_tables import dvc_plots_definition



def set_sweep(work, **changes):
    path = work / "sweep/params.yaml"
    sweep = yaml.safe_load(path.read_text())
    sweep.update(changes)
    path.write_text(yaml.safe_dump(sweep))


def test_sweep_runs_every_point_once_and_reports_them(tmp_path, reproduced):
    import mlflow

    work, env, dvc = copy_repo(reproduced, tmp_path / "repo")
    set_sweep(work, methods=["fwsvd", "svd-llm-v2", "ressvd", "best"], ratios=[0.2], zeroshot_methods=["fwsvd", "ressvd"])
    set_params(work, compress__refine__steps=2)  # the sweep takes each preset's own steps: this must not matter
    first = sh(dvc + ["repro", "sweep/dvc.yaml"], work, env)
    assert "Stage 'compute-covariances' didn't change, skipping" in first  # the main pipeline's statistics
    assert "Stage 'evaluate'" not in first  # the compressed model of the main pipeline is not in the sweep's graph
    assert first.count("Running stage 'sweep/dvc.yaml:compress@") == 4
    assert first.count("Running stage 'sweep/dvc.yaml:point@") == 4
    assert first.count("Running stage 'sweep/dvc.yaml:zeroshot@") == 2
    points = {p.name: json.loads(p.read_text()) for p in (work / "sweep/points").glob("*.json")}
    assert sorted(points) == ["best@0.2.json", "fwsvd@0.2.json", "ressvd@0.2.json", "svd-llm-v2@0.2.json"]
    for name, p in points.items():
        assert abs(p["ratio_achieved"]["linears"] - p["ratio"]) < 0.03, name
        assert set(p["ppl"]) == {"wikitext2", "ptb"} and p["evaluate_s"] > 0
        timings = json.loads((work / "sweep/timings/compress" / name).read_text())
        assert 0 < timings["compress_s"] < timings["wall_s"], name
    # each point's model is saved as the main pipeline saves its own: config, card, the description
    model_dir = work / "sweep/models/ressvd@0.2"
    assert json.loads((model_dir / "config.json").read_text())["svdcore"]["method"] == "ressvd"
    assert "ressvd, ratio 0.2" in (model_dir / "README.md").read_text()
    assert json.loads((model_dir / "compress.json").read_text())["report"]["route_counts"]
    assert points["ressvd@0.2.json"]["last_layers"] == 2  # the rule on 2 layers: three quarters, rounded up
    assert points["fwsvd@0.2.json"]["recipe"]["metric"] == "fisher"
    assert points["svd-llm-v2@0.2.json"]["recipe"]["allocation"] == "v2"
    assert points["best@0.2.json"]["recipe"] == recipe("best").describe()  # the preset's knobs, not params.yaml's
    scored = json.loads((work / "sweep/zeroshot/ressvd@0.2.json").read_text())
    assert scored["zeroshot"]["limit"] == 2 and list(scored["zeroshot"]["tasks"]) == ["piqa"]
    assert scored["ratio_achieved"] == points["ressvd@0.2.json"]["ratio_achieved"]  # the same compression
    table = (work / "sweep/results/table.md").read_text()
    assert all(m in table for m in ("fwsvd", "svd-llm-v2", "ressvd", "best"))
    assert "zero-shot accuracy, mean of 1 task:" in table and "first 2 items" in table
    assert (work / "sweep/results/ratio_ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((work / "sweep/results/summary.json").read_text())
    assert summary["points"] == 4 and summary["each_point_from_scratch_s"] > summary["sweep_s"] > 0
    shown = sh(dvc + ["plots", "show", "--json"], work, env)
    assert "sweep-wikitext2" in shown and "svd-llm-v2.csv" in shown

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["svdcore-sweep"])
    parents = runs[runs["tags.mlflow.runName"] == "sweep"]
    assert len(parents) == 1 and len(runs) == 5
    assert set(runs["tags.mlflow.parentRunId"].dropna()) == {parents["run_id"].iloc[0]}
    assert runs["metrics.zeroshot.mean.acc"].notna().sum() == 2  # the children scored zero-shot

    # a new ratio and a new zero-shot limit, on one method (each point is its own stage: the other
    # methods' new points would only repeat what this one shows, at six seconds a stage)
    set_sweep(work, methods=["ressvd"], ratios=[0.2, 0.4], zeroshot_methods=["ressvd"])
    set_params(work, zeroshot__limit=1)
    second = sh(dvc + ["repro", "sweep/dvc.yaml"], work, env)
    assert second.count("Running stage 'sweep/dvc.yaml:compress@") == 1  # the new ratio's point alone
    assert second.count("Running stage 'sweep/dvc.yaml:point@") == 1
    assert "Running stage 'sweep/dvc.yaml:point@ressvd-0.4'" in second
    assert second.count("Running stage 'sweep/dvc.yaml:zeroshot@") == 2  # the new limit: every zero-shot stage
    assert "Running stage 'sweep/dvc.yaml:compress@ressvd-0.2'" not in second  # scored on the saved model
    assert "Running stage 'evaluate-dense'" in second  # and the dense scores, which the report checks
    assert "first 1 items" in (work / "sweep/results/table.md").read_text()
    assert "Running stage 'sweep/dvc.yaml:report'" in second
    assert "Running stage 'sweep/dvc.yaml:fisher'" not in second
    assert "Running stage 'sweep/dvc.yaml:sensitivity'" not in second
    assert "Running stage 'compute-covariances'" not in second


def test_sweep_plots_name_every_method_of_the_sweep_params():
    sweep = yaml.safe_load((ROOT / "sweep/params.yaml").read_text())
    datasets = yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"]["datasets"]
    defined = yaml.safe_load((ROOT / "sweep/dvc.yaml").read_text())["plots"]
    assert defined == dvc_plots_definition(sweep["methods"], datasets, "plots")


def test_sweep_params_are_checked():
    from svdcore.errors import UserError
    from stages.sweep_params import validate_sweep

    sweep = yaml.safe_load((ROOT / "sweep/params.yaml").read_text())
    validate_sweep(sweep)  # the shipped file
    with pytest.raises(UserError, match=r"zeroshot_methods must be some of methods .*\['ressvd'\]"):
        validate_sweep({**sweep, "methods": ["svd", "svd-llm"], "zeroshot_methods": ["svd-llm", "ressvd"]})
    with pytest.raises(UserError, match="must not repeat"):
        validate_sweep({**sweep, "ratios": [0.2, 0.2]})
    with pytest.raises(UserError, match="zeroshot_methods"):
        validate_sweep({k: v for k, v in sweep.items() if k != "zeroshot_methods"})
