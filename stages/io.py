"""Reading the artifacts that stages hand each other, with clear errors when they are bad."""
from pathlib import Path

from svdcore.atomic import read_json
from svdcore.errors import UserError
from svdcore.model import resolve_device, resolve_dtype
from svdcore.params import Params

CALIBRATION = Path("artifacts/calibration.safetensors")
MODEL_DIR = "models/compressed"  # truncate-and-update's model, read by evaluate and quantize
REPORT = "metrics/compress.json"  # truncate-and-update's compression report
DENSE = "metrics/dense.json"  # evaluate-dense's metrics, read by evaluate and the sweep report
DENSE_SAMPLES = "metrics/dense-samples.json"  # evaluate-dense's generation samples, read by evaluate
SWEEP_DESCRIPTION = "compress.json"  # beside a sweep point's model: recipe, allocation, ratio achieved, report


def sweep_model_dir(method: str, ratio: float) -> str:
    """A sweep point's compressed model (sweep-compress) with its compress.json, read by the point's
    perplexity and zero-shot stages."""
    return f"sweep/models/{method}@{ratio}"


def sweep_compress_timings(method: str, ratio: float) -> str:
    """A sweep point's compression wall time (sweep-compress), read by the sweep report only."""
    return f"sweep/timings/compress/{method}@{ratio}.json"


def point_file(method: str, ratio: float) -> str:
    """A sweep point's perplexities (sweep-point), read by the sweep report."""
    return f"sweep/points/{method}@{ratio}.json"


def zeroshot_file(method: str, ratio: float) -> str:
    """A sweep point's zero-shot scores (sweep-zeroshot), read by the sweep report."""
    return f"sweep/zeroshot/{method}@{ratio}.json"


def load_calibration():
    from safetensors.torch import load_file

    if not CALIBRATION.is_file():
        raise UserError(f"calibration: {CALIBRATION} is missing", artifact=CALIBRATION)
    try:
        return load_file(str(CALIBRATION))["input_ids"]
    except Exception as e:  # truncated or foreign file
        raise UserError(f"calibration: {CALIBRATION} is unreadable ({e})", artifact=CALIBRATION) from None


def load_sweep_model(params: Params, method: str, ratio: float):
    """(model, tokenizer, description, device): a sweep point's saved model, loaded as evaluate loads
    models/compressed (computing in model.dtype), and its compress.json."""
    from transformers import AutoTokenizer

    from svdcore.lowrank import load_compressed  # here: the stages that load no model skip transformers' models

    device = resolve_device(params.device)
    directory = sweep_model_dir(method, ratio)
    description = read_json(f"{directory}/{SWEEP_DESCRIPTION}", f"sweep point {method}@{ratio}'s compression")
    model = load_compressed(directory, dtype=resolve_dtype(params.model.dtype, device))
    return model, AutoTokenizer.from_pretrained(directory), description, device
