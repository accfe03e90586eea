"""evaluate: the compressed model against the cached dense baseline; metrics + one MLflow run."""
import time

from svdcore.atomic import read_json, write_json
from svdcore.errors import UserError
from svdcore.evaluation import directory_bytes, evaluate_model, linear_parameters
from svdcore.lowrank import load_compressed
from svdcore.model import resolve_device, resolve_dtype
from svdcore.tracking import log_run
from stages.common import STAGE_METRICS, STARTED, peak_memory, run
from stages.truncate_and_update import MODEL_DIR, REPORT

OUT = "metrics/evaluate.json"
UPSTREAM = ("collect-calibration", "compute-covariances", "compute-spectra", "compute-fisher", "allocate-ranks",
            "truncate-and-update", "evaluate-dense")


def work(params):
    from transformers import AutoTokenizer

    device = resolve_device(params["device"])  # first: a bad device fails before any slow work
    ev = params["evaluate"]
    dense = read_json("metrics/dense.json", "dense baseline")
    ranks = read_json("artifacts/ranks.json", "ranks")
    report = read_json(REPORT, "compression report")
    model = load_compressed(MODEL_DIR, dtype=resolve_dtype(params["model"]["dtype"], device))
    if linear_parameters(model) != ranks["linear_params_compressed"]:
        raise UserError(f"{MODEL_DIR} does not hold the ranks of artifacts/ranks.json; rerun truncate-and-update")
    compressed, runtime = evaluate_model(model, AutoTokenizer.from_pretrained(MODEL_DIR), ev["datasets"],
                                         ev["seqlen"], ev["max_windows"], ev["batch_size"],
                                         device, "compressed")
    compressed["bytes_on_disk"] = directory_bytes(MODEL_DIR)
    metrics = {
        "dense": dense,
        "compressed": compressed,
        "ratio": {"target": params["compress"]["ratio"],
                  "linears": 1 - compressed["params_linears"] / dense["params_linears"],
                  "model": 1 - compressed["params_total"] / dense["params_total"]},
        "whitening_routes": {"matrices": report["route_counts"], "grams": report["gram_route_counts"]},
    }
    write_json(OUT, metrics)

    stages = {name: read_json(STAGE_METRICS / f"{name}.json", f"{name} timings") for name in UPSTREAM}
    stages["evaluate"] = {**runtime, "wall_s": time.perf_counter() - STARTED, **peak_memory()}
    log_run(params["mlflow"]["experiment"], params, {**metrics, "stages": stages},
            [OUT, "artifacts/ranks.json", REPORT])
    return runtime


if __name__ == "__main__":
    run("evaluate", work)
