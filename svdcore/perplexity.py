"""Perplexity over consecutive windows (the GPTQ / SVD-LLM protocol)."""
import time

import torch
import torch.nn.functional as F
from .progress import progress as tqdm

from .errors import UserError


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int, device: torch.device, desc: str = "perplexity") -> dict:
    """exp(mean token NLL) over all windows; stops on non-finite logits naming the window."""
    model.to(device)
    nll_sum, tokens = 0.0, 0
    start = time.perf_counter()
    with tqdm(total=len(windows), desc=desc, unit="window") as bar:
        for first in range(0, len(windows), batch_size):
            batch = windows[first : first + batch_size].to(device)
            logits = model(batch, use_cache=False).logits.float()
            if not torch.isfinite(logits).all():
                bad = first + int((~torch.isfinite(logits)).flatten(1).any(1).nonzero()[0])
                raise UserError(f"{desc}: non-finite logits in window {bad}; the model is numerically broken")
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            nll_sum += nll.item()
            tokens += batch[:, 1:].numel()
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    mean = nll_sum / tokens
    return {"ppl": float(torch.tensor(mean).exp()), "nll": mean, "windows": len(windows),
            "tokens": tokens, "seconds": seconds, "tokens_per_s": windows.numel() / seconds}
