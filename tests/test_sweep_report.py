"""The sweep report on synthetic points: tables, markdown, PNG, DVC plot files, MLflow runs."""
import csv
import json
import math
import os
import sys

import pytest
import yaml

from conftest import sh
from stages import sweep_tables as sr

DENSE = {"ppl": {"wikitext2": 29.97, "ptb": 44.99}, "params_total": 134515008, "params_linears": 106168320}


def point(method, ratio, wikitext2, ptb, compress_s=10.0):
    return {"method": method, "ratio": ratio,
            "recipe": {"metric": "plain" if method == "svd" else "whitening", "update": False},
            "ppl": {"wikitext2": wikitext2, "ptb": ptb},
            "ratio_achieved": {"linears": ratio + 0.001, "model": round(ratio * 0.75, 4)},
            "compress_s": compress_s, "evaluate_s": 100.0 + ratio,
            "params": {"compress": {"method": method, "ratio": ratio}, "evaluate": {"seqlen": 512}}}


# Deliberately out of order: svd-llm appears first, its ratios descending; svd has collapsed
# (huge wikitext2, inf and NaN ptb); asvd has no point at 0.4.
POINTS = [point("svd-llm", 0.4, 247.6, 798.0, 21.5), point("svd-llm", 0.2, 93.77, 234.2, 17.0),
          point("svd", 0.2, 3.6e7, math.inf), point("svd", 0.4, 2.1e7, math.nan),
          point("asvd", 0.2, 83258.0, 1.9e6)]
ORDER = [("dense", 0.0), ("svd-llm", 0.2), ("svd-llm", 0.4), ("svd", 0.2), ("svd", 0.4), ("asvd", 0.2)]


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_points_table_rows_and_order():
    rows = sr.points_table(POINTS, DENSE)
    assert [(r["method"], r["ratio"]) for r in rows] == ORDER
    assert list(rows[0]) == ["method", "ratio", "ppl_wikitext2", "ppl_ptb", "ratio_linears", "ratio_model",
                             "compress_s"]
    assert rows[0]["ppl_wikitext2"] == 29.97 and rows[0]["ratio_linears"] == 0.0
    svd_llm_02 = rows[1]
    assert (svd_llm_02["ppl_ptb"], svd_llm_02["ratio_linears"], svd_llm_02["ratio_model"],
            svd_llm_02["compress_s"]) == (234.2, 0.201, 0.15, 17.0)
    assert rows[3]["ppl_ptb"] == math.inf and math.isnan(rows[4]["ppl_ptb"])


def test_datasets_come_from_the_data():
    points = [{**p, "ppl": {"c4": p["ppl"]["wikitext2"]}} for p in POINTS]
    dense = {**DENSE, "ppl": {"c4": 12.5}}
    rows = sr.points_table(points, dense)
    assert [k for k in rows[0] if k.startswith("ppl_")] == ["ppl_c4"]
    assert "**c4 perplexity**" in sr.markdown_table(points, dense)


def test_two_points_at_one_cell_raise():
    with pytest.raises(ValueError, match="svd-llm.*0.2"):
        sr.points_table(POINTS + [point("svd-llm", 0.2, 1.0, 1.0)], DENSE)


def test_csv_round_trip(tmp_path):
    rows = sr.points_table(POINTS, DENSE)
    sr.write_csv(rows, tmp_path / "sweep.csv")
    with open(tmp_path / "sweep.csv", newline="") as fh:
        back = list(csv.DictReader(fh))
    assert [r["method"] for r in back] == [r["method"] for r in rows]
    for row, read in zip(rows, back):
        assert list(read) == list(row)
        assert all(same(float(read[k]), row[k]) for k in row if k != "method")
    assert os.listdir(tmp_path) == ["sweep.csv"]  # no temporary left behind


@pytest.mark.parametrize("value, text", [(29.97, "29.97"), (999.994, "999.99"), (1234.4, "1234"),
                                         (83258.0, "8.33e4"), (99960.0, "1.00e5"), (3.6e7, "3.60e7"),
                                         (math.inf, "inf"), (math.nan, "nan")])
def test_format_ppl(value, text):
    assert sr.format_ppl(value) == text


def test_markdown(tmp_path):
    sr.write_markdown(POINTS, DENSE, tmp_path / "sweep.md")
    text = (tmp_path / "sweep.md").read_text()
    assert text == sr.markdown_table(POINTS, DENSE)
    assert "wikitext2 29.97, ptb 44.99; 134,515,008 parameters, 106,168,320" in text
    assert text.split("**")[1::2] == ["wikitext2 perplexity", "ptb perplexity", "achieved ratio",
                                      "compression wall time (s)"]
    tables = [[line for line in block.splitlines() if line.startswith("|")] for block in text.split("**")[2::2]]
    assert tables[0] == ["| method | 0.2 | 0.4 |", "| --- | ---: | ---: |",
                         "| `svd-llm` | 93.77 | 247.60 |", "| `svd` | 3.60e7 | 2.10e7 |", "| `asvd` | 8.33e4 | - |"]
    assert tables[1][3:] == ["| `svd` | inf | nan |", "| `asvd` | 1.90e6 | - |"]
    assert tables[2][2] == "| `svd-llm` | 0.2010 / 0.1500 | 0.4010 / 0.3000 |"
    assert tables[3][2] == "| `svd-llm` | 17.0 | 21.5 |"


