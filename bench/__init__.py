"""Scripts that print measured figures (`python -m bench.<name>`). Like the stages, they quiet the
warnings importing transformers brings from torchao (stages/__init__.py says which and why)."""
import logging

for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
