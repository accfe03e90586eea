"""sweep report: the points of sweep/params.yaml (perplexity, and zero-shot accuracy from the
zero-shot stages) against the dense model -> table (markdown, CSV), ratio-perplexity plot (PNG,
and CSVs for `dvc plots`), a summary, one MLflow parent run with a child run per point."""
from pathlib import Path

from svdcore.atomic import read_json, write_json
from svdcore.methods import Recipe
from svdcore.params import load as load_params
from svdcore.zeroshot import check_same_protocol
from stages.common import STAGE_METRICS, run
from stages.io import DENSE, point_file, sweep_compress_timings, zeroshot_file
from stages.sweep_params import validate_sweep
from stages.sweep_tables import log_sweep, plot, plot_data, points_table, write_csv, write_markdown

SWEEP = Path("sweep")
RESULTS = SWEEP / "results"
# what one point would cost as its own `dvc repro` from scratch, besides the point's own work
FROM_SCRATCH = ("collect-calibration", "compute-covariances", "compute-spectra", "evaluate-dense")


def work(params):
    sweep = load_params(SWEEP / "params.yaml", validate_sweep)
    dense = read_json(DENSE, "dense baseline")
    scored = {(m, r): read_json(zeroshot_file(m, r), f"sweep zero-shot point {m}@{r}")
              for m in sweep.zeroshot_methods for r in sweep.ratios}
    for z in scored.values():  # the dense scores sit beside these only if both saw the same items
        check_same_protocol(dense.get("zeroshot", {}), list(z["zeroshot"]["tasks"]), z["zeroshot"]["limit"], DENSE)
    # wall times, read but not depended on (they would enter the run-cache key); they exist, since the
    # stages that write them run upstream of every point
    compressions = {(m, r): read_json(sweep_compress_timings(m, r), f"sweep point {m}@{r}'s compression timings")
                    for m in sweep.methods for r in sweep.ratios}
    points = []
    for m in sweep.methods:
        for r in sweep.ratios:
            point = {**read_json(point_file(m, r), f"sweep point {m}@{r}"),
                     "compress_s": compressions[m, r]["compress_s"]}
            points.append({**point, "zeroshot": scored[m, r]["zeroshot"]} if (m, r) in scored else point)
    write_csv(points_table(points, dense), RESULTS / "table.csv")
    write_markdown(points, dense, RESULTS / "table.md")
    plot(points, dense, RESULTS / "ratio_ppl.png")
    plot_data(points, SWEEP / "plots")
    fisher_s = read_json(SWEEP / "timings/compute-fisher.json", "sweep Fisher timings")["wall_s"]
    sensitivity_s = read_json(SWEEP / "timings/compute-sensitivity.json", "sweep sensitivity timings")["wall_s"]
    upstream = {name: read_json(STAGE_METRICS / f"{name}.json", f"{name} timings")["wall_s"] for name in FROM_SCRATCH}
    points_s = sum(p["wall_s"] for p in points) + sum(c["wall_s"] for c in compressions.values())
    fwsvd_points = sum(Recipe(**p["recipe"]).needs_fisher for p in points)
    sensitivity_points = sum(Recipe(**p["recipe"]).allocation == "sensitivity" for p in points)
    write_json(RESULTS / "summary.json", {
        "points": len(points), "methods": sweep.methods, "ratios": sweep.ratios,
        # the sweep's own stages; the statistics pass and the dense evaluation come from the main pipeline
        "sweep_s": round(points_s + sum(z["wall_s"] for z in scored.values()) + fisher_s + sensitivity_s, 1),
        "shared_upstream_s": round(sum(upstream.values()), 1),
        # a from-scratch run scores zero-shot in its evaluate stage, which loads its model once
        "each_point_from_scratch_s": round(points_s + sum(z["zeroshot_s"] for z in scored.values())
                                           + len(points) * sum(upstream.values()) + fwsvd_points * fisher_s
                                           + sensitivity_points * sensitivity_s, 1),
    })
    log_sweep(sweep.experiment, dense, points, sweep.model_dump(),
              [RESULTS / "table.md", RESULTS / "table.csv", RESULTS / "ratio_ppl.png", RESULTS / "summary.json"])
    return {}


if __name__ == "__main__":
    run("sweep-report", work, timings_dir=None)
