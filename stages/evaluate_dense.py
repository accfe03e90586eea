"""evaluate-dense: the uncompressed baseline, computed once per model and evaluation setting:
perplexity, zero-shot accuracy, and the generation samples the compressed model is shown beside."""
from pathlib import Path

from svdcore.atomic import write_json
from svdcore.evaluation import directory_bytes, evaluate_model
from svdcore.generation import generate_samples
from svdcore.model import load_model, load_tokenizer, resolve, resolve_device, resolve_dtype, weight_bytes
from svdcore.zeroshot import evaluate_zeroshot
from stages.common import run

OUT = "metrics/dense.json"
SAMPLES = "metrics/dense-samples.json"


def work(params):
    device = resolve_device(params["device"])  # first: a bad device fails before any slow work
    ev, zs, gen = params["evaluate"], params["zeroshot"], params["generate"]
    name = params["model"]["name"]
    model = load_model(name, resolve_dtype(params["model"]["dtype"], device))
    tokenizer = load_tokenizer(name)
    metrics, runtime = evaluate_model(model, tokenizer, ev["datasets"], ev["seqlen"], ev["max_windows"],
                                      ev["batch_size"], device, "dense")
    metrics["zeroshot"], zeroshot_runtime = evaluate_zeroshot(model, tokenizer, zs["tasks"], zs["limit"],
                                                              zs["batch_size"], device)
    runtime.update(zeroshot_runtime)
    source = resolve(name)
    local = Path(source.path) / (source.gguf_file or "")
    if local.exists():  # a hub id has no local file to measure
        metrics["bytes_source"] = directory_bytes(local)
    metrics["bytes_weights"] = weight_bytes(model)
    write_json(OUT, metrics)
    write_json(SAMPLES, {"max_new_tokens": gen["max_new_tokens"],
                         "samples": generate_samples(model, tokenizer, gen["prompts"], gen["max_new_tokens"], device)})
    return runtime


if __name__ == "__main__":
    run("evaluate-dense", work)
