"""Bad input: one clear line naming the parameter, exit status 2, no output written."""
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import DEFAULTS, ROOT, with_value
from svdcore import params as params_module
from svdcore.atomic import atomic_path
from svdcore.data import load_text
from svdcore.errors import UserError
from svdcore.model import resolve

def test_shipped_params_are_valid():
    params_module.validate(DEFAULTS)


def test_empty_task_and_prompt_lists_switch_zeroshot_and_samples_off():
    params = with_value("zeroshot.tasks", [])
    params["generate"]["prompts"] = []
    params_module.validate(params)


@pytest.mark.parametrize("path,value,message", [
    ("compress.ratio", 1.0, r"compress.ratio: expected a number in \[0, 1\)"),
    ("compress.ratio", -0.1, r"compress.ratio: expected a number in \[0, 1\)"),
    ("compress.ratio", "0.2", r"compress.ratio: expected a number"),
    ("compress.ratio", True, r"compress.ratio: expected a number"),
    ("compress.method", "asvdd", r"compress.method: expected one of svd, fwsvd, asvd, svd-llm, svd-llm-v2, ressvd, aa-svd, best, "
                                    r"got 'asvdd'"),
    ("compress.typo", 1, r"compress.typo: unknown key; allowed here: ratio, method, metric, alpha, update"),
    ("compress.metric", "fishr", r"compress.metric: expected one of plain, fisher, activation, whitening, "
                                 r"eigen-whitening, got 'fishr' \(or null for the method's own\)"),
    ("compress.allocation", "greedy", r"compress.allocation: expected one of uniform, v2, last-k, sensitivity, got 'greedy' "
                                      r"\(or null for the method's own\)"),
    ("compress.residual_fraction", 1, r"compress.residual_fraction: expected a number in \[0, 1\) \(the share of "
                                      r"each rank given to the first stage\), got 1"),
    ("compress.residual_metric", "svd", r"compress.residual_metric: expected one of plain, fisher"),
    ("compress.last_layers", 0, r"compress.last_layers: expected an integer >= 1, got 0 \(or null for the rule"),
    ("compress.alpha", 0, r"compress.alpha: expected a number in \(0, 1\] \(the exponent of mean \|x\|\), got 0"),
    ("compress.alpha", 1.5, r"compress.alpha: expected a number in \(0, 1\]"),
    ("compress.update", "yes", r"compress.update: expected true or false, got 'yes'"),
    ("compress.route", "qr", r"compress.route: expected one of auto, svd, eigh-out, eigh-in, got 'qr'"),
    ("compress.rank_multiple", 0, r"compress.rank_multiple: expected an integer >= 1, got 0"),
    ("compress.anchor", 1.5, r"compress.anchor: expected null \(the method's own\), false \(off: the dense model's "
                             r"statistics\) or a blend beta in \[0, 1\] .*, got 1.5"),
    ("compress.anchor", True, r"compress.anchor: expected null .*, got True"),
    ("compress.anchor", "auto", r"compress.anchor: expected null .*, got 'auto'"),
    ("compress.anchor_ridge", -0.01, r"compress.anchor_ridge: expected a number in \[0, 1\] \(the anchored fit's "
                                     r"ridge, a share of mean\(diag G~\)\), got -0.01 \(or null for the method's own\)"),
    ("compress.anchor_ridge", "0.01", r"compress.anchor_ridge: expected a number in \[0, 1\] .*, got '0.01'"),
    ("compress.refine.steps", -1, r"compress.refine.steps: expected an integer >= 0, got -1 \(or null for the method's own\)"),
    ("compress.refine.steps", 2.5, r"compress.refine.steps: expected an integer, got 2.5"),
    ("compress.refine.lr", 0, r"compress.refine.lr: expected a learning rate in \(0, 1\], got 0"),
    ("compress.refine.lr", "2e-4", r"compress.refine.lr: expected a learning rate in \(0, 1\], got '2e-4' \(YAML reads"),
    ("compress.refine.holdout", 0.6, r"compress.refine.holdout: expected a share of the calibration windows in "
                                     r"\[0, 0.5\]"),
    ("compress.refine.typo", 1, r"compress.refine.typo: unknown key; allowed here: steps, lr, holdout"),
    ("compress.refine", KeyError, r"compress.refine: missing from params.yaml"),
    ("distributed.nproc_per_node", 0, r"distributed.nproc_per_node: expected an integer >= 1, got 0"),
    ("distributed.rdzv_endpoint", "node0", r"distributed.rdzv_endpoint: expected host:port of the rendezvous "
                                           r"\(localhost:0: a free port, one machine\), got 'node0'"),
    ("distributed", KeyError, r"distributed: missing from params.yaml"),
    ("sensitivity.samples", 0, r"sensitivity.samples: expected an integer >= 1, got 0"),
    ("sensitivity.seed", -1, r"sensitivity.seed: expected an integer >= 0, got -1"),
    ("covariances.offload_activations", 1, r"covariances.offload_activations: expected true or false, got 1"),
    ("calibration.samples", 0, r"calibration.samples: expected an integer >= 1, got 0"),
    ("calibration.seqlen", 12.5, r"calibration.seqlen: expected an integer, got 12.5"),
    ("calibration.seed", KeyError, r"calibration.seed: missing from params.yaml"),
    ("device", "tpu", r"device: expected auto, cpu, cuda or cuda:N"),
    ("evaluate.datasets", [], r"evaluate.datasets: expected a non-empty list"),
    ("model.dtype", "float8", r"model.dtype: expected one of auto, float32, bfloat16, float16"),
    ("model.load", "lazy", r"model.load: expected one of whole, by-layer, got 'lazy'"),
    ("evaluate.device_map", "gpu", r"evaluate.device_map: expected one of none, auto, got 'gpu'"),
    ("evaluate.max_memory", {"gpu0": "1GiB"}, r"evaluate.max_memory: expected a mapping of cpu or cuda:N to a size "
                                              r"such as 70GiB or 500MB \(\{\}: what is free\), got 'gpu0'$"),
    ("evaluate.max_memory", {"cpu": "2TB"}, r"evaluate.max_memory: expected a mapping .*, got '2TB'$"),
    ("zeroshot.tasks", ["piqa", "boolq"], r"zeroshot.tasks: unknown task 'boolq'; expected some of piqa, arc_easy, "
                                          r"arc_challenge, hellaswag, winogrande, openbookqa, mathqa"),
    ("zeroshot.tasks", "piqa", r"zeroshot.tasks: expected a list of task names \(piqa, .*\), or \[\] for none, "
                               r"got 'piqa'"),
    ("zeroshot.tasks", ["piqa", "piqa"], r"zeroshot.tasks: each task at most once"),
    ("zeroshot.limit", -1, r"zeroshot.limit: expected an integer >= 0, got -1"),
    ("zeroshot.limit", 0.5, r"zeroshot.limit: expected an integer, got 0.5"),
    ("zeroshot.batch_size", 0, r"zeroshot.batch_size: expected an integer >= 1, got 0"),
    ("zeroshot.typo", 1, r"zeroshot.typo: unknown key; allowed here: tasks, limit, batch_size"),
    ("generate.prompts", ["ok", " "], r"generate.prompts: expected a list of non-empty prompt strings"),
    ("generate.prompts", "Once upon a time", r"generate.prompts: expected a list"),
    ("generate.max_new_tokens", 0, r"generate.max_new_tokens: expected an integer >= 1, got 0"),
    ("generate", KeyError, r"generate: missing from params.yaml"),
])
def test_bad_values_name_key_value_and_what_is_allowed(path, value, message):
    with pytest.raises(UserError, match=message):
        params_module.validate(with_value(path, value))


