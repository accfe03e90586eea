"""What every stage does around its work: read params, report user errors in one line,
record wall time and peak memory."""
import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

from svdcore import params as params_module
from svdcore.atomic import write_json
from svdcore.errors import UserError

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


def peak_memory() -> dict:
    figures = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        figures["peak_device_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return figures


def run(name: str, work, timings_dir: Path | None = STAGE_METRICS) -> None:
    """Call work(params) -> dict of runtime figures; write them with the stage's wall time and
    peak memory to <timings_dir>/<name>.json (None: the work records its own). A UserError exits
    2 with one line, no traceback."""
    try:
        params = params_module.load()
        figures = work(params) or {}
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if timings_dir is not None:
        figures.update(wall_s=round(time.perf_counter() - STARTED, 2), **peak_memory())
        write_json(Path(timings_dir) / f"{name}.json", figures)


def run_gated(name: str, doc: str, out: str, compute) -> None:
    """The command line of a stage that does its work only when the method reads its output
    (else it writes an empty file, so switching methods costs nothing): `compute(params, out,
    always)`. The sweep runs it with --always, into its own folder."""
    cli = argparse.ArgumentParser(description=doc)
    cli.add_argument("--always", action="store_true", help="compute whatever compress.method is")
    cli.add_argument("--out", default=out)
    cli.add_argument("--timings-dir", default=str(STAGE_METRICS))
    args = cli.parse_args()
    run(name, lambda params: compute(params, args.out, args.always), Path(args.timings_dir))
