"""quantize (optional, quantize.scheme; none by default): the compressed model's factors quantized
weight-only by torchao (svdcore.quantize), saved to models/quantized so that from_pretrained
reloads it; the saved model is loaded back and scored on the evaluation texts, and its bytes on
disk and perplexities go to metrics/quantize.json. With scheme none the folder holds a note only."""
from svdcore.atomic import atomic_path, write_json
from svdcore.model import resolve_device, resolve_dtype
from stages.common import run
from stages.io import MODEL_DIR

QUANTIZED = "models/quantized"
OUT = "metrics/quantize.json"


def work(params):
    device = resolve_device(params.device)  # first: a bad device fails before any slow work
    scheme = params.quantize.scheme
    if scheme == "none":
        with atomic_path(QUANTIZED, is_dir=True) as tmp:
            (tmp / "README.md").write_text("quantize.scheme is none in params.yaml: no quantized model here.\n")
        write_json(OUT, {"scheme": scheme})
        return {"scheme": scheme}
    # imported only for a scheme: with none, the stage costs no transformers or torchao import (2.5 s)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from svdcore.evaluation import directory_bytes, measure
    from svdcore.quantize import save_quantized

    with atomic_path(QUANTIZED, is_dir=True) as tmp:
        quantized, linears = save_quantized(MODEL_DIR, tmp, scheme)
    # scored as a user gets it: loaded back from disk, computing in model.dtype as the evaluate stage does
    tokenizer = AutoTokenizer.from_pretrained(QUANTIZED)
    model = AutoModelForCausalLM.from_pretrained(QUANTIZED, trust_remote_code=True,
                                                 dtype=resolve_dtype(params.model.dtype, device)).eval()
    metrics, runtime = measure(model, tokenizer, params, device, f"quantized {scheme}", what=("perplexity",))
    write_json(OUT, {"scheme": scheme, "quantized_linears": quantized, "linears": linears,
                     "bytes_on_disk": directory_bytes(QUANTIZED), "compressed_bytes_on_disk": directory_bytes(MODEL_DIR),
                     "ppl": metrics["ppl"], "windows": metrics["windows"]})
    return {"scheme": scheme, **runtime}


if __name__ == "__main__":
    run("quantize", work)
