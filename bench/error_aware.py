"""Choose the error-aware knobs by measurement: anchor, block refinement steps, allocation.

    python -m bench.error_aware --ratios 0.2 0.4 --variants svd-llm anchor-1 aa-svd-32 --windows 16

Runs on the main pipeline's artifacts (calibration windows, statistics, linears.json: `dvc repro`
first; the sensitivity allocation also reads artifacts/sensitivity.safetensors, made here with
the pipeline's function when it is empty, and never written) and scores every variant on held-out
validation text (WikiText-2 valid and PTB valid, --windows windows of 512 tokens each), never on
the test splits the README reports. The calibration windows are drawn from WikiText-2 valid too,
so that column is slightly optimistic for every variant alike. Each row also gives the
compression's wall time by phase (two-stream forward, statistics, decompositions, refinement).
Prints a row per variant as it lands and writes --json after each; nothing here is asserted.
A row of a refined variant with statistics on the shifted inputs (anchor, update) says
`heldout_in_fit`: true for rows measured before the windows refinement holds out were kept out of
those statistics (2026-12-03), false after; a rerun measures the true ones again.
"""
import copy
import json
import time
from pathlib import Path

import torch

from bench.common import parser as bench_parser, peak_memory, previous_rows, table, write_json
from svdcore.atomic import read_json
from svdcore.compress import compress_model
from svdcore.evaluation import evaluate_model
from svdcore.methods import Recipe
from svdcore.model import load_model, load_tokenizer, resolve_device
from svdcore.ranks import allocate
from svdcore.sensitivity import component_costs, load_costs
from svdcore.spectra import load_spectra
from svdcore.timing import Sections

WHITENING = {"metric": "whitening"}
# name -> Recipe knobs; the allocation defaults to uniform
VARIANTS = {
    "svd-llm": {},
    "update": {"update": True},
    "anchor-0": {"anchor": 0.0},
    "anchor-0.25": {"anchor": 0.25},
    "anchor-0.5": {"anchor": 0.5},
    "anchor-0.75": {"anchor": 0.75},
    "anchor-0.5-sensitivity": {"anchor": 0.5, "allocation": "sensitivity"},
    **{f"anchor-0.5-sensitivity-refine-{s}": {"anchor": 0.5, "allocation": "sensitivity", "refine_steps": s}
       for s in (16, 32, 64, 128)},
    "anchor-1": {"anchor": 1.0},
    **{f"refine-{s}": {"refine_steps": s} for s in (16, 32, 64, 128)},
    **{f"aa-svd-{s}": {"anchor": 1.0, "refine_steps": s} for s in (8, 16, 32, 64, 128)},
    **{f"anchor-1-{a}": {"anchor": 1.0, "allocation": a} for a in ("v2", "last-k", "sensitivity")},
    **{f"svd-llm-{a}": {"allocation": a} for a in ("v2", "last-k", "sensitivity")},
    **{f"refine-32-{a}": {"refine_steps": 32, "allocation": a} for a in ("last-k", "sensitivity")},
    **{f"aa-svd-32-{a}": {"anchor": 1.0, "refine_steps": 32, "allocation": a} for a in ("last-k", "sensitivity")},
    **{f"aa-svd-64-{a}": {"anchor": 1.0, "refine_steps": 64, "allocation": a} for a in ("last-k", "sensitivity")},
}
COSTS = Path("artifacts/sensitivity.safetensors")
_MEASURED_COSTS = {}  # made here once per process when the pipeline's file is empty


def knobs_of(name: str) -> dict:
    """A named variant, or knobs spelled out: "anchor=0.25,allocation=sensitivity,refine_steps=32"."""
    if name in VARIANTS:
        return VARIANTS[name]
    knobs = dict(item.split("=", 1) for item in name.split(","))
    for key in ("anchor", "anchor_ridge", "refine_lr", "refine_holdout"):
        if key in knobs:
            knobs[key] = float(knobs[key])
    for key in ("refine_steps", "last_layers"):
        if key in knobs:
            knobs[key] = int(knobs[key])
    return knobs


def recipe_of(name: str, **defaults) -> dict:
    """The recipe a variant names, as Recipe.describe() records it; `defaults` for knobs it leaves out."""
    return Recipe(**{**WHITENING, **defaults, **knobs_of(name)}).describe()


