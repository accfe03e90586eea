"""evaluate-dense: the uncompressed baseline, computed once per model and evaluation setting."""
from pathlib import Path

from svdcore.atomic import write_json
from svdcore.evaluation import directory_bytes, evaluate_model
from svdcore.model import load_model, load_tokenizer, resolve, resolve_device, resolve_dtype, weight_bytes
from stages.common import run

OUT = "metrics/dense.json"


def work(params):
    device = resolve_device(params["device"])  # first: a bad device fails before any slow work
    ev = params["evaluate"]
    name = params["model"]["name"]
    model = load_model(name, resolve_dtype(params["model"]["dtype"], device))
    metrics, runtime = evaluate_model(model, load_tokenizer(name), ev["datasets"], ev["seqlen"], ev["max_windows"],
                                      ev["batch_size"], device, "dense")
    source = resolve(name)
    local = Path(source.path) / (source.gguf_file or "")
    if local.exists():  # a hub id has no local file to measure
        metrics["bytes_source"] = directory_bytes(local)
    metrics["bytes_weights"] = weight_bytes(model)
    write_json(OUT, metrics)
    return runtime


if __name__ == "__main__":
    run("evaluate-dense", work)
