"""sweep zero-shot: one method at one ratio, its saved model (sweep-compress) scored zero-shot by
lm-eval on the tasks of params.yaml's `zeroshot` -> sweep/zeroshot/<method>@<ratio>.json. A stage
of its own so that a change of tasks or limit leaves the perplexity points cached; it compresses
nothing.

    python -m stages.sweep_zeroshot svd-llm 0.2
"""
import sys
import time

from svdcore.atomic import write_json
from svdcore.evaluation import measure
from svdcore.model import resolve_dtype
from svdcore.spread import spread_model
from stages.common import peak_memory, run, wall_s
from stages.io import load_sweep_model, sweep_model_dir, zeroshot_file


def work(params, method: str, ratio: float) -> dict:
    model, tokenizer, point, device = load_sweep_model(params, method, ratio)
    dtype = resolve_dtype(params.model.dtype, device)
    spread = lambda: spread_model(sweep_model_dir(method, ratio), dtype, params.evaluate.max_memory, device, True)  # noqa: E731
    start = time.perf_counter()
    metrics, runtime = measure(model, tokenizer, params, device, f"{method}@{ratio}", what=("zeroshot",), spread=spread)
    write_json(zeroshot_file(method, ratio), {
        "method": method, "ratio": ratio, "zeroshot": metrics["zeroshot"], **runtime,
        "ratio_achieved": point["ratio_achieved"], "zeroshot_s": round(time.perf_counter() - start, 2),
        "wall_s": wall_s(), **peak_memory()})
    return {}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    run("sweep-zeroshot", lambda params: work(params, sys.argv[1], float(sys.argv[2])), timings_dir=None)
