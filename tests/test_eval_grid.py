"""accel-eval on a tiny random Llama: tables, plots, resume, corrupt cells recomputed, bad input."""

import json

import pytest
import transformers

from accel.eval import cli, grid
from conftest import save_tiny_llama
from test_eval_synth import tiny_tokenizer

BASE = ["--policy", "dense", "--policy", "streaming:sink=4,window=64", "--lengths", "300,500", "--tasks",
        "niah_single,vt", "--samples", "2", "--depths", "0,1", "--max-new-tokens", "3", "--backend", "reference",
        "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-eval-llama"), tiny_tokenizer(chat=True))


def test_epilog_names_the_plots_written():
    """The help promises the files the grid writes: one needle heatmap per niah task."""
    epilog = cli.build_parser().epilog
    assert "OUT/needle_heatmap_TASK.png" in epilog and "needle_heatmap.png" not in epilog


def _run(capsys, argv):
    code = cli.main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_grid_writes_tables_plots_and_resumes(capsys, tiny_dir, tmp_path):
    out = tmp_path / "ev"
    code, stdout, err = _run(capsys, ["--model", str(tiny_dir), "--out", str(out), *BASE])
    assert code == 0, err
    res = json.loads((out / "eval.json").read_text())
    assert res["meta"]["cells_computed"] == 8 and res["meta"]["command"].startswith("accel-eval --model")
    assert len(res["cells"]) == 8 and all(0 <= c["score"] <= 1 for c in res["cells"])
    assert all(c["computed_on"] == "cpu, float32" for c in res["cells"])  # each cell says where it ran
    assert res["meta"]["cells_computed_on"] == {"cpu, float32": 8}
    md = (out / "eval.md").read_text()
    assert "Cells computed on" in md and "cpu, float32: 8" in md
    assert "| streaming:sink=4,window=64 | 500 |" in md and "| policy | length | niah_single | vt | mean |" in md
    assert (out / "needle_heatmap_niah_single.png").stat().st_size > 1000
    assert (out / "accuracy_vs_length.png").stat().st_size > 1000
    assert "| dense | 300 |" in stdout
    cells = sorted((out / "cells").glob("*.json"))
    assert len(cells) == 8

    # corrupt one cell, half-write another, edit a third: all three are recomputed, the rest reused
    cells[0].write_text("{not json")
    cells[1].write_text(cells[1].read_text()[:50])
    body = json.loads(cells[2].read_text())
    body["payload"]["score"] = 1.0
    cells[2].write_text(json.dumps(body))
    before = {p.name: p.read_text() for p in cells[3:]}
    code, _, err = _run(capsys, ["--model", str(tiny_dir), "--out", str(out), *BASE])
    assert code == 0, err
    res = json.loads((out / "eval.json").read_text())
    assert res["meta"]["cells_reused"] == 5 and res["meta"]["cells_computed"] == 3
    assert sorted(res["meta"]["cells_recomputed"]) == sorted(p.name for p in cells[:3])
    assert {p.name: p.read_text() for p in cells[3:]} == before
    for p in cells[:3]:
        json.loads(p.read_text())  # whole again

    # other settings (more samples): nothing is mixed in
    code, _, err = _run(capsys, ["--model", str(tiny_dir), "--out", str(out), *BASE[:-1], "--samples", "1"])
    assert code == 0, err
    assert json.loads((out / "eval.json").read_text())["meta"]["cells_computed"] == 8


def test_cell_file_checks(tmp_path):
    key = {"a": 1}
    p = tmp_path / "c.json"
    grid.write_cell(p, key, {"score": 0.5})
    assert grid.read_cell(p, key) == {"score": 0.5}
    with pytest.raises(grid.CellError, match="other settings"):
        grid.read_cell(p, {"a": 2})
    p.write_text(p.read_text()[:-5])
    with pytest.raises(grid.CellError, match="corrupt or half-written"):
        grid.read_cell(p, key)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("argv, match", [
    (["--tasks", "needle_nope"], "offline tasks: niah_single"),
    (["--lengths", "1020"], "exceeds the model's context of 1024"),
    (["--lengths", "20"], "too small"),
    (["--policy", "streaming:windw=3"], "unknown option"),
    (["--tasks", "longbench:hotpotqa"], "--longbench-dir"),
    (["--depths", "2"], "--depths"),
])
def test_bad_input_one_line_exit_2(capsys, tiny_dir, tmp_path, argv, match):
    args = ["--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--samples", "1", "--device", "cpu", "--quiet"]
    code, out, err = _run(capsys, args + argv)
    assert code == 2, (out, err)
    assert "Traceback" not in err and match in err and err.startswith("accel-eval: error:")


