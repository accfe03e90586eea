"""params.yaml: read it and check every value before any work starts.

Each check names the key, the value and what is allowed, so a user error is one readable line.
"""
from pathlib import Path

from .errors import UserError
from .decompose import ROUTES
from .methods import METRICS, PRESETS
from .zeroshot_data import TASKS as ZEROSHOT_TASKS

METHODS = tuple(PRESETS)
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _int(lo=None, hi=None):
    def check(key, v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise UserError(f"{key}: expected an integer, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise UserError(f"{key}: expected an integer {bounds}, got {v!r}")
    return check


def _ratio(key, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < 1):
        raise UserError(f"{key}: expected a number in [0, 1) (the fraction of decoder-linear "
                        f"parameters removed), got {v!r}")


def _choice(options):
    def check(key, v):
        if v not in options:
            raise UserError(f"{key}: expected one of {', '.join(options)}, got {v!r}")
    return check


def _optional(check, meaning):
    def optional(key, v):
        if v is not None:
            try:
                check(key, v)
            except UserError as e:
                raise UserError(f"{e} (or null for {meaning})") from None
    return optional


def _flag(key, v):
    if not isinstance(v, bool):
        raise UserError(f"{key}: expected true or false, got {v!r}")


def _exponent(key, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= 1):
        raise UserError(f"{key}: expected a number in (0, 1] (the exponent of mean |x|), got {v!r}")


def _text(key, v):
    if not isinstance(v, str) or not v.strip():
        raise UserError(f"{key}: expected a non-empty string, got {v!r}")


def _device(key, v):
    if not isinstance(v, str) or not (v in ("auto", "cpu", "cuda") or v.startswith("cuda:")):
        raise UserError(f"{key}: expected auto, cpu, cuda or cuda:N, got {v!r}")


def _text_list(key, v):
    if not isinstance(v, list) or not v:
        raise UserError(f"{key}: expected a non-empty list of dataset names, got {v!r}")
    for item in v:
        _text(key, item)


def _task_list(key, v):
    """A list of distinct zero-shot task names; empty turns the zero-shot evaluation off."""
    if not isinstance(v, list):
        raise UserError(f"{key}: expected a list of task names ({', '.join(ZEROSHOT_TASKS)}), "
                        f"or [] for none, got {v!r}")
    for item in v:
        if item not in ZEROSHOT_TASKS:
            raise UserError(f"{key}: unknown task {item!r}; expected some of {', '.join(ZEROSHOT_TASKS)}")
    if len(set(v)) != len(v):
        raise UserError(f"{key}: each task at most once, got {v!r}")


def _prompt_list(key, v):
    if not isinstance(v, list) or not all(isinstance(p, str) and p.strip() for p in v):
        raise UserError(f"{key}: expected a list of non-empty prompt strings (or [] for none), got {v!r}")


SCHEMA = {
    "device": _device,
    "model": {"name": _text, "dtype": _choice(DTYPES)},
    "calibration": {"dataset": _text, "samples": _int(1), "seqlen": _int(8), "seed": _int(0)},
    "covariances": {"batch_size": _int(1), "offload_activations": _flag},
    "compress": {"ratio": _ratio, "method": _choice(METHODS), "metric": _optional(_choice(METRICS), "the method's own"),
                 "alpha": _exponent, "update": _flag, "route": _choice(ROUTES), "rank_multiple": _int(1)},
    "evaluate": {"datasets": _text_list, "seqlen": _int(8), "max_windows": _int(0),
                 "batch_size": _int(1)},
    "zeroshot": {"tasks": _task_list, "limit": _int(0), "batch_size": _int(1)},
    "generate": {"prompts": _prompt_list, "max_new_tokens": _int(1)},
    "mlflow": {"experiment": _text},
}


def validate(params: dict, schema: dict = SCHEMA, prefix: str = "") -> None:
    """Raise UserError on the first unknown key, missing key or bad value."""
    if not isinstance(params, dict):
        raise UserError(f"{prefix.rstrip('.') or 'params.yaml'}: expected a mapping, got {params!r}")
    for key in params:
        if key not in schema:
            raise UserError(f"{prefix}{key}: unknown key; allowed here: {', '.join(schema)}")
    for key, rule in schema.items():
        if key not in params:
            raise UserError(f"{prefix}{key}: missing from params.yaml")
        if isinstance(rule, dict):
            validate(params[key], rule, f"{prefix}{key}.")
        else:
            rule(f"{prefix}{key}", params[key])


def load(path="params.yaml") -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: parameters file is missing")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    validate(params)
    return params
