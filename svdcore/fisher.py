"""FWSVD's statistic: how much the LM loss cares about each input feature of each linear.

d_j = sqrt(sum_i E[(dL/dW_ij)^2]), the expectation over calibration batches (the empirical
Fisher diagonal, summed over a weight column). Unlike the Grams this needs gradients, so the
whole model runs forward and backward on the device (no layer streaming): only the decoder
linears' weights require gradients, to keep the memory at one gradient per compressed weight.
"""
import torch

from .covariances import linear_shapes
from .errors import UserError
from .model import named_linears, weight_matrix
from .progress import progress as tqdm


def fisher_scales(model, windows: torch.Tensor, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Linear name -> d (in_features,), float64 on the CPU. The model is moved to `device` and
    back; its parameters' requires_grad flags are restored."""
    linears = named_linears(model)
    home = next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}
    sums = {name: torch.zeros(weight_matrix(m).shape[1], dtype=torch.float64, device=device)
            for name, m in linears.items()}
    batches = windows.split(batch_size)
    try:
        model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        for m in linears.values():
            m.weight.requires_grad_(True)
        for batch in tqdm(batches, desc="fisher", unit="batch"):
            batch = batch.to(device)
            loss = model(batch, labels=batch, use_cache=False).loss
            if not torch.isfinite(loss):
                raise UserError(f"fisher: the loss is {float(loss)} on a calibration batch; try model.dtype float32")
            loss.backward()
            for name, m in linears.items():
                # weight_matrix of the gradient: out x in for nn.Linear and Conv1D alike
                grad = m.weight.grad if isinstance(m, torch.nn.Linear) else m.weight.grad.T
                sums[name] += grad.double().square().sum(0)
                m.weight.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.to(home)
    return {name: (s / len(batches)).sqrt().cpu() for name, s in sums.items()}


def save_fisher(path, scales: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.float().contiguous() for k, v in sorted(scales.items())}, str(path))


def load_fisher(path, model) -> dict[str, torch.Tensor]:
    """The scales, checked against the model's linears."""
    from safetensors.torch import load_file

    try:
        scales = {k: v.double() for k, v in load_file(str(path)).items()}
    except Exception as e:  # missing, truncated or foreign file
        raise UserError(f"fisher: {path} is unreadable ({type(e).__name__}: {e})", artifact=path) from None
    shapes = linear_shapes(model)
    if set(scales) != set(shapes) or any(scales[n].shape != (shapes[n][1],) for n in shapes):
        raise UserError(f"fisher: {path} does not match this model's linears", artifact=path)
    return scales