def test_plot_png_is_deterministic(tmp_path):
    sr.plot(POINTS, DENSE, tmp_path / "a.png")
    sr.plot(list(reversed(POINTS)), DENSE, tmp_path / "b.png")  # the order comes from the data
    a = (tmp_path / "a.png").read_bytes()
    assert a.startswith(b"\x89PNG\r\n\x1a\n") and len(a) > 10_000
    assert b"matplotlib" not in a.lower()  # no version stamp: bytes only change with the data
    # reversed input puts asvd first, changing the colours: other bytes
    assert a != (tmp_path / "b.png").read_bytes()
    sr.plot(POINTS, DENSE, tmp_path / "b.png")
    assert a == (tmp_path / "b.png").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]


def test_plot_data_files_and_definition(tmp_path):
    out = tmp_path / "plots"
    definition = sr.plot_data(POINTS, out)
    assert sorted(os.listdir(out)) == ["asvd.csv", "svd-llm.csv", "svd.csv"]
    assert (out / "svd-llm.csv").read_text() == "ratio,ppl_wikitext2,ppl_ptb\n0.2,93.77,234.2\n0.4,247.6,798.0\n"
    # non-finite perplexities are empty cells, a gap in the plot
    assert (out / "svd.csv").read_text() == "ratio,ppl_wikitext2,ppl_ptb\n0.2,36000000.0,\n0.4,21000000.0,\n"
    assert [next(iter(p)) for p in definition] == ["sweep-wikitext2", "sweep-ptb"]
    ptb = definition[1]["sweep-ptb"]
    assert ptb["x"] == "ratio" and ptb["template"] == "simple"
    assert ptb["y"] == {f"{out.as_posix()}/{m}.csv": "ppl_ptb" for m in ("svd-llm", "svd", "asvd")}


