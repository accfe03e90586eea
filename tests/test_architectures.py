"""Every stage on tiny models of five families, and the compressed model reloaded.

The stages run in-process (the same `run(name, work)` that `python -m stages.X` calls) in a
scratch directory, so each family costs seconds; the DVC plumbing itself is tested once, in
test_pipeline.py.
"""
import importlib
import json
import shutil

import pytest
import torch
import yaml

from conftest import ARCHITECTURES, ROOT, logits_in_fresh_process, tiny_causal_lm, tiny_tokenizer
from stages.pipeline import stage_modules
from svdcore.covariances import linear_shapes, save_layer
from svdcore.compress import collect_grams, compress_model
from svdcore.lowrank import LowRankLinear, load_compressed
from svdcore.model import decoder_layers, layer_linears, weight_matrix
from svdcore.ranks import uniform_ranks

CPU = torch.device("cpu")
STAGES = stage_modules()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def run_stages(work, params, first=None, last=None, skip=()):
    """Run the stages from `first` to `last` (default all) in order in `work`, but those in `skip`,
    as dvc repro would (same entry point, same files)."""
    from stages.common import run

    (work / "params.yaml").write_text(yaml.safe_dump(params))
    names = [name for name, _ in STAGES]
    start, stop = names.index(first or names[0]), names.index(last or names[-1])
    for name, module in STAGES[start:stop + 1]:
        if name not in skip:
            run(name, importlib.import_module(f"stages.{module}").work)


IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def families(tmp_path_factory, tokenizer):
    """Every family through every stage (`plain`), then the error-aware steps on a copy of it
    (`refined`); and the logits of both saved models of every family from one process that never
    imports svdcore (one process for all ten: its imports cost more than the models). A family
    whose stages fail keeps its exception, which its own test raises: the others still run."""
    root = tmp_path_factory.mktemp("families")
    runs = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("SVDCORE_DATA", str(ROOT / "data"))
        monkeypatch.delenv("DVC_ROOT", raising=False)
        for arch in ARCHITECTURES:
            try:
                runs[arch] = run_family(arch, root / arch, tokenizer, monkeypatch)
            except Exception as failure:  # noqa: BLE001  (raised again by the family's test)
                runs[arch] = failure
    ran = [run for run in runs.values() if isinstance(run, dict)]
    dirs = [run[which] / "models/compressed" for run in ran for which in ("plain", "refined")]
    logits = logits_in_fresh_process(dirs, IDS, root) if dirs else []
    for k, run in enumerate(ran):
        run["fresh"] = logits[2 * k:2 * k + 2]
    return runs


