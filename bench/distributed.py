"""compute-covariances with 1 and with N processes under torchrun, on params.yaml's model and the
calibration windows of the last `dvc repro` (artifacts/calibration.safetensors).

    python -m bench.distributed --processes 1 2 --json bench/results/cpu-distributed.json

Each run is the stage's own command (`python -m stages.compute_covariances`) in a scratch
directory holding params.yaml (with distributed.nproc_per_node set) and the calibration windows.
Prints, per process count, the command's wall time, the stage's own wall time and peak RSS (rank
0's), and how far its Grams are from the first run's (largest relative Frobenius difference over
all of them). On one machine's CPU cores the processes share the cores (torchrun gives each one
thread when it starts several): expect no speed-up, only the overhead. Nothing here is asserted.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.common import parser as bench_parser, table, write_json
from stages.pipeline import ROOT



def run_stage(scratch: Path, processes: int) -> float:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["distributed"]["nproc_per_node"] = processes
    (scratch / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TORCHELASTIC_RUN_ID", None)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "stages.compute_covariances"], cwd=scratch, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit((done.stdout + done.stderr)[-3000:])
    return time.perf_counter() - start


def max_relative_difference(stats_a: Path, stats_b: Path) -> float:
    from svdcore.covariances import load_layer

    worst, index = 0.0, 0
    while (stats_a / f"layer_{index:03d}.safetensors").is_file():
        a, b = load_layer(stats_a, index), load_layer(stats_b, index)
        for group, gram in a.grams.items():
            worst = max(worst, float(torch.linalg.matrix_norm(gram - b.grams[group]) / torch.linalg.matrix_norm(gram)))
        index += 1
    return worst


def main(argv=None):
    p = bench_parser(__doc__)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    calibration = ROOT / "artifacts/calibration.safetensors"
    if not calibration.is_file():
        sys.exit(f"{calibration} is missing: run `dvc repro collect-calibration` first")
    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for processes in args.processes:
            scratch = Path(tmp) / f"p{processes}"
            (scratch / "artifacts").mkdir(parents=True)
            shutil.copy(calibration, scratch / "artifacts")
            command_s = run_stage(scratch, processes)
            stage = json.loads((scratch / "metrics/stages/compute-covariances.json").read_text())
            first = first or scratch
            rows.append({"processes": processes, "ran": stage["processes"], "command_s": round(command_s, 1),
                         "stage_wall_s": stage["wall_s"],
                         "rank0_peak_rss_mib": stage["peak_rss_mib"],
                         "max_rel_gram_diff": max_relative_difference(first / "artifacts/stats",
                                                                      scratch / "artifacts/stats")})
            print(table(rows[-1:], list(rows[-1])), flush=True)
    print(table(rows, list(rows[0])))
    write_json(args.json, "bench.distributed", argv, {"cpu_cores": os.cpu_count(), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
