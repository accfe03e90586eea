"""sweep point: the perplexity of one method at one ratio, measured as evaluate measures the
pipeline's model, on the point's saved model (sweep-compress) -> sweep/points/<method>@<ratio>.json,
with the point's recipe, allocation and ratio achieved.

    python -m stages.sweep_point svd-llm 0.2
    python -m stages.sweep_point svd-llm+update 0.2    # a preset with the closed-form update on
"""
import sys
import time

from svdcore.atomic import write_json
from svdcore.evaluation import measure
from stages.common import peak_memory, run, wall_s
from stages.io import load_sweep_model, point_file


def work(params, method: str, ratio: float) -> dict:
    model, tokenizer, point, device = load_sweep_model(params, method, ratio)
    start = time.perf_counter()
    metrics, _ = measure(model, tokenizer, params, device, f"{method}@{ratio}", what=("perplexity",))
    write_json(point_file(method, ratio), {
        **point, "params": {**point["params"], "evaluate": params.evaluate.model_dump()},
        "ppl": metrics["ppl"], "windows": metrics["windows"],
        "evaluate_s": round(time.perf_counter() - start, 2), "wall_s": wall_s(), **peak_memory()})
    return {}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    run("sweep-point", lambda params: work(params, sys.argv[1], float(sys.argv[2])), timings_dir=None)
