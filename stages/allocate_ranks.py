"""allocate-ranks: compress.ratio -> a rank per decoder linear (uniform)."""
from svdcore.atomic import read_json, write_json
from svdcore.ranks import parameter_count, uniform_ranks
from stages.common import run

OUT = "artifacts/ranks.json"


def work(params):
    ratio = params["compress"]["ratio"]
    shapes = read_json("artifacts/linears.json", "linear shapes")["shapes"]
    ranks = uniform_ranks(shapes, ratio)
    dense = parameter_count(shapes, {n: None for n in shapes})
    kept = parameter_count(shapes, ranks)
    write_json(OUT, {"ratio": ratio, "strategy": "uniform", "shapes": shapes, "ranks": ranks,
                     "linear_params_dense": dense, "linear_params_compressed": kept,
                     "linear_ratio": 1 - kept / dense})
    return {}


if __name__ == "__main__":
    run("allocate-ranks", work)
