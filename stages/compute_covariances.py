"""compute-covariances: one streamed pass of the original model, a Gram per linear input."""
from svdcore.atomic import atomic_path, write_json
from svdcore.covariances import collect_grams, linear_shapes, save_layer
from svdcore.model import load_model, resolve_device
from stages.common import run
from stages.io import load_calibration

STATS = "artifacts/stats"
LINEARS = "artifacts/linears.json"


def work(params):
    model = load_model(params["model"]["name"], params["model"]["dtype"])
    windows = load_calibration()
    device = resolve_device(params["device"])
    with atomic_path(STATS, is_dir=True) as tmp:
        collect_grams(model, windows, params["covariances"]["batch_size"], device,
                      lambda index, grams, shares, tokens: save_layer(tmp, index, grams, shares, tokens))
    write_json(LINEARS, {"shapes": linear_shapes(model), "tokens": windows.numel()})
    return {"device": str(device), "tokens": windows.numel()}


if __name__ == "__main__":
    run("compute-covariances", work)
