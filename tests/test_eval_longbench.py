"""LongBench from local jsonl: loading, middle truncation, prompts and metrics."""

import json

import pytest

from accel.eval import longbench as lb
from test_eval_synth import tiny_tokenizer


def test_metrics():
    assert lb.qa_f1_score("The Eiffel Tower", "eiffel tower") == 1.0
    assert 0 < lb.qa_f1_score("the tall Eiffel tower in Paris", "Eiffel Tower") < 1
    assert lb.qa_f1_score("no", "yes") == 0.0
    assert lb.rouge_l_score("a b c d", "a b c d") == 1.0
    assert lb.rouge_l_score("a x b y", "a b") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert lb.classification_score("Type: LOC", "LOC", all_classes=["LOC", "HUM", "NUM"]) == 1.0
    assert lb.classification_score("LOC or HUM", "LOC", all_classes=["LOC", "HUM"]) == 0.5
    assert lb.code_sim_score("x = foo(1)\nmore", "x = foo(1)") == 1.0
    assert lb.code_sim_score("# comment\ny = 2", "y = 2") == 1.0
    assert lb.count_score("There are 7 paragraphs", "7") == 1.0
    assert lb.count_score("7 or 8", "7") == 0.5
    assert lb.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert lb.score("hotpotqa", "Paris", ["London", "Paris"]) == 1.0
    assert lb.score("trec", "LOC\nsomething else HUM", ["LOC"], all_classes=["LOC", "HUM"]) == 1.0


def test_truncate_middle_keeps_both_ends():
    tok = tiny_tokenizer()
    text = "START " + "The old fisherman walked slowly along the river bank. " * 200 + "END"
    cut = lb.truncate_middle(tok, text, 100)
    n = len(tok(cut, add_special_tokens=False)["input_ids"])
    assert cut.startswith("START") and cut.endswith("END") and 90 <= n <= 104
    assert lb.truncate_middle(tok, "short text", 100) == "short text"


def test_loader_and_prompt(tmp_path):
    rows = [{"input": "Where?", "context": "Paris is nice. " * 300, "answers": ["Paris"], "all_classes": None,
             "length": 900, "_id": "a"}]
    (tmp_path / "hotpotqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = lb.load_longbench(tmp_path, "hotpotqa")
    assert got[0]["answers"] == ["Paris"] and lb.available_datasets(tmp_path) == ["hotpotqa"]
    tok = tiny_tokenizer(chat=True)
    prompt, chat = lb.build_prompt("hotpotqa", got[0], tok, 200)
    assert chat and prompt.startswith("<|im_start|>user") and "Question: Where?" in prompt
    few, chat2 = lb.build_prompt("trec", got[0], tok, 200)
    assert not chat2  # LongBench keeps few-shot tasks out of the chat template
    with pytest.raises(FileNotFoundError, match="has: hotpotqa"):
        lb.load_longbench(tmp_path, "qasper")
    (tmp_path / "bad.jsonl").write_text('{"context": "x", "answers": ["y"]}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        lb.load_longbench(tmp_path, "bad")
