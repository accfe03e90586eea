"""What every stage does around its work: read params, report user errors in one line,
record wall time and peak memory."""
import argparse
import os
import re
import resource
import sys
import time
from pathlib import Path

import torch

from svdcore import params as params_module
from svdcore.atomic import atomic_path, write_json
from svdcore.errors import UserError
from svdcore.model import load_model, resolve_device, resolve_dtype

STAGE_METRICS = Path("metrics/stages")


def _process_start() -> float:
    """When this process started, on the perf_counter clock, so that wall times include the
    imports (torch, transformers, mlflow: several seconds). Falls back to now off Linux."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.perf_counter() - (uptime - started_after_boot)
    except (OSError, ValueError, IndexError):
        return time.perf_counter()


STARTED = _process_start()


def wall_s() -> float:
    """Seconds since this process started."""
    return round(time.perf_counter() - STARTED, 2)


def peak_memory() -> dict:
    figures = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        figures["peak_device_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return figures


PIPELINES = (("dvc.yaml", "dvc repro"), ("sweep/dvc.yaml", "dvc repro sweep/dvc.yaml"))


def rebuild_hint(artifact: str | None) -> str:
    """How to rebuild a missing or bad `artifact` (a path, relative to the repository root where
    stages run): "; rerun <stage> (dvc repro)" for the stage of dvc.yaml or sweep/dvc.yaml whose
    output holds it (a matrix stage's templated outputs included), or "" when none does."""
    if artifact is None:
        return ""
    import yaml

    path = Path(artifact).resolve().as_posix()
    for pipeline, command in PIPELINES:
        if not Path(pipeline).is_file():
            continue
        stages = yaml.safe_load(Path(pipeline).read_text()).get("stages", {})
        for name, stage in stages.items():
            base = (Path(pipeline).parent / stage.get("wdir", ".")).resolve().as_posix()
            for out in stage.get("outs", []) + stage.get("metrics", []):
                out = out if isinstance(out, str) else next(iter(out))
                # ${item.method} and the like stand for one path segment
                pattern = "[^/]+".join(map(re.escape, re.split(r"\$\{[^}]*\}", f"{base}/{out}")))
                if re.fullmatch(pattern + "(/.*)?", path):
                    return f"; rerun {name} ({command})"
    return ""


def run(name: str, work, timings_dir: Path | None = STAGE_METRICS) -> None:
    """Call work(params) -> dict of runtime figures; write them with the stage's wall time and
    peak memory to <timings_dir>/<name>.json (None: the work records its own). A UserError exits
    2 with one line, no traceback."""
    try:
        params = params_module.load()
        figures = work(params) or {}
    except UserError as e:
        print(f"error: {e}{rebuild_hint(e.artifact)}", file=sys.stderr)
        sys.exit(2)
    if timings_dir is not None:
        figures.update(wall_s=wall_s(), **peak_memory())
        write_json(Path(timings_dir) / f"{name}.json", figures)


def gated_work(needed, compute, save, out: str, always: bool = False):
    """The work of a stage whose output only some methods read: when `needed(params)` (or
    `always`), `compute(params, model, device)` on the dense model, else nothing, and
    `save(path, result)` either way (an empty result: switching methods costs nothing), written
    whole or not at all."""
    def work(params):
        device = resolve_device(params["device"])
        result = {}
        if always or needed(params):
            model = load_model(params["model"]["name"], resolve_dtype(params["model"]["dtype"], device))
            result = compute(params, model, device)
        with atomic_path(out) as tmp:
            save(tmp, result)
        return {"device": str(device), "matrices": len(result)}
    return work


def run_gated(name: str, doc: str, out: str, needed, compute, save) -> None:
    """The command line of a gated_work stage; the sweep runs it with --always, into its own folder."""
    cli = argparse.ArgumentParser(description=doc)
    cli.add_argument("--always", action="store_true", help="compute whatever compress.method is")
    cli.add_argument("--out", default=out)
    cli.add_argument("--timings-dir", default=str(STAGE_METRICS))
    args = cli.parse_args()
    run(name, gated_work(needed, compute, save, args.out, args.always), Path(args.timings_dir))
