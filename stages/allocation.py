"""Ranks from the statistics, for allocate-ranks and for a sweep point's compress stage."""
from svdcore.atomic import read_json
from svdcore.methods import Recipe
from svdcore.params import Compress
from svdcore.ranks import allocate, parameter_count
from svdcore.sensitivity import load_costs
from svdcore.spectra import load_spectra

LINEARS = "artifacts/linears.json"
SPECTRA = "artifacts/spectra.safetensors"


def allocation_for(compress: Compress, recipe: Recipe, sensitivity: str) -> tuple[dict, dict]:
    """(record, decided): artifacts/ranks.json's record, a rank per decoder linear for
    compress.ratio by the recipe's allocation (the spectra or the component costs of `sensitivity`
    when it needs them) with the parameter counts it plans; and what the allocation decided on its
    own (svdcore.ranks.allocate), which the record holds too."""
    shapes = read_json(LINEARS, "linear shapes")["shapes"]
    spectra = load_spectra(SPECTRA, shapes) if recipe.allocation == "v2" else None
    costs = load_costs(sensitivity, shapes) if recipe.allocation == "sensitivity" else None
    ranks, decided = allocate(shapes, compress.ratio, recipe.allocation, spectra, recipe.last_layers,
                              compress.rank_multiple, costs)
    dense, kept = parameter_count(shapes, {n: None for n in shapes}), parameter_count(shapes, ranks)
    return {"ratio": compress.ratio, "strategy": recipe.allocation, **decided,
            "rank_multiple": compress.rank_multiple, "shapes": shapes, "ranks": ranks,
            "linear_params_dense": dense, "linear_params_compressed": kept, "linear_ratio": 1 - kept / dense}, decided
