"""The pipeline's stage entry points (`python -m stages.<name>`, as dvc.yaml runs them), and the
few modules they share (common, io, allocation, compression, tracking, sweep_tables); no stage imports
another. project.py is not a stage's: the scratch copy of the project that bench.ratio_change and the
tests run `dvc repro` in.

Importing transformers imports torchao when it is installed (the quantize stage's library), and
that logs warnings that concern no stage: on a CPU build of torch, torchao's CUDA-only extensions
fail to load, and torch notes that torchao still registers its enums the deprecated way. They
would be the first lines of every stage's output, before any real error; quieted here, for the
stages only (the library leaves its users' logging alone).
"""
import logging

for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
