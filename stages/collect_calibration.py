"""collect-calibration: random windows of the calibration dataset (calibration.sampler)."""
from safetensors.torch import save_file

from svdcore.atomic import atomic_path
from svdcore.calibration import calibration_windows
from svdcore.data import load_text, tokenize
from svdcore.model import check_seqlen, load_config, load_tokenizer
from stages.common import run

OUT = "artifacts/calibration.safetensors"


def work(params):
    cal = params.calibration
    check_seqlen(load_config(params.model.name), cal.seqlen, "calibration.seqlen")
    tokenizer = load_tokenizer(params.model.name)
    text = load_text(cal.dataset)
    ids = tokenize(tokenizer, text)
    windows = calibration_windows(tokenizer, text, cal.sampler, cal.samples, cal.seqlen, cal.seed, ids)
    with atomic_path(OUT) as tmp:
        save_file({"input_ids": windows.contiguous()}, str(tmp), metadata={"dataset": cal.dataset})
    return {"dataset_tokens": ids.numel()}


if __name__ == "__main__":
    run("collect-calibration", work)
