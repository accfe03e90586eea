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
from stages.io import load_calibration
from stages.pipeline import PIPELINES, stages_of

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


def rebuild_hint(artifact: str | None) -> str:
    """How to rebuild a missing or bad `artifact` (a path, relative to where the stage runs): "; rerun
    <stage> (dvc repro)" for the stage of the project's dvc.yaml or sweep/dvc.yaml whose output holds
    it (a matrix stage by its full name, compress@best-0.2), or "" when none does or they are
    unreadable: a hint never replaces the error it adds to."""
    if artifact is None:
        return ""
    import yaml

    path = os.path.abspath(artifact)  # not resolve(): DVC may link outputs into its cache
    try:
        for pipeline, command in PIPELINES:
            if not pipeline.is_file():
                continue
            for name, stage in (stages_of(pipeline) or {}).items():
                base = os.path.abspath(pipeline.parent / stage.get("wdir", "."))
                for out in (stage.get("outs") or []) + (stage.get("metrics") or []):
                    out = out if isinstance(out, str) else next(iter(out))
                    # ${item.method} and the like: one path segment each, which names the matrix stage
                    parts = re.split(r"\$\{item\.(\w+)\}", f"{base}/{out}")
                    pattern = "".join(f"(?P<{p}>[^/]+)" if i % 2 else re.escape(p) for i, p in enumerate(parts))
                    found = re.fullmatch(pattern + "(/.*)?", path)
                    if found:
                        keys = list(stage.get("matrix") or {})
                        full = f"{name}@{'-'.join(found[k] for k in keys)}" if keys else name
                        return f"; rerun {full} ({command})"
    except (OSError, ValueError, AttributeError, TypeError, KeyError, IndexError, re.error, yaml.YAMLError):
        return ""
    return ""


def run(name: str, work, timings_dir: Path | None = STAGE_METRICS) -> None:
    """Call work(params) with params.yaml's typed values (svdcore.params.Params) -> dict of runtime
    figures; write them with the stage's wall time and peak memory to <timings_dir>/<name>.json
    (None: the work records its own; under torchrun, rank 0's figures alone). A UserError exits 2
    with one line, no traceback."""
    try:
        params = params_module.load()
        figures = work(params) or {}
    except UserError as e:
        print(f"error: {e}{rebuild_hint(e.artifact)}", file=sys.stderr)
        sys.exit(2)
    # under torchrun (svdcore.distributed), rank 0 alone writes; read from the environment here, so
    # that the stages that never run distributed do not depend on that module
    rank = os.environ.get("RANK", "0") if "TORCHELASTIC_RUN_ID" in os.environ else "0"
    if timings_dir is not None and rank == "0":
        figures.update(wall_s=wall_s(), **peak_memory())
        write_json(Path(timings_dir) / f"{name}.json", figures)


def under_torchrun(params, module: str) -> None:
    """When params.yaml asks for more than one process (distributed.nproc_per_node x .nnodes) and
    this is not yet one of them, replace this process by torchrun running `module` in as many:
    `dvc repro` keeps its plain `python -m stages.X` command, and one process (the default) runs
    exactly as without torchrun. Every node of a multi-node run starts the same command in the same
    repository (a shared filesystem: rank 0 writes the outputs, wherever it lands)."""
    spread = params.distributed
    processes = spread.nproc_per_node * spread.nnodes
    if processes == 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        return
    # what would otherwise fail only once the processes run, or hang at the rendezvous; each process
    # takes an equal part of every batch (svdcore.distributed.shard)
    for key, count in (("calibration.samples", params.calibration.samples),
                       ("covariances.batch_size", params.covariances.batch_size)):
        if count % processes:
            raise UserError(f"{key}: {count} for {processes} processes (distributed.nproc_per_node x .nnodes); "
                            f"expected a multiple of the process count (each process takes an equal part of every batch)")
    host, port = spread.rdzv_endpoint.rsplit(":", 1)
    if spread.nnodes > 1 and (port == "0" or host in ("localhost", "127.0.0.1")):
        raise UserError(f"distributed.rdzv_endpoint: {spread.rdzv_endpoint!r} for {spread.nnodes} machines; "
                        f"expected host:port of the first machine that the others can reach, e.g. node0:29500")
    device = resolve_device(params.device)
    if device.type == "cuda" and spread.nproc_per_node > torch.cuda.device_count():
        raise UserError(f"distributed.nproc_per_node: {spread.nproc_per_node} processes for "
                        f"{torch.cuda.device_count()} GPUs; expected one GPU a process at most")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(spread.nnodes),
                              "--nproc-per-node", str(spread.nproc_per_node), "--rdzv-backend", "c10d",
                              "--rdzv-endpoint", spread.rdzv_endpoint, "-m", module])


def gated_work(needed, compute, save, out: str, always: bool = False):
    """The work of a stage whose output only some methods read: when `needed(params)` (or
    `always`), `compute(params, model, windows, device)` on the dense model and the calibration
    windows, else nothing, and `save(path, result)` either way (an empty result: switching methods
    costs nothing), written whole or not at all. The stage's command: run_gated."""
    def work(params):
        device = resolve_device(params.device)
        result = {}
        if always or needed(params):
            windows = load_calibration()  # before the slow model load: a missing file stops at once
            model = load_model(params.model.name, resolve_dtype(params.model.dtype, device))
            result = compute(params, model, windows, device)
        with atomic_path(out) as tmp:
            save(tmp, result)
        return {"device": str(device), "matrices": len(result)}
    return work


def run_gated(name: str, doc: str, out: str, gated) -> None:
    """The command line of a gated_work stage, `gated(out, always)`; the sweep runs it with --always,
    into its own folder."""
    cli = argparse.ArgumentParser(description=doc)
    cli.add_argument("--always", action="store_true", help="compute whatever compress.method is")
    cli.add_argument("--out", default=out)
    cli.add_argument("--timings-dir", default=str(STAGE_METRICS))
    args = cli.parse_args()
    run(name, gated(args.out, args.always), Path(args.timings_dir))
