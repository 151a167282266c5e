"""Short version of scripts/eval_prefill_niah.py: SmolLM2-135M, one ~2.3K-token prompt (18 blocks of 128), two
needle depths, dense vs flexprefill at defaults: same answers, high attention recall, and really sparse."""

import os
import sys
from pathlib import Path

import pytest
import torch

from accel import models
from accel.needle import build_needle_prompt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from eval_prefill_niah import run_case  # noqa: E402

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    try:
        path = models.fetch_demo_model("smollm2", quiet=True)
    except models.DownloadError as exc:
        pytest.skip(f"demo model could not be downloaded: {exc}".splitlines()[0])
    return models.load_model(str(path), device="cpu", dtype="float32", quiet=True)


@pytest.mark.parametrize("depth", [0.25, 0.75])
def test_flexprefill_finds_needle_like_dense(smollm2, depth):
    model, tok = smollm2
    prompt = build_needle_prompt(tok, 2300, depth=depth, seed=3)
    dense = run_case(model, tok, "dense", {}, prompt)
    sparse = run_case(model, tok, "flexprefill", {}, prompt)
    assert dense["found"], dense
    assert sparse["found"], sparse
    assert sparse["recall"] >= 0.9 and sparse["density"] < 1.0
