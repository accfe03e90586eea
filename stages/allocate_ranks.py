"""allocate-ranks: compress.ratio -> a rank per decoder linear, by the method's allocation
strategy (uniform, v2 from the whitened spectra, last-k, sensitivity from the component costs),
rounded to compress.rank_multiple."""
from svdcore.atomic import read_json, write_json
from svdcore.methods import recipe_from_params
from svdcore.ranks import allocate, parameter_count
from svdcore.sensitivity import load_costs
from svdcore.spectra import load_spectra
from stages.common import run

OUT = "artifacts/ranks.json"


def allocation_record(shapes: dict, ranks: dict, decided: dict, compress: dict, strategy: str) -> dict:
    dense = parameter_count(shapes, {n: None for n in shapes})
    kept = parameter_count(shapes, ranks)
    return {"ratio": compress["ratio"], "strategy": strategy, **decided, "rank_multiple": compress["rank_multiple"],
            "shapes": shapes, "ranks": ranks, "linear_params_dense": dense, "linear_params_compressed": kept,
            "linear_ratio": 1 - kept / dense}


def work(params):
    compress = params["compress"]
    recipe = recipe_from_params(compress)
    shapes = read_json("artifacts/linears.json", "linear shapes")["shapes"]
    spectra = load_spectra("artifacts/spectra.safetensors") if recipe.allocation == "v2" else None
    costs = load_costs("artifacts/sensitivity.safetensors") if recipe.allocation == "sensitivity" else None
    ranks, decided = allocate(shapes, compress["ratio"], recipe.allocation, spectra, recipe.last_layers,
                              compress["rank_multiple"], costs)
    write_json(OUT, allocation_record(shapes, ranks, decided, compress, recipe.allocation))
    return {}


if __name__ == "__main__":
    run("allocate-ranks", work)
