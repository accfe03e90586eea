"""The choices params.yaml offers, named once: the modules that act on them and svdcore.params,
which checks them, import them from here (so that acting on a choice never imports the checker)."""
from .decompose import ROUTES  # noqa: F401  (compress.route)
from .methods import ALLOCATIONS, METRICS, PRESETS  # noqa: F401  (compress.allocation, .metric, .method)

METHODS = tuple(PRESETS)
DTYPES = ("auto", "float32", "bfloat16", "float16")  # model.dtype, compress.save_dtype
LOADS = ("whole", "by-layer")  # model.load (svdcore.checkpoint)
DEVICE_MAPS = ("none", "auto")  # evaluate.device_map (svdcore.spread)
SAMPLERS = ("tokens", "chars")  # calibration.sampler (svdcore.calibration)
QUANTIZE_SCHEMES = ("none", "int8")  # quantize.scheme (svdcore.quantize)
# zeroshot.tasks: lm-eval's names of the seven tasks the SVD-LLM papers report (svdcore.zeroshot_data)
ZEROSHOT_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "openbookqa", "mathqa")
