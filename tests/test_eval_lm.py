"""lm-eval integration: `--model accel` runs accel's offline task and lm-eval's own RULER niah_single_1 end to end
on a tiny random Llama (tokenizer trained here, no download); model_args routing; clear errors."""

import builtins
import json

import pytest
import transformers

pytest.importorskip("lm_eval", reason="the eval extra is not installed")

from accel.eval import lm_cli  # noqa: E402
from conftest import save_tiny_llama  # noqa: E402
from test_eval_synth import tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-lm-eval"), tiny_tokenizer())


def test_accel_lm_eval_runs_offline_task_and_ruler_niah_single_1(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = lm_cli.main([
        "--model", "accel", "--model_args",
        f"pretrained={tiny_dir},policy=streaming,sink=4,window=64,backend=reference",
        "--tasks", "accel_niah_single,niah_single_1", "--metadata", '{"max_seq_lengths": [700], "num_samples": 2}',
        "--device", "cpu", "--limit", "2", "--gen_kwargs", "max_gen_toks=4", "--output_path", str(out)])
    assert code == 0
    files = list(out.rglob("results_*.json"))
    assert files, list(out.rglob("*"))
    res = json.loads(files[0].read_text())["results"]
    assert 0.0 <= res["accel_niah_single"]["score,none"] <= 1.0
    assert 0.0 <= res["niah_single_1"]["700,none"] <= 1.0  # RULER reports a metric per length
    assert "streaming" in capsys.readouterr().out


def test_python_api_with_loaded_model(tiny_dir):
    import accel
    from accel.eval.lm import AccelLM, evaluate, split_accel_args

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    res = evaluate(model, tok, tasks=["accel_vt"], policy="dense", backend="reference",
                   metadata={"max_seq_lengths": [400], "num_samples": 1}, limit=1, gen_kwargs="max_gen_toks=2")
    assert "accel_vt" in res["results"] and accel.is_patched(model)
    # an already-patched model keeps its patch when no policy is given
    accel.patch(model, "streaming", backend="reference", sink=4, window=32)
    lm = AccelLM(pretrained=model, tokenizer=tok)
    assert lm.accel_policy == "streaming"
    policy, backend, opts, rest = split_accel_args({"policy": "streaming", "window": 9, "backend": "reference",
                                                    "max_length": 99, "batch_size": 1})
    assert (policy, backend, opts) == ("streaming", "reference", {"window": 9})
    assert rest == {"max_length": 99, "batch_size": 1}
    assert split_accel_args({"backend": "causal"})[1:] == ("auto", {}, {"backend": "causal"})
    with pytest.raises(ValueError, match="unknown option"):
        AccelLM(pretrained=str(tiny_dir), policy="streaming", threshold=0.5, device="cpu")


def test_unknown_task_lists_offline_ones(tiny_dir, capsys):
    code = lm_cli.main(["--model", "accel", "--model_args", f"pretrained={tiny_dir}", "--tasks", "niah_nope",
                        "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "niah_nope" in err and "accel_niah_single" in err and "niah_single_1" in err


def test_length_above_context(tiny_dir, capsys):
    code = lm_cli.main(["--model", "accel", "--model_args", f"pretrained={tiny_dir},backend=reference",
                        "--tasks", "accel_niah_single", "--metadata", '{"max_seq_lengths": [1100], "num_samples": 1}',
                        "--device", "cpu", "--limit", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "exceeds the model's context of 1024" in err


def test_missing_eval_extra_message(monkeypatch, capsys):
    real_import = builtins.__import__

    def fake(name, *a, **k):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    assert lm_cli.main(["--tasks", "x"]) == 2
    err = capsys.readouterr().err
    assert "lm-eval" in err and 'pip install "accel[eval]"' in err
