"""The sweep report's tables, plots and MLflow runs (the sweep-report stage's helpers; svdcore
knows nothing of sweeps, plots or MLflow): methods x ratios over one statistics pass, against the
dense model.

Inputs, as the sweep's stages write them:

- a point, one per (method, ratio):
  ``{"method": "svd-llm", "ratio": 0.2, "recipe": {...}, "ppl": {"wikitext2": 93.77, "ptb": 234.2},
  "ratio_achieved": {"linears": 0.2001, "model": 0.1498}, "compress_s": 17.0, "evaluate_s": 241.3,
  "params": {...}}``
- the dense baseline: ``{"ppl": {...}, "params_total": 134515008, "params_linears": 106168320}``
- optionally, in a point and in the dense baseline, the zero-shot scores of
  ``svdcore.zeroshot.evaluate_zeroshot``: ``"zeroshot": {"limit": 50, "tasks": {"piqa": {"acc": 0.68,
  "acc_norm": 0.70, "chance": 0.5, ...}, ...}, "mean": {"acc": ..., "acc_norm": ..., "chance": ...}}``.
  Without them the tables, plot and runs have no zero-shot part.

The dataset names are those of the ``ppl`` dicts, never assumed. A perplexity may be huge, inf or
NaN (a collapsed model): the tables print it, the plots leave it out.

Order, everywhere (table rows, markdown rows, plot legends, MLflow child runs): methods in the
order they first appear in ``points`` (pass the points in the sweep's method order to get that
order), ratios ascending within a method.

matplotlib and mlflow are imported inside the functions that use them, so the tests of the
tables need neither.

``plot_data`` writes ``<out_dir>/<method>.csv`` and returns the DVC 3 top-level ``plots:``
definition that reads them, one plot per dataset with one line per method. For methods svd,
asvd, svd-llm and ``out_dir = "plots/sweep"`` it is::

    plots:
      - sweep-wikitext2:
          template: simple
          x: ratio
          y:
            plots/sweep/svd.csv: ppl_wikitext2
            plots/sweep/asvd.csv: ppl_wikitext2
            plots/sweep/svd-llm.csv: ppl_wikitext2
          title: wikitext2 perplexity by ratio
          x_label: fraction of decoder-linear parameters removed
          y_label: wikitext2 perplexity
      - sweep-ptb:
          ...the same with ptb...

``simple`` is DVC's plain line template (``linear`` adds a loess smoothing, meaningless over four
ratios); DVC tells the methods apart by file name (the stroke dash). DVC's built-in templates have
no log scale, so a collapsed method (perplexity 1e7) flattens the others against the axis; the PNG
of ``plot`` has the log scale. For one in DVC: save the output of ``dvc plots templates simple`` as
``.dvc/plots/simple_log.json`` with the y encoding's ``"scale": {"zero": false}`` replaced by
``"scale": {"type": "log"}``, and set ``template: simple_log`` (checked with DVC 3.67). Non-finite
perplexities are empty cells in these CSVs: Vega-Lite leaves a gap.
"""
import csv
import io
import math
from pathlib import Path

from svdcore.atomic import atomic_path
from stages.tracking import flatten, numeric_metrics, opened_experiment

DENSE = "dense"
PNG_DPI = 100


def method_names(points: list[dict]) -> list[str]:
    """The methods in the order they first appear."""
    return list(dict.fromkeys(p["method"] for p in points))


def dataset_names(points: list[dict], dense: dict) -> list[str]:
    """Every dataset with a perplexity, the dense model's first, then in order of appearance."""
    return list(dict.fromkeys([*dense["ppl"], *(name for p in points for name in p["ppl"])]))


def task_names(points: list[dict], dense: dict) -> list[str]:
    """Every zero-shot task scored, the dense model's first; [] when nothing was scored."""
    return list(dict.fromkeys([*dense.get("zeroshot", {}).get("tasks", {}),
                               *(t for p in points for t in p.get("zeroshot", {}).get("tasks", {}))]))


def accuracy(point: dict, task: str, metric: str) -> float:
    """A zero-shot figure (task "mean" for the mean over tasks); NaN where it was not scored (and
    for WinoGrande's acc_norm, which lm-eval does not report)."""
    zeroshot = point.get("zeroshot", {})
    scores = zeroshot.get("mean", {}) if task == "mean" else zeroshot.get("tasks", {}).get(task, {})
    return float(scores.get(metric, math.nan))


