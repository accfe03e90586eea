"""Weight-only quantization of a compressed model's factors, by torchao through transformers'
TorchAoConfig: the factors are plain nn.Linear modules, so torchao quantizes each of them, and the
saved config.json keeps the quantization_config, so `from_pretrained(dir, trust_remote_code=True)`
reloads the quantized model with torch, transformers and torchao alone.

Schemes: `int8`, per-output-row int8 weights with float scales (torchao's Int8WeightOnlyConfig),
on the CPU and on GPUs. The embeddings, the head and the norms stay in the stored float dtype.
torchao 0.18's int4 weight-only kernels exist only for CUDA (and XPU/NPU): not offered yet.
"""
from pathlib import Path

import torch

from .errors import UserError
from .choices import QUANTIZE_SCHEMES as SCHEMES


def torchao_config(scheme: str):
    """The TorchAoConfig of a scheme (not `none`)."""
    from transformers import TorchAoConfig

    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    raise UserError(f"quantize.scheme: expected one of {', '.join(SCHEMES)}, got {scheme!r}")


def quantize_model(source, scheme: str, dtype: torch.dtype | str = "auto"):
    """Load the model saved in `source` (a compressed one, or a dense checkpoint directory) with its
    linears quantized by torchao while loading. `dtype`: what the unquantized tensors are kept in;
    auto is what `source` stores."""
    from transformers import AutoModelForCausalLM

    from .model import LOAD_ERRORS

    if not (Path(source) / "config.json").is_file():
        raise UserError(f"quantize: {source} holds no saved model (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True, dtype=dtype,
                                                     quantization_config=torchao_config(scheme))
    except (*LOAD_ERRORS, RuntimeError) as e:
        raise UserError(f"quantize: cannot load {source} quantized: {str(e).strip().splitlines()[0]}") from None
    return model.eval()


def quantized_linears(model) -> tuple[int, int]:
    """(quantized, all) nn.Linear modules of the model: what torchao converted, out of the total."""
    from torchao.utils import TorchAOBaseTensor

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(isinstance(m.weight, TorchAOBaseTensor) for m in linears), len(linears)


def save_quantized(source, out, scheme: str) -> tuple[int, int]:
    """quantize_model(source) saved with source's tokenizer to `out`, where from_pretrained reloads
    it; returns quantized_linears of it."""
    from transformers import AutoTokenizer

    model = quantize_model(source, scheme)
    counts = quantized_linears(model)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return counts
