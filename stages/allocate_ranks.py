"""allocate-ranks: compress.ratio -> a rank per decoder linear (uniform, then rounded to compress.rank_multiple)."""
from svdcore.atomic import read_json, write_json
from svdcore.ranks import parameter_count, round_to_multiple, uniform_ranks
from stages.common import run

OUT = "artifacts/ranks.json"


def work(params):
    ratio, multiple = params["compress"]["ratio"], params["compress"]["rank_multiple"]
    shapes = read_json("artifacts/linears.json", "linear shapes")["shapes"]
    ranks = round_to_multiple(shapes, uniform_ranks(shapes, ratio), multiple)
    dense = parameter_count(shapes, {n: None for n in shapes})
    kept = parameter_count(shapes, ranks)
    write_json(OUT, {"ratio": ratio, "strategy": "uniform", "rank_multiple": multiple, "shapes": shapes, "ranks": ranks,
                     "linear_params_dense": dense, "linear_params_compressed": kept,
                     "linear_ratio": 1 - kept / dense})
    return {}


if __name__ == "__main__":
    run("allocate-ranks", work)
