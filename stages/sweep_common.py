"""How a sweep point is compressed (from the main pipeline's statistics, in memory): shared by the
sweep's perplexity and zero-shot stages."""
import time

from svdcore.atomic import read_json
from svdcore.compress import compress_model
from svdcore.covariances import linear_shapes
from svdcore.errors import UserError
from svdcore.evaluation import linear_parameters
from svdcore.fisher import load_fisher
from svdcore.methods import recipe_from_params
from svdcore.model import count_parameters, load_model, resolve_device, resolve_dtype
from svdcore.params import sweep_compress
from svdcore.ranks import allocate
from svdcore.sensitivity import load_costs
from svdcore.spectra import load_spectra
from stages.io import load_calibration

FISHER = "sweep/artifacts/fisher.safetensors"
SENSITIVITY = "sweep/artifacts/sensitivity.safetensors"


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
