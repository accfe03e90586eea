"""The bench scripts run end to end on tiny shapes (their figures are printed, never asserted)."""
import json

import torch

from bench import compress, infer, kernels, ratio_change, streamed_eval
from stages.pipeline import stage_names


def test_compress_bench_runs_both_modes_and_reports_every_phase(tmp_path):
    for mode in ("pipeline", "fused"):
        result = compress.main(["--shape", "tiny", "--device", "cpu", "--samples", "4", "--seqlen", "32",
                                "--mode", mode, "--rank-multiple", "8", "--json", str(tmp_path / f"{mode}.json")])
        assert result["dtype"] == "float32" and result["device"].endswith("threads")
        assert {"forward+grams", "decompose", "layer moves"} <= set(result["phases_s"])
        assert ("save stats" in result["phases_s"]) == (mode == "pipeline")
        assert abs(result["achieved_ratio"] - 0.2) < 0.05 and sum(result["route_counts"].values()) == 14
        assert (tmp_path / f"{mode}.json").read_text().startswith('{\n  "command": "python -m bench.compress --shape tiny')


def test_compress_bench_times_the_refined_layer_loop(tmp_path):
    result = compress.main(["--shape", "tiny", "--device", "cpu", "--samples", "8", "--seqlen", "32",
                            "--method", "aa-svd", "--refine-steps", "2"])
    assert result["method"] == "aa-svd" and result["refine_steps"] == 2
    assert {"statistics", "decompose", "refine"} <= set(result["phases_s"])
    assert abs(result["achieved_ratio"] - 0.2) < 0.05


def test_auto_device_is_the_cpu_here_and_gives_the_same_figures_of_work():
    if torch.cuda.is_available():
        return  # the point is a machine without a GPU
    auto = compress.main(["--shape", "tiny", "--device", "auto", "--samples", "4", "--seqlen", "32"])
    cpu = compress.main(["--shape", "tiny", "--device", "cpu", "--samples", "4", "--seqlen", "32"])
    assert auto["device"] == cpu["device"] and auto["route_counts"] == cpu["route_counts"]


def test_infer_bench_compares_dense_with_every_ratio_and_multiple():
    result = infer.main(["--shape", "tiny", "--device", "cpu", "--ratios", "0.2,0.4", "--rank-multiples", "1,8",
                         "--prefill-batch", "2", "--prefill-len", "32", "--prompt", "8", "--steps", "4",
                         "--repeats", "1"])
    rows = result["rows"]
    assert [r["model"] for r in rows] == ["dense", "0.2, ranks x1", "0.2, ranks x8", "0.4, ranks x1", "0.4, ranks x8"]
    assert rows[0]["prefill_x"] == 1 and all(r["prefill_tok_s"] > 0 and r["decode_b16_tok_s"] > 0 for r in rows)
    assert rows[0]["weights_mib"] > rows[1]["weights_mib"] > rows[3]["weights_mib"]
    assert result["decode"] == ["eager"]


def test_ratio_change_bench_reruns_only_what_the_ratio_feeds(tiny_model_dir):
    # up to the solve (what follows it reruns too: test_pipeline's ratio change shows that)
    result = ratio_change.main(["--target", "allocate-ranks", "--set", f"model.name={tiny_model_dir}",
                                "--set", "calibration.samples=4", "--set", "calibration.seqlen=32"])
    upstream = {"collect-calibration", "compute-covariances", "compute-spectra", "compute-sensitivity"}
    assert upstream <= set(stage_names()) and set(result["first_s"]) == {"dvc repro", *upstream, "allocate-ranks"}
    assert set(result["after_ratio_change_s"]) == {"dvc repro", "allocate-ranks"}
    assert 0 < result["share"] < 1


def test_kernels_bench_times_eigh_and_grams_and_prices_float32_eigh(tmp_path):
    result = kernels.main(["--device", "cpu", "--size", "64", "--json", str(tmp_path / "k.json")])
    assert {"eigh 64 float64", "eigh 64 float32", "gram 172 + add into float64"} <= set(result["kernels_ms"])
    assert result["float32_eigh_loss_excess"] >= -1e-9  # float64 eigh is the optimum; float32 can only lose
    assert "overlap" not in result  # a GPU-only experiment


def test_load_by_layer_bench_measures_all_four_steps_and_compares_them(tmp_path):
    from bench.load_by_layer import STEPS, main

    main(["--size", "tiny", "--dir", str(tmp_path / "model"), "--work", str(tmp_path / "work"),
          "--windows", "4", "--seqlen", "16", "--json", str(tmp_path / "out.json")])
    result = json.loads((tmp_path / "out.json").read_text())
    assert [r["step"] for r in result["rows"]] == list(STEPS)
    assert all(r["peak_rss_gib"] > 0 and r["wall_s"] > 0 for r in result["rows"])
    assert result["equal"] == {"stats": True, "compressed": True}
    assert not (tmp_path / "work").exists()


def test_streamed_eval_bench_scores_both_ways_alike(tmp_path):
    result = streamed_eval.main(["--shape", "tiny", "--device", "cpu", "--samples", "4", "--seqlen", "32",
                                 "--json", str(tmp_path / "streamed.json")])
    assert [row["mode"] for row in result["rows"]] == ["streamed", "whole"]
    assert result["ppl_relative_difference"] < 1e-5 and result["rows"][0]["ppl"] > 1
    assert json.loads((tmp_path / "streamed.json").read_text())["command"].startswith("python -m bench.streamed_eval")
