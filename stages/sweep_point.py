"""sweep point: one method at one ratio, from the main pipeline's statistics; its perplexity,
achieved ratio and compress time to sweep/points/<method>@<ratio>.json (no model is saved).

    python -m stages.sweep_point svd-llm 0.2
    python -m stages.sweep_point svd-llm+update 0.2    # a preset with the closed-form update on
"""
import sys
import time

from svdcore.atomic import write_json
from svdcore.evaluation import evaluate_model
from svdcore.model import load_tokenizer, resolve_device
from stages.common import STARTED, peak_memory, run
from stages.io import point_file
from stages.sweep_common import compress_point


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
