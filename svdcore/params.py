"""params.yaml: read it and check every value before any work starts.

Each check names the key, the value and what is allowed, so a user error is one readable line.
"""
from pathlib import Path

from .errors import UserError
from .decompose import ROUTES
from .methods import ALLOCATIONS, METRICS, PRESETS

# the choices params.yaml offers; the modules that act on them import them from here, so that
# reading params.yaml never imports what it configures (a stage depends on what it imports)
METHODS = tuple(PRESETS)
DTYPES = ("auto", "float32", "bfloat16", "float16")
SAMPLERS = ("tokens", "chars")  # calibration.sampler (svdcore.calibration)
QUANTIZE_SCHEMES = ("none", "int8")  # quantize.scheme (svdcore.quantize)
# zeroshot.tasks: lm-eval's names of the seven tasks the SVD-LLM papers report (svdcore.zeroshot_data)
ZEROSHOT_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "openbookqa", "mathqa")


def _int(lo=None, hi=None):
    def check(key, v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise UserError(f"{key}: expected an integer, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise UserError(f"{key}: expected an integer {bounds}, got {v!r}")
    return check


def _share(key, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < 1):
        raise UserError(f"{key}: expected a number in [0, 1) (the share of each rank given to the first stage), got {v!r}")


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


def _anchor(key, v):
    if v is None or v is False:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v <= 1):
        raise UserError(f"{key}: expected null (the method's own), false (off: the dense model's statistics) or a "
                        f"blend beta in [0, 1] (0: whitening on the shifted inputs, 1: fit the dense outputs), got {v!r}")


def _learning_rate(key, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= 1):
        raise UserError(f"{key}: expected a learning rate in (0, 1], got {v!r} (YAML reads 2e-4 as text: write 2.0e-4)")


def _holdout(key, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v <= 0.5):
        raise UserError(f"{key}: expected a share of the calibration windows in [0, 0.5] (0: none held out, "
                        f"no early stopping), got {v!r}")


def _text(key, v):
    if not isinstance(v, str) or not v.strip():
        raise UserError(f"{key}: expected a non-empty string, got {v!r}")


def _device(key, v):
    if not isinstance(v, str) or not (v in ("auto", "cpu", "cuda") or v.startswith("cuda:")):
        raise UserError(f"{key}: expected auto, cpu, cuda or cuda:N, got {v!r}")


def _ratio_list(key, v):
    if not isinstance(v, list) or not v:
        raise UserError(f"{key}: expected a non-empty list of ratios, got {v!r}")
    for item in v:
        _ratio(key, item)
        if item == 0:
            raise UserError(f"{key}: 0 is the dense model, already in the report; expected ratios in (0, 1)")


def _text_list(key, v):
    if not isinstance(v, list) or not v:
        raise UserError(f"{key}: expected a non-empty list of names, got {v!r}")
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
    "calibration": {"dataset": _text, "sampler": _choice(SAMPLERS), "samples": _int(1), "seqlen": _int(8),
                    "seed": _int(0)},
    "covariances": {"batch_size": _int(1), "offload_activations": _flag},
    "compress": {"ratio": _ratio, "method": _choice(METHODS), "metric": _optional(_choice(METRICS), "the method's own"),
                 "alpha": _exponent, "update": _flag,
                 "allocation": _optional(_choice(ALLOCATIONS), "the method's own"),
                 "residual_fraction": _optional(_share, "the method's own"),
                 "residual_metric": _optional(_choice(METRICS), "the method's own"),
                 "last_layers": _optional(_int(1), "the rule of svdcore.methods.last_layers_rule"),
                 "route": _choice(ROUTES), "rank_multiple": _int(1), "anchor": _anchor, "save_dtype": _choice(DTYPES),
                 "refine": {"steps": _optional(_int(0), "the method's own"), "lr": _learning_rate,
                            "holdout": _holdout}},
    "quantize": {"scheme": _choice(QUANTIZE_SCHEMES)},
    "sensitivity": {"samples": _int(1), "seed": _int(0)},
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


def sweep_compress(compress: dict, method: str, ratio) -> dict:
    """The compress params of one sweep point: `method` is a preset, or a preset with the
    closed-form update ("svd-llm+update"); its knobs are the preset's (a sweep compares presets),
    the rest (route, rank_multiple, alpha) are the main params'."""
    name, plus, extra = method.partition("+")
    if plus and extra != "update":
        raise UserError(f"sweep methods: {method!r}: expected a preset, optionally followed by +update")
    _choice(METHODS)("sweep methods", name)
    _ratio("sweep ratios", ratio)
    return {**compress, "method": name, "ratio": ratio, "metric": None, "allocation": None, "update": bool(plus),
            "residual_fraction": None, "residual_metric": None, "last_layers": None, "anchor": None,
            "refine": {**compress.get("refine", {}), "steps": None}}


def validate_sweep(sweep: dict) -> None:
    """sweep/params.yaml: methods (sweep_compress), ratios in (0, 1), the methods also scored
    zero-shot (some of the methods), the MLflow experiment."""
    validate(sweep, {"methods": _text_list, "ratios": _ratio_list, "zeroshot_methods": _text_list,
                     "experiment": _text}, "sweep ")
    for method in sweep["methods"]:
        sweep_compress({}, method, sweep["ratios"][0])
    stray = [m for m in sweep["zeroshot_methods"] if m not in sweep["methods"]]
    if stray:
        raise UserError(f"sweep: zeroshot_methods must be some of methods {sweep['methods']}, got {stray}")
    if len(set(sweep["methods"])) < len(sweep["methods"]) or len(set(sweep["ratios"])) < len(sweep["ratios"]):
        raise UserError(f"sweep: methods and ratios must not repeat, got {sweep['methods']} x {sweep['ratios']}")


def load(path="params.yaml", check=validate) -> dict:
    """Read a parameters file and `check` it (params.yaml's schema, or validate_sweep)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: parameters file is missing")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    check(params)
    return params
