"""sweep zero-shot: one method at one ratio, compressed as its sweep point is, scored zero-shot
by lm-eval on the tasks of params.yaml's `zeroshot` -> sweep/zeroshot/<method>@<ratio>.json.
A stage of its own so that a change of tasks or limit leaves the perplexity points cached.

    python -m stages.sweep_zeroshot svd-llm 0.2
"""
import sys
import time

from svdcore.atomic import write_json
from svdcore.model import load_tokenizer, resolve_device
from svdcore.zeroshot import evaluate_zeroshot
from stages.common import STARTED, peak_memory, run
from stages.io import zeroshot_file
from stages.sweep_common import compress_point


def work(params, method: str, ratio: float) -> dict:
    model, point = compress_point(params, method, ratio)
    zs = params["zeroshot"]
    start = time.perf_counter()
    scores, runtime = evaluate_zeroshot(model, load_tokenizer(params["model"]["name"]), zs["tasks"], zs["limit"],
                                        zs["batch_size"], resolve_device(params["device"]))
    write_json(zeroshot_file(method, ratio), {
        "method": method, "ratio": ratio, "zeroshot": scores, **runtime,
        "ratio_achieved": point["ratio_achieved"], "compress_s": point["compress_s"],
        "zeroshot_s": round(time.perf_counter() - start, 2),
        "wall_s": round(time.perf_counter() - STARTED, 2), **peak_memory()})
    return {}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    run("sweep-zeroshot", lambda params: work(params, sys.argv[1], float(sys.argv[2])), timings_dir=None)