def chance_level(points: list[dict], dense: dict) -> float:
    """The mean accuracy of a uniform random pick: every model sees the same items, so the first
    scored one tells it."""
    return next((c for c in (accuracy(m, "mean", "chance") for m in [dense, *points]) if not math.isnan(c)), math.nan)


def _accuracy_columns(points: list[dict], dense: dict) -> list[tuple[str, str, str]]:
    """(column, task, metric) of the zero-shot figures that some model has: the means first."""
    tasks = task_names(points, dense)
    if not tasks:
        return []
    models = [dense, *points]
    columns = [(f"zeroshot_{m}", "mean", m) for m in ("acc", "acc_norm")]
    return columns + [(f"{m}_{t}", t, m) for t in tasks for m in ("acc", "acc_norm")
                      if any(not math.isnan(accuracy(p, t, m)) for p in models)]


def ordered(points: list[dict]) -> list[dict]:
    """The points by method (first appearance) then ratio; two points at one (method, ratio) are
    a bug upstream (two stage instances writing the same cell), so they raise."""
    seen = set()
    for p in points:
        key = (p["method"], float(p["ratio"]))
        if key in seen:
            raise ValueError(f"two points for method {key[0]!r} at ratio {key[1]:g}")
        seen.add(key)
    rank = {name: i for i, name in enumerate(method_names(points))}
    return sorted(points, key=lambda p: (rank[p["method"]], float(p["ratio"])))


def _ppl(point: dict, dataset: str) -> float:
    # a point evaluated without this dataset: NaN, which prints as "nan" and is not plotted
    return float(point["ppl"].get(dataset, math.nan))


def points_table(points: list[dict], dense: dict) -> list[dict]:
    """Long format, one row per point after a first row for the dense model (ratio 0):
    method, ratio, ppl_<dataset> per dataset, ratio_linears, ratio_model, compress_s, then where
    anything was scored zero-shot: zeroshot_acc, zeroshot_acc_norm (the means over tasks) and
    acc_<task>, acc_norm_<task> (NaN where a model was not scored)."""
    datasets = dataset_names(points, dense)
    accuracies = _accuracy_columns(points, dense)
    rows = [{"method": DENSE, "ratio": 0.0, **{f"ppl_{d}": _ppl(dense, d) for d in datasets},
             "ratio_linears": 0.0, "ratio_model": 0.0, "compress_s": 0.0,
             **{column: accuracy(dense, t, m) for column, t, m in accuracies}}]
    for p in ordered(points):
        rows.append({"method": p["method"], "ratio": float(p["ratio"]),
                     **{f"ppl_{d}": _ppl(p, d) for d in datasets},
                     "ratio_linears": float(p["ratio_achieved"]["linears"]),
                     "ratio_model": float(p["ratio_achieved"]["model"]),
                     "compress_s": float(p["compress_s"]),
                     **{column: accuracy(p, t, m) for column, t, m in accuracies}})
    return rows


def _write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _csv_text(header: list[str], rows: list[list]) -> str:
    out = io.StringIO()
    # "\n", not the csv module's "\r\n": the files are versioned and diffed
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def write_csv(rows: list[dict], path) -> None:
    """The rows of points_table as CSV; floats in repr form (inf and nan included), which float()
    reads back exactly."""
    header = list(rows[0])
    _write_text(path, _csv_text(header, [[row[key] for key in header] for row in rows]))


def format_ppl(value: float) -> str:
    """Two decimals below 1000, an integer below 10^4, else three significant figures in
    scientific form (3.60e7): the tables then stay narrow whatever the collapse."""
    if not math.isfinite(value):
        return str(value)  # "inf", "nan"
    if abs(value) < 1000:
        return f"{value:.2f}"
    if abs(value) < 1e4:
        return f"{value:.0f}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _pivot(points: list[dict], cell) -> list[str]:
    """Markdown lines of a methods x ratios table; `cell(point)` is the text of one cell, "-"
    where a method has no point at a ratio."""
    ratios = sorted({float(p["ratio"]) for p in points})
    by_key = {(p["method"], float(p["ratio"])): p for p in points}
    lines = ["| method | " + " | ".join(f"{r:g}" for r in ratios) + " |",
             "| --- |" + " ---: |" * len(ratios)]
    for method in method_names(ordered(points)):
        cells = [cell(by_key[method, r]) if (method, r) in by_key else "-" for r in ratios]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return lines


