"""Zero-shot accuracy as the SVD-LLM papers report it: lm-eval (lm-evaluation-harness) scoring
the model in memory on its own task definitions, reading the splits shipped in data/zeroshot/.

lm-eval is imported inside the functions: the library stays importable with torch and
transformers alone.
"""
import contextlib
import logging
import math
import time
from fractions import Fraction
from pathlib import Path

from .errors import UserError
from .spread import is_spread
from .zeroshot_data import zeroshot_dir

TASK_DIR = Path(__file__).with_name("zeroshot_tasks")


def task_manager(data_dir=None):
    """lm-eval's index of our seven task YAMLs only (its own 200-odd task folders are not
    scanned: that costs seconds, and their names would clash with ours). `data_dir` reaches
    the loaders through the tasks' metadata."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                       metadata={"data_dir": str(data_dir or zeroshot_dir())})


def chance_accuracy(samples: list[dict]) -> float:
    """Expected accuracy of picking a choice uniformly at random: mean of 1 / (choices per item)."""
    return float(sum(Fraction(1, len(sample["arguments"])) for sample in samples) / len(samples))


def task_scores(results: dict, task: str) -> dict:
    """One task's figures from lm-eval's results: acc (and acc_norm where lm-eval reports it),
    their standard errors, items scored and in the split, and the chance level."""
    figures = results["results"][task]
    scores = {}
    for metric in ("acc", "acc_norm"):
        if f"{metric},none" in figures:
            scores[metric] = figures[f"{metric},none"]
            stderr = figures.get(f"{metric}_stderr,none")
            if isinstance(stderr, (int, float)) and math.isfinite(stderr):
                scores[f"{metric}_stderr"] = stderr
    counts = results["n-samples"][task]
    scores.update(items=counts["effective"], items_in_split=counts["original"],
                  chance=chance_accuracy(results["samples"][task]))
    return scores


def mean_scores(per_task: dict) -> dict:
    """Means over the tasks. lm-eval reports no acc_norm for WinoGrande: its two options are
    contexts that score one shared continuation, so dividing by the length of what is scored
    would not change the pick. Its acc stands in for acc_norm in the acc_norm mean."""
    if not per_task:
        return {}
    tasks = per_task.values()
    return {"acc": sum(s["acc"] for s in tasks) / len(tasks),
            "acc_norm": sum(s.get("acc_norm", s["acc"]) for s in tasks) / len(tasks),
            "chance": sum(s["chance"] for s in tasks) / len(tasks)}


def check_same_protocol(dense: dict, tasks: list[str], limit: int, source: str) -> None:
    """The dense scores sit beside the compressed ones only if both saw the same items.
    (Task order is not compared: the JSON on disk has its keys sorted.) `source`: the file `dense`
    was read from."""
    scored = sorted(dense.get("tasks", {}))
    if dense.get("limit") != limit or scored != sorted(tasks):
        raise UserError(f"zeroshot: {source} was scored on tasks {scored} with limit {dense.get('limit')!r}, "
                        f"params.yaml asks for {sorted(tasks)} with limit {limit}", artifact=source)


def evaluate_zeroshot(model, tokenizer, tasks: list[str], limit: int, batch_size: int, device,
                      data_dir=None) -> tuple[dict, dict]:
    """(deterministic metrics, runtime figures): each task scored zero-shot by lm-eval on the
    first `limit` items of its split (0 = all), one task at a time so that each has a wall time.
    No tasks: the same layout with nothing in it, and lm-eval is not imported."""
    per_task, seconds = {}, {}
    if tasks:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        if not is_spread(model):
            model.to(device)  # HFLM runs an in-memory model where it lies (a spread one where accelerate put it)
        with lean_lm_eval():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            manager = task_manager(data_dir)
            for task in tasks:
                start = time.perf_counter()
                results = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=0, limit=limit or None,
                                                  task_manager=manager, log_samples=True)
                seconds[task] = round(time.perf_counter() - start, 1)
                per_task[task] = task_scores(results, task)
    metrics = {"limit": limit, "num_fewshot": 0, "tasks": per_task, "mean": mean_scores(per_task)}
    return metrics, {"zeroshot_seconds": seconds}


@contextlib.contextmanager
def lean_lm_eval():
    """lm-eval's warnings here are about what we chose on purpose (an in-memory model, a custom
    dataset, a limit), and datasets draws a bar for each pass of HellaSwag's preprocessing: keep
    the stage log to lm-eval's errors and its request progress bars. And lm-eval's report of the
    environment is left out of its results: after every task it runs torch's collect_env, a dozen
    subprocesses (pip, nvidia-smi, lsb_release: 0.3 s a task on 2 cores), for fields never read."""
    import datasets
    from lm_eval import evaluator

    logger = logging.getLogger("lm_eval")
    level, bars_were_off, add_env_info = logger.level, datasets.are_progress_bars_disabled(), evaluator.add_env_info
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    evaluator.add_env_info = lambda results: None
    try:
        yield
    finally:
        evaluator.add_env_info = add_env_info
        logger.setLevel(level)
        if not bars_were_off:
            datasets.enable_progress_bars()

