"""compute-fisher: FWSVD's Fisher scales, only when the method uses the fisher metric (else an
empty file, so that switching methods costs nothing here). The sweep runs it with --always."""
from svdcore.atomic import atomic_path
from svdcore.fisher import fisher_scales, save_fisher
from svdcore.methods import recipe_from_params
from svdcore.model import load_model, resolve_device, resolve_dtype
from stages.common import run_gated
from stages.io import load_calibration

OUT = "artifacts/fisher.safetensors"


def compute(params, out: str, always: bool) -> dict:
    device = resolve_device(params["device"])
    scales = {}
    if always or recipe_from_params(params["compress"]).needs_fisher:
        model = load_model(params["model"]["name"], resolve_dtype(params["model"]["dtype"], device))
        scales = fisher_scales(model, load_calibration(), params["covariances"]["batch_size"], device)
    with atomic_path(out) as tmp:
        save_fisher(tmp, scales)
    return {"device": str(device), "matrices": len(scales)}


def work(params):
    return compute(params, OUT, always=False)


if __name__ == "__main__":
    run_gated("compute-fisher", __doc__, OUT, compute)
