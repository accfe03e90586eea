"""What a ratio change costs: a first full `dvc repro` against the repro after compress.ratio
changes, stage by stage, in a scratch copy of the project.

    python -m bench.ratio_change                       # the shipped params.yaml, 0.2 -> 0.4
    python -m bench.ratio_change --target truncate-and-update --set evaluate.max_windows=10

Stage figures are the stages' own wall times (metrics/stages/*.json: process start to end,
imports included); "dvc repro" is the whole command, DVC's own work included. The model's
GGUF cache is filled before the first run, so neither run pays the one-off conversion. Needs
dvc (it runs `python -m dvc`). Prints a table and writes --json; nothing here is asserted.
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import table, write_json
from stages.pipeline import stage_names
from stages.project import run, scratch_project, set_params


def repro(work: Path, env: dict, dvc: list[str], target: str | None) -> dict:
    start = time.perf_counter()
    log = run(dvc + ["repro", *([target] if target else [])], work, env)
    figures = {"dvc repro": time.perf_counter() - start}
    for stage in stage_names():  # the stages that ran now (the others' figures are from an earlier run)
        if f"Running stage '{stage}'" in log:
            figures[stage] = json.loads((work / "metrics/stages" / f"{stage}.json").read_text())["wall_s"]
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", type=float, default=0.4, help="the new compress.ratio")
    parser.add_argument("--target", help="a dvc stage to repro up to (default: the whole pipeline)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml overrides for both runs (YAML values)")
    parser.add_argument("--keep", help="keep the scratch project in this directory")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="svdcore-ratio-"))
    try:
        env, dvc = scratch_project(work)
        set_params(work, overrides)
        params = yaml.safe_load((work / "params.yaml").read_text())
        run([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); from svdcore.model import load_model, "
             f"load_tokenizer, load_config; load_config({params['model']['name']!r}); "
             f"load_tokenizer({params['model']['name']!r}); load_model({params['model']['name']!r})"], work, env)
        first = repro(work, env, dvc, args.target)
        set_params(work, {"compress.ratio": args.to})
        second = repro(work, env, dvc, args.target)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    rows = [{"stage": name, "first_s": first.get(name, "-"), "after_ratio_change_s": second.get(name, "-")}
            for name in (*stage_names(), "dvc repro") if name in first]
    share = second["dvc repro"] / first["dvc repro"]
    print(f"\nfirst full run vs a change of compress.ratio to {args.to} ({args.target or 'whole pipeline'}; "
          f"overrides {overrides or 'none'})")
    print(table(rows, ["stage", "first_s", "after_ratio_change_s"]))
    print(f"a ratio change costs {share:.0%} of the first run")
    result = {"target": args.target, "overrides": overrides, "to": args.to, "first_s": first,
              "after_ratio_change_s": second, "share": share}
    write_json(args.json, __spec__.name if __spec__ else __name__, argv, result)
    return result


if __name__ == "__main__":
    main()
