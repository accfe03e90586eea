"""A model spread over the devices there are, for what needs the whole model at once (zero-shot
scoring, generation) when it does not fit one device: transformers' `device_map="auto"`, which
accelerate fills with whole decoder layers, the GPUs first, then CPU memory, then a temporary
offload folder on disk. Perplexity needs none of this: it streams the layers (svdcore.perplexity).
"""
import contextlib
import tempfile

import torch


def accelerate_memory(max_memory: dict[str, str], device: torch.device, free: dict | None = None) -> dict:
    """What accelerate may place on each device: what is free there (`free`, else accelerate
    measures it), the GPUs left out when `device` is the CPU, and evaluate.max_memory's caps
    ({"cuda:0": "70GiB", "cpu": "100GiB"}, as accelerate names them: {0: ..., "cpu": ...}) in place
    of what is free on the devices it names. A device it does not name keeps what is free there
    (accelerate alone would use only the devices named)."""
    if free is None:
        from accelerate.utils import get_max_memory

        free = get_max_memory()
    room = {key: value for key, value in free.items() if device.type != "cpu" or key == "cpu"}
    caps = {int(k.removeprefix("cuda:")) if k.startswith("cuda:") else k: v for k, v in max_memory.items()}
    return {**room, **caps}


@contextlib.contextmanager
def spread_model(name: str, dtype: torch.dtype, max_memory: dict[str, str], device: torch.device,
                 compressed: bool = False):
    """The model `name` (a model.name, or with `compressed` a folder saved by svdcore) loaded over
    the device map (the GPUs, unless `device` is the CPU, then CPU memory, within `max_memory`:
    accelerate_memory), in eval mode; what did not fit is offloaded to a temporary folder, removed
    when the block ends."""
    from transformers import AutoModelForCausalLM

    from .checkpoint import checkpoint_directory
    from .errors import UserError
    from .lowrank import compressed_class

    with tempfile.TemporaryDirectory(prefix="svdcore-offload-") as offload:
        kwargs = dict(dtype=dtype, device_map="auto", max_memory=accelerate_memory(max_memory, device),
                      offload_folder=offload)
        try:
            if compressed:
                config, cls = compressed_class(name)
                model = cls.from_pretrained(name, config=config, **kwargs)
            else:  # a GGUF: svdcore's safetensors copy of it
                model = AutoModelForCausalLM.from_pretrained(checkpoint_directory(name, dtype), **kwargs)
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: out of memory while placing it
            raise UserError(f"evaluate.device_map: cannot spread {name} over the devices: "
                            f"{str(e).strip().splitlines()[0]}") from None
        model.eval()
        yield model


def input_device(model, device: torch.device) -> torch.device:
    """Where a model's inputs go: `device`, or for a spread model the device of its first module
    (accelerate's hooks carry the activations on from there)."""
    placement = getattr(model, "hf_device_map", None)
    if not placement:
        return device
    first = next(iter(placement.values()))
    if isinstance(first, int):
        return torch.device("cuda", first)
    return torch.device("cpu") if first in ("cpu", "disk") else torch.device(first)


def is_spread(model) -> bool:
    """Whether accelerate placed the model (it must then stay where it is)."""
    return bool(getattr(model, "hf_device_map", None))
