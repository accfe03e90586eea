"""compute-sensitivity: the end-to-end cost of dropping each whitened component of every linear
(svdcore.sensitivity), for the sensitivity allocation; only when the method allocates by it (else
an empty file, so that switching methods costs nothing here). The sweep runs it with --always."""
from svdcore.atomic import atomic_path
from svdcore.methods import recipe_from_params
from svdcore.model import load_model, resolve_device, resolve_dtype
from svdcore.sensitivity import component_costs, save_costs
from stages.common import run_gated
from stages.io import load_calibration

OUT = "artifacts/sensitivity.safetensors"


def compute(params, out: str, always: bool) -> dict:
    device = resolve_device(params["device"])
    costs, sens = {}, params["sensitivity"]
    if always or recipe_from_params(params["compress"]).allocation == "sensitivity":
        windows = load_calibration()[:sens["samples"]]  # all of them when there are fewer
        model = load_model(params["model"]["name"], resolve_dtype(params["model"]["dtype"], device))
        costs = component_costs(model, windows, "artifacts/stats", device,
                                params["covariances"]["batch_size"], sens["seed"])
    with atomic_path(out) as tmp:
        save_costs(tmp, costs)
    return {"device": str(device), "matrices": len(costs)}


def work(params):
    return compute(params, OUT, always=False)


if __name__ == "__main__":
    run_gated("compute-sensitivity", __doc__, OUT, compute)
