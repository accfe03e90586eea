"""Reading the artifacts that stages hand each other, with clear errors when they are bad."""
from pathlib import Path

from svdcore.errors import UserError

CALIBRATION = Path("artifacts/calibration.safetensors")


def load_calibration():
    from safetensors.torch import load_file

    if not CALIBRATION.is_file():
        raise UserError(f"calibration: {CALIBRATION} is missing; run collect-calibration (dvc repro)")
    try:
        return load_file(str(CALIBRATION))["input_ids"]
    except Exception as e:  # truncated or foreign file
        raise UserError(f"calibration: {CALIBRATION} is unreadable ({e}); rerun collect-calibration") from None
