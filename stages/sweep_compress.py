"""sweep compress: one method at one ratio, compressed from the main pipeline's statistics by the
path truncate-and-update takes (stages.compression) -> sweep/models/<method>@<ratio>/: the model as
models/compressed is saved (compress.save_dtype, model card), and compress.json (the recipe, what
the allocation decided, the ratio achieved, the compression report) that the point's perplexity and
zero-shot stages read. Its wall time goes to sweep/timings/compress/, which only the report reads.

    python -m stages.sweep_compress svd-llm 0.2
    python -m stages.sweep_compress svd-llm+update 0.2    # a preset with the closed-form update on
"""
import sys

from svdcore.atomic import write_json
from svdcore.card import REPRODUCING
from svdcore.model import load_tokenizer
from stages.common import peak_memory, run, wall_s
from stages.compression import compress_point, save_with_card
from stages.io import SWEEP_DESCRIPTION, sweep_compress_timings, sweep_model_dir


def work(params, method: str, ratio: float) -> dict:
    tokenizer = load_tokenizer(params.model.name)  # saved beside the model; before the slow work
    model, point = compress_point(params, method, ratio)
    recipe, summary = point["recipe"], point["summary"]
    # the params that made the model (those this stage depends on); the point and zero-shot stages
    # add the evaluation settings they use
    made_by = point["params"].model_dump(include={"device", *REPRODUCING})
    description = {"method": method, "ratio": ratio, "recipe": recipe.describe(), **point["decided"],
                   "ratio_achieved": summary["ratio_achieved"], "params": made_by, "report": point["report"]}
    save_with_card(point["params"], recipe, point["allocation"], model, tokenizer, sweep_model_dir(method, ratio),
                   extra_files={SWEEP_DESCRIPTION: description})
    write_json(sweep_compress_timings(method, ratio), {"compress_s": summary["compress_s"], "wall_s": wall_s(),
                                                       **peak_memory()})
    return {}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    run("sweep-compress", lambda params: work(params, sys.argv[1], float(sys.argv[2])), timings_dir=None)