def test_missing_model_files_are_named(tmp_path):
    with pytest.raises(UserError, match="GGUF file .*nothing.gguf does not exist"):
        resolve(str(tmp_path / "nothing.gguf"))
    with pytest.raises(UserError, match="has no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(UserError, match="neither a model directory"):
        resolve(str(tmp_path / "missing-dir"))


def test_missing_data_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDCORE_DATA", str(tmp_path))
    with pytest.raises(UserError, match=r"dataset 'ptb': data file .*ptb.test.txt is missing"):
        load_text("ptb")
    with pytest.raises(UserError, match="not a built-in name"):
        load_text("no-such-dataset")


def test_atomic_path_leaves_previous_output_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "a").write_text("complete")
    with pytest.raises(RuntimeError):
        with atomic_path(target, is_dir=True) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (target / "a").read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind


def run_stage(tmp_path, module, params):
    work = tmp_path / "work"
    if not work.exists():
        work.mkdir()
        shutil.copytree(ROOT / "stages", work / "stages")
        shutil.copytree(ROOT / "svdcore", work / "svdcore")
        for pipeline in ("dvc.yaml", "sweep/dvc.yaml"):
            (work / pipeline).parent.mkdir(exist_ok=True)
            shutil.copy(ROOT / pipeline, work / pipeline)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return work, subprocess.run([sys.executable, "-m", module], cwd=work, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": ""})


@pytest.mark.parametrize("path,value,key", [("compress.ratio", 1.5, "compress.ratio"),
                                            ("compress.method", "magic", "compress.method")])
def test_stage_reports_user_error_in_one_line(tmp_path, path, value, key):
    work, done = run_stage(tmp_path, "stages.allocate_ranks", with_value(path, value))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith(f"error: {key}:"), done.stderr
    assert "Traceback" not in done.stderr
    assert not (work / "artifacts").exists()


def test_stage_names_missing_artifact(tmp_path):
    work, done = run_stage(tmp_path, "stages.allocate_ranks", DEFAULTS)
    assert done.returncode == 2
    # the library names the artifact; the stage adds, from dvc.yaml, which stage rebuilds it
    assert done.stderr == ("error: linear shapes: file artifacts/linears.json is missing; "
                           "rerun compute-covariances (dvc repro)\n"), done.stderr
    assert not (work / "artifacts" / "ranks.json").exists()


def test_the_stage_that_rebuilds_an_artifact_is_read_from_the_pipelines(monkeypatch, tmp_path):
    from stages.common import rebuild_hint

    monkeypatch.chdir(ROOT)
    assert rebuild_hint("artifacts/stats/layer_003.safetensors") == "; rerun compute-covariances (dvc repro)"
    assert rebuild_hint("metrics/dense.json") == "; rerun evaluate-dense (dvc repro)"
    assert rebuild_hint("models/compressed") == "; rerun truncate-and-update (dvc repro)"
    # a matrix stage's templated output, named as DVC names the stage, in the sweep's pipeline
    assert rebuild_hint("sweep/models/best@0.2/compress.json") == \
        "; rerun compress@best-0.2 (dvc repro sweep/dvc.yaml)"
    assert rebuild_hint("sweep/artifacts/fisher.safetensors") == "; rerun fisher (dvc repro sweep/dvc.yaml)"
    assert rebuild_hint("somewhere/else.json") == "" and rebuild_hint(None) == ""
    monkeypatch.chdir(tmp_path)  # elsewhere, the project's own pipelines still answer for its files
    assert rebuild_hint(str(ROOT / "metrics/dense.json")) == "; rerun evaluate-dense (dvc repro)"
    assert rebuild_hint("metrics/dense.json") == ""


def test_a_misspelt_or_non_text_key_is_named_as_unknown():
    params = with_value("compress.ratio", KeyError)
    params["compress"]["ratoi"] = 0.2  # reported as the unknown key, not as a missing ratio
    with pytest.raises(UserError, match=r"^compress.ratoi: unknown key; allowed here: ratio, method"):
        params_module.validate(params)
    params = with_value("device", "cpu")
    params["compress"][1] = 2  # YAML reads `1:` (and `on:`, `null:`) as keys that are not text
    with pytest.raises(UserError, match=r"^compress.1: unknown key; allowed here: ratio, method"):
        params_module.validate(params)
