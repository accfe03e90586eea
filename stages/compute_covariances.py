"""compute-covariances: one streamed pass of the original model, a Gram per linear input.

With more than one process asked for (`distributed.nproc_per_node` x `.nnodes`) the stage starts
itself again under torchrun (stages.common.under_torchrun); each process streams its part of every
batch, and every layer's statistics are summed over the processes before rank 0 alone writes them
(svdcore.distributed). With `model.load: by-layer` the decoder layers are read from the
checkpoint one at a time as the pass reaches them (svdcore.checkpoint)."""
from concurrent.futures import ThreadPoolExecutor

from svdcore.atomic import atomic_path, write_json
from svdcore.checkpoint import open_model
from svdcore import distributed
from svdcore.compress import collect_grams
from svdcore.covariances import linear_shapes, save_layer
from svdcore.errors import UserError
from svdcore.model import resolve_device, resolve_dtype
from svdcore.params import Covariances
from stages.common import run, under_torchrun
from stages.io import load_calibration

STATS = "artifacts/stats"
LINEARS = "artifacts/linears.json"


def work(params):
    device = resolve_device(params.device)  # first: a bad device fails before any slow work
    under_torchrun(params, "stages.compute_covariances")
    windows = load_calibration()
    dtype = resolve_dtype(params.model.dtype, device)
    device = distributed.join(device)
    try:
        model, by_layer = open_model(params.model.name, dtype, params.model.load, device)
        vocab = model.get_input_embeddings().num_embeddings
        if windows.numel() and int(windows.max()) >= vocab:
            raise UserError(f"calibration: token id {int(windows.max())} in artifacts/calibration.safetensors is "
                            f"outside the model's vocabulary ({vocab}); the windows were made with another "
                            f"tokenizer, rerun collect-calibration")
        cov = params.covariances
        if distributed.env_rank() == 0:
            with atomic_path(STATS, is_dir=True) as tmp:
                collect(model, windows, cov, device, tmp, by_layer)
            write_json(LINEARS, {"shapes": linear_shapes(model), "tokens": windows.numel()})
        else:
            collect(model, windows, cov, device, None, by_layer)
    finally:
        distributed.leave()
    return {"device": str(device), "tokens": windows.numel(), "processes": distributed.env_world_size(),
            "rank": distributed.env_rank()}


def collect(model, windows, cov: Covariances, device, out, by_layer=None) -> None:
    """This process's part of the statistics pass (the loop sums each layer's statistics over the
    processes), written to `out` (None: a process that writes nothing)."""
    with ThreadPoolExecutor(1) as writer:
        pending = []

        def save(index, stats):  # written by a worker while the next layer runs; one write in flight at most
            while pending:
                pending.pop().result()
            if out is not None:
                pending.append(writer.submit(save_layer, out, index, stats))

        collect_grams(model, *distributed.shard(windows, cov.batch_size), device, save,
                      offload=cov.offload_activations, by_layer=by_layer)
        for job in pending:
            job.result()


if __name__ == "__main__":
    run("compute-covariances", work)
