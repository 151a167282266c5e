"""scripts/topk_search_passes.py replays the decode top-k's search: its cut selects the kernel's pages, and starting
on the finite range shortens the search on Quest rows."""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import topk_search_passes as T  # noqa: E402

from accel.kernels.triton.decode_topk import select_pages  # noqa: E402


def test_simulated_cut_selects_the_kernels_pages():
    k = 40
    for s in T.rows("quest", 3, 512, seed=1):
        key = T.keys_of(s)
        want = select_pages(torch.from_numpy(s)[None, None], k, kv_len=512 * 16, page_size=16)[0][0, 0]
        for finite in (False, True):
            cut, _ = T.ternary_passes(key, k, finite)
            got = np.flatnonzero(key >= cut)  # continuous rows: no ties at the cut
            assert got.tolist() == want.tolist(), finite


def test_finite_start_takes_fewer_passes_on_quest_rows():
    whole, finite = [], []
    for s in T.rows("quest", 4, 1024, seed=2):
        key = T.keys_of(s)
        whole.append(T.ternary_passes(key, 64, False)[1])
        finite.append(T.ternary_passes(key, 64, True)[1])
    assert sum(finite) < sum(whole), (finite, whole)