def costs_for(model, device) -> dict:
    """The pipeline's component costs, or (compute-sensitivity left the file empty: another allocation)
    the same measurement made here once per process; the pipeline's artifact is never overwritten."""
    costs = load_costs(COSTS) if COSTS.is_file() else {}
    if not costs:
        if "costs" not in _MEASURED_COSTS:
            from stages.io import load_calibration

            _MEASURED_COSTS["costs"] = component_costs(copy.deepcopy(model), load_calibration(), "artifacts/stats", device, 4)
        costs = _MEASURED_COSTS["costs"]
    return costs


def main(argv=None):
    p = bench_parser(__doc__, "device")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2])
    p.add_argument("--variants", nargs="+", default=["svd-llm", "anchor-1", "aa-svd-32"],
                   help=f"named ({', '.join(VARIANTS)}) or knob=value,... (Recipe's fields)")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from stages.io import load_calibration

    device = resolve_device(args.device)
    dense = load_model(args.model, torch.float32)
    tokenizer = load_tokenizer(args.model)
    shapes = read_json("artifacts/linears.json", "linear shapes")["shapes"]
    windows = load_calibration()
    score = lambda model, label: evaluate_model(model, tokenizer, ["wikitext2-valid", "ptb-valid"], 512,  # noqa: E731
                                                args.windows, 4, device, label)[0]["ppl"]
    previous = previous_rows(args.json)
    # rows marked heldout_in_fit were measured before the windows refinement holds out were kept out of
    # the statistics on X~ (svdcore.compress): measured again when asked for. A row is reused for the
    # recipe it measured: rows from before rows recorded it were made when refine_holdout defaulted to 0.125
    done = {(r["ratio"], json.dumps(r.get("recipe") or recipe_of(r["variant"], refine_holdout=0.125), sort_keys=True))
            for r in previous if not r.get("heldout_in_fit") and r["variant"] != "dense"}
    rows = previous or [{"ratio": 0.0, "variant": "dense", **score(dense, "dense")}]
    for ratio in args.ratios:
        for name in args.variants:
            recipe = Recipe(**{**WHITENING, **knobs_of(name)})
            if (ratio, json.dumps(recipe.describe(), sort_keys=True)) in done:
                continue
            spectra = load_spectra("artifacts/spectra.safetensors") if recipe.allocation == "v2" else None
            costs = costs_for(dense, device) if recipe.allocation == "sensitivity" else None
            ranks, decided = allocate(shapes, ratio, recipe.allocation, spectra, recipe.last_layers, 1, costs)
            model = copy.deepcopy(dense)
            sections = Sections()
            start = time.perf_counter()
            with sections.active():
                report = compress_model(model, ranks, recipe, "artifacts/stats", device, windows, 4)
            seconds = time.perf_counter() - start
            refined = report.get("refine", {})
            gain = [1 - r["heldout_after"] / r["heldout_before"] for r in refined.values() if r["heldout_before"]]
            rows.append({"ratio": ratio, "variant": name, "recipe": recipe.describe(), **score(model, f"{name} @{ratio}"),
                         "compress_s": round(seconds, 1),
                         "phases_s": {k: round(v, 1) for k, v in sorted(sections.seconds.items())},
                         "refine_steps_run": sum(r["steps"] for r in refined.values()),
                         "refine_heldout_gain": round(sum(gain) / len(gain), 4) if gain else None,
                         "final_stream_gap": report.get("stream_gap", {}).get(len(report.get("stream_gap", {})) - 1),
                         "last_layers": decided.get("last_layers"),
                         **({"heldout_in_fit": False} if refined and (recipe.anchor is not None or recipe.update)
                            and recipe.refine_holdout > 0 else {})})
            print(table(rows[-1:], [c for c in rows[-1] if c != "phases_s"]), rows[-1]["phases_s"], flush=True)
            write_json(args.json, "bench.error_aware", argv, {"windows": args.windows, "rows": rows,
                                                              **peak_memory(device)})
    columns = ["ratio", "variant", "wikitext2-valid", "ptb-valid", "compress_s", "refine_steps_run",
               "refine_heldout_gain"]
    print(table(rows, columns))
    return rows


if __name__ == "__main__":
    main()
