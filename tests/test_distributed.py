"""compute-covariances and truncate-and-update data-parallel under torchrun: 2 processes on gloo
give the statistics and the compressed model of 1 process (each streams its half of every batch;
a layer's statistics are summed, its factorizations split and the refinement's gradients averaged
over the processes), and rank 0 alone writes."""
import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, DEFAULTS
from stages.pipeline import stage_modules
from svdcore.compress import compress_model
from svdcore.covariances import linear_shapes, load_layer
from svdcore.checkpoint import open_compressed
from svdcore.lowrank import LowRankLinear, low_rank_ranks
from svdcore.model import load_model
from svdcore.ranks import uniform_ranks

CPU = torch.device("cpu")


def stage(work, module, check=True) -> subprocess.CompletedProcess:
    """`python -m stages.<module>` in `work`, as dvc repro runs it (check: it must succeed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SVDCORE_DATA": str(ROOT / "data")}
    env.pop("TORCHELASTIC_RUN_ID", None)
    done = subprocess.run([sys.executable, "-m", f"stages.{module}"], cwd=work, env=env, capture_output=True, text=True)
    assert not check or done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def in_process(work, module) -> None:
    """What `python -m stages.<module>` does with one process (the same work function, the same
    files), run in this one: a new process's imports cost more than the tiny model's work. The runs
    with 2 processes start their own (stage)."""
    from stages.common import run

    name = dict((m, n) for n, m in stage_modules())[module]
    with contextlib.chdir(work), mock.patch.dict(os.environ, {"SVDCORE_DATA": str(ROOT / "data")}):
        run(name, importlib.import_module(f"stages.{module}").work)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_model_dir):
    """A scratch directory with params.yaml for the tiny model (8 windows of 32 tokens in batches
    of 2: each of 2 processes takes one window of every batch) and its calibration windows."""
    work = tmp_path_factory.mktemp("calibrated")
    params = yaml.safe_load(yaml.safe_dump(DEFAULTS))
    params.update(device="cpu")
    params["model"]["name"] = str(tiny_model_dir)
    params["calibration"].update(samples=8, seqlen=32)
    params["covariances"]["batch_size"] = 2
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    in_process(work, "collect_calibration")
    return work


def covariances(calibrated, dest, processes):
    shutil.copytree(calibrated, dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["distributed"]["nproc_per_node"] = processes
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    (in_process if processes == 1 else stage)(dest, "compute_covariances")


def test_two_processes_give_the_statistics_of_one(calibrated, tmp_path, tiny_model_dir):
    covariances(calibrated, tmp_path / "one", 1)
    covariances(calibrated, tmp_path / "two", 2)
    one, two = tmp_path / "one", tmp_path / "two"
    # rank 0 alone wrote: the same files as one process, and no second temporary left behind
    listing = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
    assert listing(one) == listing(two)
    timings = json.loads((two / "metrics/stages/compute-covariances.json").read_text())
    assert timings["processes"] == 2 and timings["rank"] == 0
    assert json.loads((one / "artifacts/linears.json").read_text()) == json.loads((two / "artifacts/linears.json").read_text())
    for index in range(2):
        a, b = load_layer(one / "artifacts/stats", index), load_layer(two / "artifacts/stats", index)
        assert a.tokens == b.tokens == 8 * 32 and a.shares == b.shares and sorted(a.grams) == sorted(b.grams)
        for group in a.grams:
            assert torch.linalg.matrix_norm(a.grams[group] - b.grams[group]) <= 1e-6 * torch.linalg.matrix_norm(a.grams[group])
            torch.testing.assert_close(a.abs_means[group], b.abs_means[group], rtol=1e-6, atol=0)

    # and the model compressed from either matches, to the float32 rounding of the stored Grams
    factors = []
    for stats in (one / "artifacts/stats", two / "artifacts/stats"):
        model = load_model(str(tiny_model_dir), torch.float32)
        compress_model(model, uniform_ranks(linear_shapes(model), 0.3), "svd-llm", stats, CPU)
        factors.append({n: m.expand.weight @ m.reduce.weight for n, m in model.named_modules() if isinstance(m, LowRankLinear)})
    assert factors[0].keys() == factors[1].keys() and factors[0]
    for name in factors[0]:
        torch.testing.assert_close(factors[0][name], factors[1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def with_statistics(calibrated, tmp_path_factory):
    """`calibrated` and its statistics, computed by one process."""
    work = tmp_path_factory.mktemp("statistics") / "work"
    shutil.copytree(calibrated, work)
    in_process(work, "compute_covariances")
    return work


def allocated(with_statistics, dest, **compress):
    """`with_statistics` with `compress` set, and its ranks."""
    shutil.copytree(with_statistics, dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["compress"].update(compress)
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    in_process(dest, "allocate_ranks")
    return dest


def compressed(allocated, dest, processes, load):
    """(logits of the calibration windows, ranks, report) of truncate-and-update run in a copy of
    `allocated` by `processes` processes, `model.load` as given."""
    shutil.copytree(allocated, dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["distributed"]["nproc_per_node"] = processes
    params["model"]["load"] = load
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    (in_process if processes == 1 else stage)(dest, "truncate_and_update")
    model, _ = open_compressed(dest / "models/compressed", torch.float32, "whole", CPU)
    with torch.no_grad():
        logits = model(load_file(dest / "artifacts/calibration.safetensors")["input_ids"]).logits
    return logits, low_rank_ranks(model), json.loads((dest / "metrics/compress.json").read_text())


@pytest.mark.parametrize("compress", [
    # the anchored closed form (cross terms) and refinement with a held-out batch: statistics of both
    # streams, split factorizations, averaged gradients and held-out losses
    dict(method="svd-llm", ratio=0.3, anchor=0.5, refine={"steps": 6, "lr": 1e-4, "holdout": 0.25}),
    dict(method="ressvd", ratio=0.3, update=True),  # the update on the shifted Grams; two-stage factors
    dict(method="svd-llm", ratio=0.3),  # statistics from disk: no stream at all, factorizations split
], ids=["anchor-refine", "ressvd-update", "from-disk"])
def test_two_processes_compress_as_one(with_statistics, tmp_path, compress):
    base = allocated(with_statistics, tmp_path / "base", **compress)
    one, ranks_one, report_one = compressed(base, tmp_path / "one", 1, "whole")
    # the second by layer too: its rank 1 reads every layer and writes none
    two, ranks_two, report_two = compressed(base, tmp_path / "two", 2, "by-layer")
    listing = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and "models" not in p.parts)
    assert listing(tmp_path / "one") == listing(tmp_path / "two")  # no second report, no temporary left
    assert not list((tmp_path / "two").glob("models/.*")) and not list((tmp_path / "two").glob("artifacts/.*"))
    timings = json.loads((tmp_path / "two/metrics/stages/truncate-and-update.json").read_text())
    assert timings["processes"] == 2 and timings["rank"] == 0
    assert ranks_one == ranks_two and ranks_one
    if "update" not in compress and "anchor" not in compress:  # the same statistics, each matrix factorized once
        assert torch.equal(one, two)
    else:
        # the same model to the rounding of the per-batch float32 products, compared by what it computes
        # (where a shifted Gram is singular, as o_proj's is here, the factors may differ in directions the
        # inputs never take). Measured: 1 process in batches of 1 instead of 2 moves these logits by
        # 5e-4 (relative), and 2 processes (a batch of 1 each) then give exactly its logits without
        # refinement; refinement moves them by 0.12, and the two runs stay within 2e-3 after it
        assert torch.linalg.norm(one - two) <= 5e-3 * torch.linalg.norm(one)
    for key in ("routes", "route_counts", "gram_route_counts", "recipe"):
        assert report_one[key] == report_two[key], key
    # refinement took the same steps and kept the same epochs, with held-out losses averaged over both
    assert report_one.get("refine", {}).keys() == report_two.get("refine", {}).keys()
    for index, refined in report_one.get("refine", {}).items():
        other = report_two["refine"][index]
        for key in ("steps", "epochs", "best_epoch", "heldout_batches"):
            assert other[key] == refined[key], (index, key)
        for key in ("heldout_before", "heldout_after", "train_first", "train_last"):
            assert other[key] == pytest.approx(refined[key], rel=5e-3), (index, key)
    if "refine" in compress:  # it trained: some layer kept a later epoch than the closed form
        assert report_one["refine"] and any(r["best_epoch"] > 0 for r in report_one["refine"].values())
    if compress.get("update"):
        assert report_two["update_error_ratio"] == pytest.approx(report_one["update_error_ratio"], rel=5e-3)
    assert report_two.get("stream_gap", {}).keys() == report_one.get("stream_gap", {}).keys()
    for index, gap in report_one.get("stream_gap", {}).items():
        assert report_two["stream_gap"][index] == pytest.approx(gap, rel=5e-3)


@pytest.mark.parametrize("spread, line", [
    ({"nproc_per_node": 3}, "error: calibration.samples: 8 for 3 processes (distributed.nproc_per_node x .nnodes); "
                            "expected a multiple of the process count (each process takes an equal part of every batch)"),
    ({"nproc_per_node": 4}, "error: covariances.batch_size: 2 for 4 processes (distributed.nproc_per_node x .nnodes); "
                            "expected a multiple of the process count (each process takes an equal part of every batch)"),
    ({"nnodes": 2}, "error: distributed.rdzv_endpoint: 'localhost:0' for 2 machines; expected host:port of the first "
                    "machine that the others can reach, e.g. node0:29500"),
])
def test_a_spread_that_cannot_run_stops_with_one_line_before_starting(calibrated, tmp_path, spread, line):
    dest = tmp_path / "spread"
    shutil.copytree(calibrated, dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["distributed"].update(spread)
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    done = stage(dest, "compute_covariances", check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [line]
    assert not (dest / "artifacts/stats").exists() and not list(dest.glob("artifacts/.*.tmp"))


def test_each_process_takes_an_equal_part_of_every_batch(monkeypatch):
    from svdcore.distributed import shard

    windows = torch.arange(10).unsqueeze(1)  # batches of 4: [0..3], [4..7], [8, 9]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "2")
    parts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        part, batch_size = shard(windows, 4)
        assert batch_size == 2
        parts.append(part.split(batch_size))
    assert [p.flatten().tolist() for p in parts[0]] == [[0, 1], [4, 5], [8]]
    assert [p.flatten().tolist() for p in parts[1]] == [[2, 3], [6, 7], [9]]
    with pytest.raises(ValueError, match="9 windows in batches of 4 for 2 processes"):
        shard(windows[:9], 4)
