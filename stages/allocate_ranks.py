"""allocate-ranks: compress.ratio -> a rank per decoder linear, by the method's allocation
strategy (uniform, v2 from the whitened spectra, last-k, sensitivity from the component costs),
rounded to compress.rank_multiple."""
from svdcore.atomic import write_json
from svdcore.methods import recipe_from_params
from stages.common import run
from stages.allocation import allocation_for

OUT = "artifacts/ranks.json"


def work(params):
    recipe = recipe_from_params(params.compress)
    record, _ = allocation_for(params.compress, recipe, "artifacts/sensitivity.safetensors")
    write_json(OUT, record)
    return {}


if __name__ == "__main__":
    run("allocate-ranks", work)
