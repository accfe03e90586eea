"""Scripts that print measured figures (`python -m bench.<name>`). Importing the stages package
quiets the warnings importing transformers brings from torchao, for the benches as for the stages
(stages/__init__.py says which and why)."""
import stages  # noqa: F401