def test_longbench_task_in_grid(capsys, tiny_dir, tmp_path):
    rows = [{"input": "Which city?", "context": "The fair was held in Paris. " * 80, "answers": ["Paris"],
             "all_classes": None, "length": 500, "_id": str(i)} for i in range(2)]
    (tmp_path / "hotpotqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "lb"
    code, stdout, err = _run(capsys, ["--model", str(tiny_dir), "--out", str(out), "--tasks", "longbench:hotpotqa",
                                      "--longbench-dir", str(tmp_path), "--lengths", "200", "--samples", "2",
                                      "--max-new-tokens", "3", "--policy", "dense", "--device", "cpu", "--quiet",
                                      "--no-plots"])
    assert code == 0, err
    cell = json.loads((out / "eval.json").read_text())["cells"][0]
    assert cell["task"] == "longbench:hotpotqa" and cell["n"] == 2


def test_recalibrated_head_map_is_not_reused(capsys, tiny_dir, tmp_path):
    """A duo cell's key carries the digest of the head map's gates: after a recalibration (same path, new gates)
    its cells are recomputed, not silently reused."""
    from accel.policies.duo import model_signature

    cfg = transformers.AutoConfig.from_pretrained(tiny_dir)
    path = tmp_path / "map.json"

    def write_map(gates):
        path.write_text(json.dumps({"format": "accel-duo-headmap/1", "model": model_signature(cfg),
                                    "gates": gates}))

    out = tmp_path / "ev"
    argv = ["--model", str(tiny_dir), "--out", str(out), "--policy", f"duo:duo_map={path},sink=4,recent=32",
            "--lengths", "300", "--tasks", "niah_single", "--samples", "1", "--max-new-tokens", "2", "--backend",
            "reference", "--device", "cpu", "--quiet", "--no-plots"]
    write_map([[0.9, 0.1], [0.8, 0.2]])
    assert _run(capsys, argv)[0] == 0
    assert json.loads((out / "eval.json").read_text())["meta"]["cells_computed"] == 1
    assert _run(capsys, argv)[0] == 0  # same map: reused
    assert json.loads((out / "eval.json").read_text())["meta"]["cells_reused"] == 1
    write_map([[0.1, 0.9], [0.2, 0.8]])  # recalibrated: the other heads stream
    assert _run(capsys, argv)[0] == 0
    meta = json.loads((out / "eval.json").read_text())["meta"]
    assert meta["cells_computed"] == 1 and meta["cells_recomputed"]


def test_changed_default_is_not_reused(capsys, tiny_dir, tmp_path, monkeypatch):
    """A cell's key holds the policy's resolved options, defaults included: after a default changes (here the
    streaming window), the cells of an entry that does not name that option are recomputed."""
    from accel.policies.streaming import StreamingPolicy

    out = tmp_path / "ev"
    argv = ["--model", str(tiny_dir), "--out", str(out), "--policy", "streaming:sink=4", "--lengths", "300",
            "--tasks", "niah_single", "--samples", "1", "--max-new-tokens", "2", "--backend", "reference",
            "--device", "cpu", "--quiet", "--no-plots"]
    assert _run(capsys, argv)[0] == 0
    assert _run(capsys, argv)[0] == 0  # nothing changed: reused
    assert json.loads((out / "eval.json").read_text())["meta"]["cells_reused"] == 1
    cell = next((out / "cells").glob("*.json"))
    assert json.loads(cell.read_text())["key"]["config"]["prefill"]["window"] == StreamingPolicy.window
    monkeypatch.setattr(StreamingPolicy, "window", 64)  # the default the entry relies on
    monkeypatch.setattr(StreamingPolicy.__init__, "__defaults__",
                        tuple(64 if d == 4096 else d for d in StreamingPolicy.__init__.__defaults__))
    assert _run(capsys, argv)[0] == 0
    meta = json.loads((out / "eval.json").read_text())["meta"]
    assert meta["cells_computed"] == 1 and meta["cells_recomputed"]
    assert json.loads(cell.read_text())["key"]["config"]["prefill"]["window"] == 64


@pytest.mark.parametrize("policy", ["xattention", "proxy"])
def test_threshold_map_change_is_not_reused(capsys, tiny_dir, tmp_path, policy):
    """A cell's key carries the digest of the per-layer thresholds its policy read: a recalibrated map at the
    same path is recomputed."""
    from accel.policies.duo import model_signature
    from accel.policies.threshold_map import map_format

    cfg = transformers.AutoConfig.from_pretrained(tiny_dir)
    path = tmp_path / "thr.json"

    def write_map(t):
        path.write_text(json.dumps({"format": map_format(policy), "model": model_signature(cfg),
                                    "thresholds": [t, t]}))

    out = tmp_path / "ev"
    argv = ["--model", str(tiny_dir), "--out", str(out), "--policy", f"{policy}:layer_thresholds={path}",
            "--lengths", "300", "--tasks", "niah_single", "--samples", "1", "--max-new-tokens", "2", "--backend",
            "reference", "--device", "cpu", "--quiet", "--no-plots"]
    write_map(0.9)
    assert _run(capsys, argv)[0] == 0
    assert _run(capsys, argv)[0] == 0
    assert json.loads((out / "eval.json").read_text())["meta"]["cells_reused"] == 1
    write_map(0.5)
    assert _run(capsys, argv)[0] == 0
    meta = json.loads((out / "eval.json").read_text())["meta"]
    assert meta["cells_computed"] == 1 and meta["cells_recomputed"]


def test_quest_layer_map_change_is_not_reused(capsys, tiny_dir, tmp_path):
    """A quest cell's key carries the digest of the dense layers its layer map lists: a recalibrated map at the
    same path is recomputed."""
    from accel.policies.duo import model_signature
    from accel.policies.quest import LAYER_MAP_FORMAT

    cfg = transformers.AutoConfig.from_pretrained(tiny_dir)
    path = tmp_path / "quest.json"

    def write_map(dense):
        path.write_text(json.dumps({"format": LAYER_MAP_FORMAT, "model": model_signature(cfg),
                                    "dense_layers": dense, "calibration": {"page_size": 16, "budget": 64}}))

    out = tmp_path / "ev"
    argv = ["--model", str(tiny_dir), "--out", str(out), "--policy",
            f"quest:layer_map={path},budget=64,dense_layers=0", "--lengths", "300", "--tasks", "niah_single",
            "--samples", "1", "--max-new-tokens", "2", "--backend", "reference", "--device", "cpu", "--quiet",
            "--no-plots"]
    write_map([])
    assert _run(capsys, argv)[0] == 0
    cell = json.loads(next((out / "cells").glob("*.json")).read_text())["payload"]
    assert cell["calibration"] == {"quest": str(path)}  # the map the cell ran with, and each phase's density
    assert cell["mean_prefill_density"] == 1.0 and cell["mean_decode_density"] < 1.0
    assert _run(capsys, argv)[0] == 0
    assert json.loads((out / "eval.json").read_text())["meta"]["cells_reused"] == 1
    write_map([1])
    assert _run(capsys, argv)[0] == 0
    meta = json.loads((out / "eval.json").read_text())["meta"]
    assert meta["cells_computed"] == 1 and meta["cells_recomputed"]


def test_other_tokenization_is_not_reused(capsys, tiny_dir, tmp_path, monkeypatch):
    """A cell's key holds a digest of how the tokenizer builds a probe prompt: cells made under another tokenization
    (here a stand-in digest) are recomputed, not mixed in."""
    out = tmp_path / "ev"
    argv = ["--model", str(tiny_dir), "--out", str(out), "--policy", "dense", "--lengths", "300", "--tasks",
            "niah_single", "--samples", "1", "--max-new-tokens", "2", "--backend", "reference", "--device", "cpu",
            "--quiet", "--no-plots"]
    assert _run(capsys, argv)[0] == 0
    cell = next((out / "cells").glob("*.json"))
    assert len(json.loads(cell.read_text())["key"]["tokenizer"]) == 64
    assert _run(capsys, argv)[0] == 0
    assert json.loads((out / "eval.json").read_text())["meta"]["cells_reused"] == 1
    monkeypatch.setattr(grid, "tokenizer_digest", lambda tok: "0" * 64)
    assert _run(capsys, argv)[0] == 0
    meta = json.loads((out / "eval.json").read_text())["meta"]
    assert meta["cells_computed"] == 1 and meta["cells_recomputed"] == [cell.name]


def test_tokenizer_digest_tells_tokenizations_apart():
    plain, chat = tiny_tokenizer(), tiny_tokenizer(chat=True)
    assert grid.tokenizer_digest(plain) == grid.tokenizer_digest(tiny_tokenizer())  # deterministic
    assert grid.tokenizer_digest(plain) != grid.tokenizer_digest(chat)  # the chat template changes the prompt


def test_vertical_slash_head_map_is_in_the_cell_key(tmp_path):
    """A vertical_slash cell's key holds a digest of the head map it runs (patterns, sizes, dense layers): a map
    changed in place (here its dense layers) is another setting; no map, no digest."""
    from conftest import tiny_model

    model = tiny_model("llama")  # 2 layers x 4 heads
    path = tmp_path / "m.json"
    pol = lambda **o: {"name": "vertical_slash", "head_map": str(path), **o}  # noqa: E731
    path.write_text(json.dumps({"model": "tiny", "patterns": [["a_shape"] * 4] * 2}))
    first = grid._vs_head_map_digest(pol(), model)
    path.write_text(json.dumps({"model": "tiny", "patterns": [["a_shape"] * 4] * 2, "dense_layers": [1]}))
    second = grid._vs_head_map_digest(pol(), model)
    assert first and second and first != second
    assert grid._vs_head_map_digest(pol(head_map="none"), model) is None
    assert grid._vs_head_map_digest(pol(head_map="auto"), model) is None  # no shipped map for this shape
    assert grid._vs_head_map_digest({"name": "xattention"}, model) is None