def markdown_table(points: list[dict], dense: dict) -> str:
    """For the README: the dense figures in a line, one perplexity table per dataset (methods x
    target ratios), the mean zero-shot accuracy where there is one, then the achieved ratio and
    the compression wall time per method x ratio."""
    datasets = dataset_names(points, dense)
    dense_ppl = ", ".join(f"{d} {format_ppl(_ppl(dense, d))}" for d in datasets)
    lines = [f"Dense model: perplexity {dense_ppl}; {dense['params_total']:,} parameters, "
             f"{dense['params_linears']:,} of them in the decoder linears.",
             "",
             "Columns: the target fraction of decoder-linear parameters removed.",
             ""]
    for d in datasets:
        lines += [f"**{d} perplexity** (dense {format_ppl(_ppl(dense, d))})", "",
                  *_pivot(points, lambda p, d=d: format_ppl(_ppl(p, d))), ""]
    tasks = task_names(points, dense)
    if tasks:
        def pair(p):
            acc, acc_norm = accuracy(p, "mean", "acc"), accuracy(p, "mean", "acc_norm")
            return "-" if math.isnan(acc) else f"{acc:.3f} / {acc_norm:.3f}"

        limit = next(m["zeroshot"]["limit"] for m in [dense, *points] if m.get("zeroshot", {}).get("tasks"))
        items = f"the first {limit} items of each task" if limit else "whole splits"
        lines += [f"**zero-shot accuracy, mean of {len(tasks)} task{'s' * (len(tasks) != 1)}: acc / acc_norm** "
                  f"(lm-eval, {items}; dense {pair(dense)}, chance {chance_level(points, dense):.3f})", "",
                  *_pivot(points, pair), ""]
    lines += ["**achieved ratio** (parameters removed: decoder linears / whole model)", "",
              *_pivot(points, lambda p: "{linears:.4f} / {model:.4f}".format(**p["ratio_achieved"])), ""]
    lines += ["**compression wall time (s)**", "",
              *_pivot(points, lambda p: f"{float(p['compress_s']):.1f}")]
    return "\n".join(lines) + "\n"


def write_markdown(points: list[dict], dense: dict, path) -> None:
    _write_text(path, markdown_table(points, dense))


