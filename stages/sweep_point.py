"""sweep point: one method at one ratio, from the main pipeline's statistics; its perplexity,
achieved ratio and compress time to sweep/points/<method>@<ratio>.json (no model is saved).

    python -m stages.sweep_point svd-llm 0.2
    python -m stages.sweep_point svd-llm+update 0.2    # a preset with the closed-form update on
"""
import sys
import time

from svdcore.atomic import read_json, write_json
from svdcore.compress import compress_model
from svdcore.covariances import linear_shapes
from svdcore.errors import UserError
from svdcore.evaluation import evaluate_model, linear_parameters
from svdcore.fisher import load_fisher
from svdcore.methods import recipe_from_params
from svdcore.model import count_parameters, load_model, load_tokenizer, resolve_device, resolve_dtype
from svdcore.params import sweep_compress
from svdcore.ranks import allocate
from svdcore.sensitivity import load_costs
from svdcore.spectra import load_spectra
from stages.common import STARTED, peak_memory, run
from stages.io import load_calibration

FISHER = "sweep/artifacts/fisher.safetensors"
SENSITIVITY = "sweep/artifacts/sensitivity.safetensors"


def point_file(method: str, ratio: float) -> str:
    return f"sweep/points/{method}@{ratio}.json"


def compress_point(params, method: str, ratio: float):
    """(model, description): the model compressed in memory by `method` at `ratio` from the main
    pipeline's statistics; the description holds the recipe, the allocation's choices, the ratio
    achieved (counted against the model as loaded, so no dense evaluation is needed) and the
    compression wall time. The sweep's perplexity and zero-shot stages share it."""
    device = resolve_device(params["device"])
    compress = sweep_compress(params["compress"], method, ratio)
    recipe = recipe_from_params(compress)
    shapes = read_json("artifacts/linears.json", "linear shapes")["shapes"]
    spectra = load_spectra("artifacts/spectra.safetensors") if recipe.allocation == "v2" else None
    costs = load_costs(SENSITIVITY) if recipe.allocation == "sensitivity" else None
    ranks, decided = allocate(shapes, ratio, recipe.allocation, spectra, recipe.last_layers, compress["rank_multiple"],
                              costs)
    model = load_model(params["model"]["name"], resolve_dtype(params["model"]["dtype"], device))
    if linear_shapes(model) != shapes:
        raise UserError("sweep: artifacts/linears.json was made for another model; rerun the main pipeline (dvc repro)")
    dense_linears, dense_total = linear_parameters(model), count_parameters(model)
    fisher = load_fisher(FISHER, model) if recipe.needs_fisher else None
    windows = load_calibration() if recipe.needs_windows else None
    cov = params["covariances"]
    start = time.perf_counter()
    compress_model(model, ranks, recipe, "artifacts/stats", device, windows, cov["batch_size"],
                   route=compress["route"], offload=cov["offload_activations"], fisher=fisher)
    return model, {
        "method": method, "ratio": ratio, "recipe": recipe.describe(), **decided,
        "ratio_achieved": {"linears": 1 - linear_parameters(model) / dense_linears,
                           "model": 1 - count_parameters(model) / dense_total},
        "compress_s": round(time.perf_counter() - start, 2), "params": {**params, "compress": compress}}


def work(params, method: str, ratio: float) -> dict:
    model, point = compress_point(params, method, ratio)
    ev = params["evaluate"]
    start = time.perf_counter()
    metrics, _ = evaluate_model(model, load_tokenizer(params["model"]["name"]), ev["datasets"], ev["seqlen"],
                                ev["max_windows"], ev["batch_size"], resolve_device(params["device"]),
                                f"{method}@{ratio}")
    write_json(point_file(method, ratio), {
        **point, "ppl": metrics["ppl"], "windows": metrics["windows"],
        "evaluate_s": round(time.perf_counter() - start, 2),
        "wall_s": round(time.perf_counter() - STARTED, 2), **peak_memory()})
    return {}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    run("sweep-point", lambda params: work(params, sys.argv[1], float(sys.argv[2])), timings_dir=None)
