"""Offline RULER-style task generators: deterministic, sized in the model's own tokens, scored like RULER."""

import pytest
import transformers

from accel.eval import synth
from accel.needle import filler_sentences

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(chat: bool = False):
    """A byte-level BPE tokenizer trained here (no download) on the text our tasks use."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    gen = filler_sentences(123)
    corpus = [next(gen) for _ in range(400)]
    corpus += [synth.TASKS[t].build(1, 10, 0.5, 1000)[0] for t in synth.TASKS]
    corpus += ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
               "One of the special magic numbers for amber-anchor is: 1234567."]
    tok.train_from_iterator(corpus, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="</s>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("task", synth.OFFLINE_TASKS)
def test_every_task_fits_length_and_is_deterministic(tok, task):
    a = synth.generate_samples(task, tok, 600, num_samples=3, seed=1)
    b = synth.generate_samples(task, tok, 600, num_samples=3, seed=1)
    c = synth.generate_samples(task, tok, 600, num_samples=3, seed=2)
    assert [x["prompt"] for x in a] == [x["prompt"] for x in b]
    assert [x["prompt"] for x in a] != [x["prompt"] for x in c]
    for s in a:
        ids = tok(s["prompt"])["input_ids"]
        assert len(ids) == s["length"] <= 600
        assert s["length"] >= 600 - 60, (task, s["length"])  # filled close to the target
        assert s["outputs"] and all(o in s["input"] for o in s["outputs"])
        assert s["prompt"].endswith(s["gen_prefix"])
    longer = synth.generate_samples(task, tok, 1200, num_samples=1, seed=1)[0]
    assert 1100 <= longer["length"] <= 1200


def test_niah_depth_places_the_needle(tok):
    pos = []
    for d in (0.0, 0.5, 1.0):
        s = synth.generate_samples("niah_single", tok, 800, num_samples=1, depths=[d])[0]
        assert s["depth"] == d and len(s["outputs"]) == 1
        pos.append(s["input"].index(s["outputs"][0]) / len(s["input"]))
    assert pos[0] < 0.2 < pos[1] < 0.8 < pos[2]
    cycled = synth.generate_samples("niah_single", tok, 500, num_samples=4, depths=[0.0, 1.0])
    assert [s["depth"] for s in cycled] == [0.0, 1.0, 0.0, 1.0]


def test_multi_needle_tasks(tok):
    mv = synth.generate_samples("niah_multivalue", tok, 700, num_samples=1)[0]
    mq = synth.generate_samples("niah_multiquery", tok, 700, num_samples=1)[0]
    mk = synth.generate_samples("niah_multikey", tok, 700, num_samples=1)[0]
    assert len(mv["outputs"]) == 4 and len(mq["outputs"]) == 4 and len(mk["outputs"]) == 1
    assert mk["input"].count("One of the special magic numbers for") == 4
    vt = synth.generate_samples("vt", tok, 700, num_samples=1)[0]
    assert len(vt["outputs"]) == 5 and all(f"VAR {v} =" in vt["input"] for v in vt["outputs"])


def test_chat_template_is_used_when_present():
    chat = tiny_tokenizer(chat=True)
    s = synth.generate_samples("niah_single", chat, 500, num_samples=1)[0]
    assert s["chat_template"] and s["prompt"].startswith("<|im_start|>user\n")
    assert len(chat(s["prompt"], add_special_tokens=False)["input_ids"]) == s["length"] <= 500
    plain = synth.generate_samples("niah_single", chat, 500, num_samples=1, use_chat_template=False)[0]
    assert not plain["chat_template"] and "<|im_start|>" not in plain["prompt"]


def test_scoring_is_rulers_string_match():
    assert synth.score_sample(" 1234567.", ["1234567"]) == 1.0
    assert synth.score_sample("ABCDE and FGHIJ", ["ABCDE", "FGHIJ", "KLMNO", "PQRST"]) == 0.5
    assert synth.string_match_all(["x 1", "2"], [["1"], ["3"]]) == 0.5
    assert synth.string_match_part(["a b"], [["b", "c"]]) == 1.0
    assert synth.score_sample("", ["1"]) == 0.0


def test_bad_input(tok):
    with pytest.raises(synth.UnknownTaskError) as e:
        synth.generate_samples("niah_nope", tok, 500)
    assert "niah_single" in str(e.value) and "fwe" in str(e.value)
    with pytest.raises(synth.LengthTooSmallError, match="at least"):
        synth.generate_samples("niah_single", tok, 20)
    with pytest.raises(ValueError, match="depth"):
        synth.generate_samples("niah_single", tok, 500, depths=[1.5])
