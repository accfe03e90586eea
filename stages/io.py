"""Reading the artifacts that stages hand each other, with clear errors when they are bad."""
from pathlib import Path

from svdcore.errors import UserError

CALIBRATION = Path("artifacts/calibration.safetensors")
MODEL_DIR = "models/compressed"  # truncate-and-update's model, read by evaluate and quantize
REPORT = "metrics/compress.json"  # truncate-and-update's compression report


def point_file(method: str, ratio: float) -> str:
    """A sweep point's perplexities (sweep-point), read by the sweep report."""
    return f"sweep/points/{method}@{ratio}.json"


def zeroshot_file(method: str, ratio: float) -> str:
    """A sweep point's zero-shot scores (sweep-zeroshot), read by the sweep report."""
    return f"sweep/zeroshot/{method}@{ratio}.json"


def load_calibration():
    from safetensors.torch import load_file

    if not CALIBRATION.is_file():
        raise UserError(f"calibration: {CALIBRATION} is missing; run collect-calibration (dvc repro)")
    try:
        return load_file(str(CALIBRATION))["input_ids"]
    except Exception as e:  # truncated or foreign file
        raise UserError(f"calibration: {CALIBRATION} is unreadable ({e}); rerun collect-calibration") from None