def test_dvc_reads_the_plots_definition(tmp_path, monkeypatch):
    """The definition pasted as the top-level `plots:` of a dvc.yaml renders with DVC itself."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]
    sh(dvc + ["init", "--no-scm", "-q"], tmp_path, env)
    monkeypatch.chdir(tmp_path)  # paths relative to the repository root, as in the project's dvc.yaml
    definition = sr.plot_data(POINTS, "plots/sweep")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"plots": definition}, sort_keys=False))
    shown = json.loads(sh(dvc + ["plots", "show", "--json"], tmp_path, env))
    assert not shown.get("errors")
    assert set(shown["data"]) == {"sweep-wikitext2", "sweep-ptb"}
    content = shown["data"]["sweep-ptb"][0]["content"]
    values = content["data"]["values"]
    assert sorted((v["filename"], v["ratio"], v["ppl_ptb"]) for v in values) == [
        ("asvd.csv", "0.2", "1900000.0"), ("svd-llm.csv", "0.2", "234.2"), ("svd-llm.csv", "0.4", "798.0"),
        ("svd.csv", "0.2", ""), ("svd.csv", "0.4", "")]
    assert content["encoding"]["x"]["field"] == "ratio"


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """An MLflow store of its own: DVC_ROOT points repository_root() at tmp_path; the globals
    that mlflow.set_tracking_uri / set_experiment leave behind are undone afterwards."""
    import mlflow

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path
    mlflow.set_tracking_uri(None)  # runs before monkeypatch restores the environment


def test_log_sweep(mlflow_store, tmp_path):
    from mlflow.tracking import MlflowClient

    sr.write_markdown(POINTS, DENSE, tmp_path / "sweep.md")
    sr.plot_data(POINTS, tmp_path / "plot-data")
    parent_id = sr.log_sweep("sweep-test", DENSE, POINTS, {"methods": ["svd-llm", "svd", "asvd"],
                                                            "ratios": [0.2, 0.4]},
                             artifacts=[tmp_path / "sweep.md", tmp_path / "plot-data"])
    assert (mlflow_store / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{mlflow_store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweep-test")
    assert experiment.artifact_location == (mlflow_store / "mlartifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 + len(POINTS)

    parent = client.get_run(parent_id)
    assert parent.info.run_name == "sweep" and "mlflow.parentRunId" not in parent.data.tags
    assert parent.data.params["methods"] == "['svd-llm', 'svd', 'asvd']"
    assert parent.data.metrics["dense.ppl.ptb"] == 44.99
    assert parent.data.metrics["dense.params_total"] == 134515008
    assert "git_sha" in parent.data.tags
    assert sorted(a.path for a in client.list_artifacts(parent_id)) == ["plot-data", "sweep.md"]
    assert len(client.list_artifacts(parent_id, "plot-data")) == 3

    children = {r.info.run_name: r for r in runs if r.info.run_id != parent_id}
    assert sorted(children) == sorted(f"{m}@{r:g}" for m, r in ORDER[1:])
    assert all(r.data.tags["mlflow.parentRunId"] == parent_id for r in children.values())
    assert all(r.info.status == "FINISHED" for r in runs)
    child = children["svd-llm@0.2"].data
    assert child.metrics == {"ppl.wikitext2": 93.77, "ppl.ptb": 234.2, "ratio_achieved.linears": 0.201,
                             "ratio_achieved.model": 0.15, "compress_s": 17.0, "evaluate_s": 100.2}
    assert child.params["compress.method"] == "svd-llm" and child.params["recipe.metric"] == "whitening"
    assert child.tags["method"] == "svd-llm" and child.tags["ratio"] == "0.2"
    # the collapsed point is logged too: NaN as NaN, inf clamped by the store to the largest float
    collapsed = children["svd@0.4"].data.metrics
    assert math.isnan(collapsed["ppl.ptb"]) and collapsed["ppl.wikitext2"] == 2.1e7
    assert children["svd@0.2"].data.metrics["ppl.ptb"] > 1e300


def test_log_sweep_refuses_missing_artifacts(mlflow_store, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.md"):
        sr.log_sweep("sweep-test", DENSE, POINTS, {}, artifacts=[tmp_path / "nowhere.md"])
    assert not (mlflow_store / "mlflow.db").exists()  # refused before any run was opened


def scores(acc, acc_norm, winogrande=0.5, limit=50):
    """A zero-shot block as evaluate_zeroshot writes it: piqa with both metrics, winogrande with acc only."""
    tasks = {"piqa": {"acc": acc, "acc_norm": acc_norm, "chance": 0.5},
             "winogrande": {"acc": winogrande, "chance": 0.5}}
    return {"limit": limit, "tasks": tasks,
            "mean": {"acc": (acc + winogrande) / 2, "acc_norm": (acc_norm + winogrande) / 2, "chance": 0.5}}


SCORED_DENSE = {**DENSE, "zeroshot": scores(0.68, 0.70)}
# asvd@0.2 was not scored: its cells are NaN and "-"
SCORED = [{**p, "zeroshot": scores(0.6 - p["ratio"] / 4, 0.62 - p["ratio"] / 4)} if p["method"] != "asvd" else p
          for p in POINTS]


def test_zeroshot_columns():
    rows = sr.points_table(SCORED, SCORED_DENSE)
    accuracy_columns = list(rows[0])[7:]
    # winogrande has no acc_norm anywhere, so no column for it
    assert accuracy_columns == ["zeroshot_acc", "zeroshot_acc_norm", "acc_piqa", "acc_norm_piqa", "acc_winogrande"]
    assert rows[0]["acc_norm_piqa"] == 0.70 and rows[0]["zeroshot_acc"] == pytest.approx(0.59)
    assert rows[2]["acc_piqa"] == pytest.approx(0.5)  # svd-llm at 0.4
    assert all(math.isnan(v) for k, v in rows[-1].items() if k in accuracy_columns)  # asvd, unscored
    assert not any(k.startswith(("acc", "zeroshot")) for k in sr.points_table(POINTS, DENSE)[0])


def test_zeroshot_in_markdown():
    text = sr.markdown_table(SCORED, SCORED_DENSE)
    title = "zero-shot accuracy, mean of 2 tasks: acc / acc_norm"
    assert text.split("**")[1::2][2] == title
    after = text.split(f"**{title}**")[1]
    assert after.startswith(" (lm-eval, the first 50 items of each task; dense 0.590 / 0.600, chance 0.500)")
    table = [line for line in after.split("**")[0].splitlines() if line.startswith("|")]
    assert table[2:] == ["| `svd-llm` | 0.525 / 0.535 | 0.500 / 0.510 |",
                         "| `svd` | 0.525 / 0.535 | 0.500 / 0.510 |", "| `asvd` | - | - |"]
    assert "zero-shot" not in sr.markdown_table(POINTS, DENSE)


def test_zeroshot_panel_in_the_plot(tmp_path):
    sr.plot(POINTS, DENSE, tmp_path / "ppl.png")
    sr.plot(SCORED, SCORED_DENSE, tmp_path / "both.png")
    width = lambda png: int.from_bytes(png[16:20], "big")  # the IHDR chunk
    assert width((tmp_path / "both.png").read_bytes()) == width((tmp_path / "ppl.png").read_bytes()) * 3 // 2


def test_log_sweep_with_zeroshot(mlflow_store):
    from mlflow.tracking import MlflowClient

    parent_id = sr.log_sweep("sweep-test", SCORED_DENSE, SCORED, {})
    client = MlflowClient(f"sqlite:///{mlflow_store / 'mlflow.db'}")
    assert client.get_run(parent_id).data.metrics["dense.zeroshot.tasks.piqa.acc_norm"] == 0.70
    runs = {r.info.run_name: r.data.metrics for r in client.search_runs([client.get_run(parent_id).info.experiment_id])}
    assert runs["svd-llm@0.4"]["zeroshot.mean.acc"] == pytest.approx(0.5)
    assert runs["svd-llm@0.4"]["zeroshot.tasks.winogrande.acc"] == 0.5
    assert not any(k.startswith("zeroshot") for k in runs["asvd@0.2"])