def plot(points: list[dict], dense: dict, path) -> None:
    """PNG: perplexity (log scale) against ratio, one subplot per dataset, one line per method,
    the dense perplexity dashed; where there are zero-shot scores, a last subplot of the mean
    acc_norm (linear scale, chance dotted). Non-finite perplexities are left out (a log axis
    cannot show them; the tables do). Same input, same bytes: no pyplot state, no timestamp or
    version in the PNG metadata."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, no display, no pyplot

    datasets = dataset_names(points, dense)
    zeroshot = bool(task_names(points, dense))
    points = ordered(points)
    fig = Figure(figsize=(5 * (len(datasets) + zeroshot), 4), layout="constrained")
    axes = fig.subplots(1, len(datasets) + zeroshot, squeeze=False)[0]
    for ax, d in zip(axes, datasets):
        _panel(ax, points, lambda p, d=d: _ppl(p, d), {DENSE: (_ppl(dense, d), "--")}, d, "perplexity", log=True)
    if zeroshot:
        mean_acc_norm = lambda p: accuracy(p, "mean", "acc_norm")
        _panel(axes[-1], points, mean_acc_norm,
               {DENSE: (mean_acc_norm(dense), "--"), "chance": (chance_level(points, dense), ":")},
               "zero-shot, mean of the tasks", "acc_norm", log=False)
    with atomic_path(path) as tmp:
        # the temporary's name ends in .tmp: the format must be named
        fig.savefig(tmp, format="png", dpi=PNG_DPI, metadata={"Software": None})


def _panel(ax, points: list[dict], value, levels: dict, title: str, ylabel: str, log: bool) -> None:
    """One subplot of `plot`: value(point) against ratio, one line per method, leaving out the
    points whose value is not finite (or not positive, on a log axis); `levels` {label: (y,
    linestyle)} are black horizontal lines, drawn where y is finite."""
    for method in method_names(points):
        kept = [(float(p["ratio"]), value(p)) for p in points
                if p["method"] == method and math.isfinite(value(p)) and (value(p) > 0 or not log)]
        # a method with nothing kept keeps its legend entry, so its absence is visible
        ax.plot([r for r, _ in kept], [v for _, v in kept], marker="o", label=method)
    for label, (level, style) in levels.items():
        if math.isfinite(level):
            ax.axhline(level, color="black", linestyle=style, linewidth=1, label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xticks(sorted({float(p["ratio"]) for p in points}))
    ax.set_title(title)
    ax.set_xlabel("fraction of decoder-linear parameters removed")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both" if log else "major", alpha=0.3)
    ax.legend(fontsize="small")


def dvc_plots_definition(methods: list[str], datasets: list[str], out_dir) -> list[dict]:
    """The DVC 3 top-level `plots:` list reading plot_data's files: per dataset, one plot with
    x = ratio and y = that dataset's column of every method's CSV (DVC tells the lines apart by
    file)."""
    return [{f"sweep-{d}": {"template": "simple", "x": "ratio",
                            "y": {f"{Path(out_dir).as_posix()}/{m}.csv": f"ppl_{d}" for m in methods},
                            "title": f"{d} perplexity by ratio",
                            "x_label": "fraction of decoder-linear parameters removed",
                            "y_label": f"{d} perplexity"}}
            for d in datasets]


def plot_data(points: list[dict], out_dir) -> list[dict]:
    """Write `<out_dir>/<method>.csv` (columns ratio, ppl_<dataset>...; rows by ratio; a
    non-finite perplexity is an empty cell) and return the `plots:` definition reading them.

    Datasets are those of the points (the dense model is not in these files)."""
    points = ordered(points)
    datasets = list(dict.fromkeys(name for p in points for name in p["ppl"]))
    for method in method_names(points):
        rows = [[float(p["ratio"]), *(_ppl(p, d) if math.isfinite(_ppl(p, d)) else "" for d in datasets)]
                for p in points if p["method"] == method]
        _write_text(Path(out_dir) / f"{method}.csv", _csv_text(["ratio", *(f"ppl_{d}" for d in datasets)], rows))
    return dvc_plots_definition(method_names(points), datasets, out_dir)


def log_sweep(experiment: str, dense: dict, points: list[dict], sweep_params: dict, artifacts=()) -> str:
    """One parent run "sweep" (params: sweep_params flattened; metrics: the dense figures;
    artifacts: the files or directories given) and one nested run per point, named
    `<method>@<ratio>` (params: the point's params and recipe flattened; metrics: ppl.<dataset>,
    ratio_achieved.linears/.model, compress_s, evaluate_s, and zeroshot.mean.acc,
    zeroshot.tasks.<task>.acc... where it was scored; tags method and ratio). Returns the
    parent's run id."""
    import mlflow

    missing = [str(a) for a in artifacts if not Path(a).exists()]
    if missing:  # before any run is opened: a report without its files is not logged at all
        raise FileNotFoundError(f"sweep artifacts missing: {', '.join(missing)}")
    with opened_experiment(experiment) as tags, mlflow.start_run(run_name="sweep") as parent:
        mlflow.log_params({k: str(v) for k, v in flatten(sweep_params).items()})
        mlflow.log_metrics(numeric_metrics({"dense": dense}))
        mlflow.set_tags(tags)
        for artifact in map(Path, artifacts):
            if artifact.is_dir():
                mlflow.log_artifacts(str(artifact), artifact_path=artifact.name)
            else:
                mlflow.log_artifact(str(artifact))
        for p in ordered(points):
            with mlflow.start_run(run_name=f"{p['method']}@{float(p['ratio']):g}", nested=True):
                mlflow.log_params({k: str(v) for k, v in
                                   {**flatten(p["params"]), **flatten(p["recipe"], "recipe.")}.items()})
                mlflow.log_metrics(numeric_metrics({"ppl": p["ppl"], "ratio_achieved": p["ratio_achieved"],
                                                    "compress_s": p["compress_s"], "evaluate_s": p["evaluate_s"],
                                                    "zeroshot": p.get("zeroshot", {})}))
                mlflow.set_tags({**tags, "method": p["method"], "ratio": f"{float(p['ratio']):g}"})
    return parent.info.run_id