def run_family(arch, folder, tokenizer, monkeypatch) -> dict:
    model_dir = folder / "model"
    original = tiny_causal_lm(arch, len(tokenizer))
    original.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(device="cpu")
    params["model"]["name"] = str(model_dir)
    params["calibration"].update(samples=8, seqlen=32)
    params["covariances"]["batch_size"] = 4
    params["compress"]["ratio"] = 0.3
    params["evaluate"].update(seqlen=32, max_windows=4)
    # one task of each kind: shared context (piqa), shared continuation after two contexts (winogrande)
    params["zeroshot"].update(tasks=["piqa", "winogrande"], limit=2)
    params["generate"].update(prompts=["The history of"], max_new_tokens=4)
    plain, refined = folder / "plain", folder / "refined"
    plain.mkdir()
    monkeypatch.chdir(plain)
    run_stages(plain, params)

    # the error-aware steps on the same family: sensitivity allocation, anchored closed form, refinement
    # (the dense model's evaluation is the same as above, and quantize is off)
    shutil.copytree(plain, refined)
    monkeypatch.chdir(refined)
    params["compress"].update(method="aa-svd", allocation="sensitivity", refine={**params["compress"]["refine"], "steps": 2})
    run_stages(refined, params, first="compute-sensitivity", skip=("evaluate-dense", "quantize"))
    return {"original": original, "plain": plain, "refined": refined}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_stage_and_reload(arch, families):
    run = families[arch]
    if isinstance(run, Exception):
        raise run
    work, original = run["plain"], run["original"]
    metrics = json.loads((work / "metrics/evaluate.json").read_text())
    assert abs(metrics["ratio"]["linears"] - 0.3) < 0.03
    for ppl in [*metrics["compressed"]["ppl"].values(), *metrics["dense"]["ppl"].values()]:
        assert 1 < ppl < float("inf")
    for model in ("dense", "compressed"):  # lm-eval runs every family in memory
        assert {t: s["items"] for t, s in metrics[model]["zeroshot"]["tasks"].items()} == {"piqa": 2, "winogrande": 2}
    samples = json.loads((work / "metrics/samples.json").read_text())["samples"]
    assert [s["prompt"] for s in samples] == ["The history of"] and {"dense", "compressed"} <= set(samples[0])
    compressed = load_compressed(work / "models/compressed")
    ranks = json.loads((work / "artifacts/ranks.json").read_text())["ranks"]
    low = {n: m.rank for n, m in compressed.named_modules() if isinstance(m, LowRankLinear)}
    assert low == {n: r for n, r in ranks.items() if r is not None} and low

    # nothing outside the decoder linears changed: embeddings (tied or not), norms, positions, head
    dense_state = original.state_dict()
    for name, tensor in compressed.state_dict().items():
        factor = name.rpartition(".")[0]  # ...q_proj.expand for ...q_proj.expand.weight
        if factor.rpartition(".")[0] not in low:
            assert torch.equal(tensor, dense_state[name]), name
    tied = original.get_output_embeddings().weight is original.get_input_embeddings().weight
    assert (compressed.get_output_embeddings().weight is compressed.get_input_embeddings().weight) == tied

    refined = run["refined"]
    report = json.loads((refined / "metrics/compress.json").read_text())
    assert report["recipe"]["anchor"] == 1.0 and report["refine"] and len(report["stream_gap"]) == 2
    assert json.loads((refined / "artifacts/ranks.json").read_text())["strategy"] == "sensitivity"
    metrics = json.loads((refined / "metrics/evaluate.json").read_text())
    assert abs(metrics["ratio"]["linears"] - 0.3) < 0.03 and all(1 < p < float("inf") for p in metrics["compressed"]["ppl"].values())

    # both saved directories load in a process that never imports svdcore, with the same logits
    with torch.no_grad():
        expected = [compressed(IDS).logits, load_compressed(refined / "models/compressed")(IDS).logits]
    for got, want in zip(run["fresh"], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_refinement_that_turns_non_finite_stops_the_stage_and_writes_nothing(tmp_path, monkeypatch, tokenizer,
                                                                              capsys):
    """Fault injection: the refinement loss of a block comes out NaN. The stage stops with one
    line naming the layer, exit status 2, and the previous compressed model is left as it was."""
    import svdcore.refine

    work = tmp_path / "work"
    model_dir = tmp_path / "model"
    tiny_causal_lm("llama", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(device="cpu")
    params["model"]["name"] = str(model_dir)
    params["calibration"].update(samples=8, seqlen=32)
    params["compress"].update(method="aa-svd", refine={**params["compress"]["refine"], "steps": 2})
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("SVDCORE_DATA", str(ROOT / "data"))
    run_stages(work, params, last="truncate-and-update")
    before = sorted((p.name, p.read_bytes()) for p in (work / "models/compressed").iterdir())
    real = svdcore.refine.F.mse_loss
    monkeypatch.setattr(svdcore.refine.F, "mse_loss", lambda a, b: real(a, b) * float("nan"))
    with pytest.raises(SystemExit) as stop:
        run_stages(work, params, first="truncate-and-update", last="truncate-and-update")
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: layer 0: the block refinement loss became nan at step 1; lower compress.refine.lr")
    assert sorted((p.name, p.read_bytes()) for p in (work / "models/compressed").iterdir()) == before
    assert not list((work / "models").glob(".*.tmp"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layer0_output_error_is_the_dropped_whitened_spectrum(arch, tmp_path):
    """||(W - A B) X||_F^2 = sum of the dropped σ_i^2(W S) for every linear of layer 0, whatever
    the family stores (a transposed Conv1D weight read the wrong way round would break this)."""
    model = tiny_causal_lm(arch)
    windows = torch.randint(0, 320, (6, 24), generator=torch.Generator().manual_seed(2))
    layer0 = decoder_layers(model)[0]
    inputs, originals, hooks = {}, {}, []
    for name, module in layer_linears(layer0).items():
        originals[name] = weight_matrix(module).detach().double().clone()
        hooks.append(module.register_forward_pre_hook(lambda m, args, name=name: inputs.update({name: args[0]})))
    with torch.no_grad():
        model(windows)
    for hook in hooks:
        hook.remove()
    stats = tmp_path / "stats"
    stats.mkdir()
    collect_grams(model, windows, 3, CPU, lambda i, st: save_layer(stats, i, st))
    ranks = uniform_ranks(linear_shapes(model), 0.4)
    compress_model(model, ranks, "svd-llm", stats, CPU)
    prefix = next(n for n in ranks if ".0." in n).rsplit(".0.", 1)[0]
    checked = 0
    for name, x in inputs.items():
        rank = ranks[f"{prefix}.0.{name}"]
        low = model.get_submodule(f"{prefix}.0.{name}")
        x = x.reshape(-1, x.shape[-1]).double()
        weight = originals[name]
        approx = low.A.double() @ low.B.double()
        error = ((weight - approx) @ x.T).square().sum()
        white = torch.linalg.cholesky(x.T @ x + 1e-9 * torch.eye(x.shape[1], dtype=torch.float64))
        dropped = torch.linalg.svdvals(weight @ white)[rank:].square().sum()
        torch.testing.assert_close(error, dropped, rtol=1e-4, atol=1e-8 * weight.square().sum().item())
        checked += 1
    assert checked == len(layer_linears(decoder_layers(tiny_causal_lm(arch))[0]))
