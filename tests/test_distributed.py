"""compute-covariances data-parallel under torchrun: 2 processes on gloo give the statistics of
1 process (each streams half the windows; a layer's statistics are summed before rank 0 writes),
and the model compressed from them matches."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, DEFAULTS
from svdcore.compress import compress_model
from svdcore.covariances import linear_shapes, load_layer
from svdcore.lowrank import LowRankLinear
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


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_model_dir):
    """A scratch directory with params.yaml for the tiny model (7 windows of 32 tokens: shares of 4
    and 3, so that token-weighted means differ from plain ones) and its calibration windows."""
    work = tmp_path_factory.mktemp("calibrated")
    params = yaml.safe_load(yaml.safe_dump(DEFAULTS))
    params.update(device="cpu")
    params["model"]["name"] = str(tiny_model_dir)
    params["calibration"].update(samples=7, seqlen=32)
    params["covariances"]["batch_size"] = 2
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    stage(work, "collect_calibration")
    return work


def covariances(calibrated, dest, processes):
    shutil.copytree(calibrated, dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["distributed"]["nproc_per_node"] = processes
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    return stage(dest, "compute_covariances")


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
        assert a.tokens == b.tokens == 7 * 32 and a.shares == b.shares and sorted(a.grams) == sorted(b.grams)
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


@pytest.mark.parametrize("spread, line", [
    ({"nproc_per_node": 8}, "error: distributed: 7 calibration windows (calibration.samples) for 8 processes "
                            "(distributed.nproc_per_node x .nnodes); expected at least one window a process"),
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
