"""compute-covariances: one streamed pass of the original model, a Gram per linear input."""
from concurrent.futures import ThreadPoolExecutor

from svdcore.atomic import atomic_path, write_json
from svdcore.compress import collect_grams
from svdcore.covariances import linear_shapes, save_layer
from svdcore.errors import UserError
from svdcore.model import load_model, resolve_device, resolve_dtype
from stages.common import run
from stages.io import load_calibration

STATS = "artifacts/stats"
LINEARS = "artifacts/linears.json"


def work(params):
    device = resolve_device(params["device"])  # first: a bad device fails before any slow work
    windows = load_calibration()
    model = load_model(params["model"]["name"], resolve_dtype(params["model"]["dtype"], device))
    vocab = model.get_input_embeddings().num_embeddings
    if windows.numel() and int(windows.max()) >= vocab:
        raise UserError(f"calibration: token id {int(windows.max())} in artifacts/calibration.safetensors is outside "
                        f"the model's vocabulary ({vocab}); the windows were made with another tokenizer, "
                        f"rerun collect-calibration")
    cov = params["covariances"]
    with atomic_path(STATS, is_dir=True) as tmp, ThreadPoolExecutor(1) as writer:
        pending = []

        def save(index, stats):  # written by a worker while the next layer runs; one write in flight at most
            while pending:
                pending.pop().result()
            pending.append(writer.submit(save_layer, tmp, index, stats))

        collect_grams(model, windows, cov["batch_size"], device, save, offload=cov["offload_activations"])
        for job in pending:
            job.result()
    write_json(LINEARS, {"shapes": linear_shapes(model), "tokens": windows.numel()})
    return {"device": str(device), "tokens": windows.numel()}


if __name__ == "__main__":
    run("compute-covariances", work)
