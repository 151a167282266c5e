"""LongBench (arXiv 2308.14508) from local jsonl files: loading, prompts, middle truncation and metrics.

Files are LongBench's own format, one ``DATASET.jsonl`` per task (fields ``input``, ``context``, ``answers``,
``all_classes``, ``length``, ``_id``), in a folder you provide (no download here). Prompts and generation
lengths follow LongBench's ``dataset2prompt`` / ``dataset2maxlen``; a prompt longer than the model's budget keeps
its first and last halves (LongBench's middle truncation); metrics are LongBench's, re-implemented without extra
dependencies (token F1, ROUGE-L F on tokens, classification accuracy, code edit similarity, count, retrieval).
"""

from __future__ import annotations

import difflib
import json
import re
import string
from collections import Counter
from pathlib import Path

__all__ = ["load_longbench", "build_prompt", "truncate_middle", "score", "DATASET_METRIC", "DATASET_MAXLEN",
           "qa_f1_score", "rouge_l_score", "classification_score", "code_sim_score", "count_score",
           "retrieval_score", "available_datasets"]

PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
    "question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
    "{context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if "
    "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using "
    "a single phrase or sentence if possible. If the question cannot be answered based on the information in the "
    "article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
    "\"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the "
    "above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot "
    "be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no "
    "question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}"
    "\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
    "question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: "
    "{input}\nAnswer:",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other "
    "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
    "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query "
    "in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
    "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}"
    "\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n"
    "{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other "
    "words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n"
    "{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
    "carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. "
    "In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
    "count of unique paragraphs after removing duplicates. The output format should only contain the number, such "
    "as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
    "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the "
    "number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", "
    "\"Paragraph 2\", etc.\n\nThe answer is: ",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
PROMPTS["2wikimqa"] = PROMPTS["hotpotqa"]
PROMPTS["musique"] = PROMPTS["hotpotqa"]
GENERIC_PROMPT = "{context}\n\nQuestion: {input}\nAnswer:"

DATASET_MAXLEN = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
                  "musique": 32, "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32,
                  "samsum": 128, "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64}


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    p, r = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * p * r / (p + r)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_score(prediction: str, ground_truth: str, **_) -> float:
    """ROUGE-L F-measure on lower-cased word tokens (LongBench uses the `rouge` package's rouge-l f)."""
    a, b = prediction.lower().split(), ground_truth.lower().split()
    lcs = _lcs(a, b)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def classification_score(prediction: str, ground_truth: str, all_classes=None, **_) -> float:
    matches = [c for c in (all_classes or []) if c in prediction]
    matches = [m for m in matches if not (m in ground_truth and m != ground_truth)]
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
    """Edit similarity of the first code line of the answer (LongBench: fuzz.ratio / 100)."""
    lines = prediction.lstrip("\n").split("\n")
    pred = next((ln for ln in lines if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return difflib.SequenceMatcher(None, pred, ground_truth).ratio()


def count_score(prediction: str, ground_truth: str, **_) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(str(n) == str(ground_truth) for n in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    m = re.findall(r"Paragraph (\d+)", ground_truth)
    if not m:
        return 0.0
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == m[0] for n in numbers) / len(numbers)


DATASET_METRIC = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score, "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score, "musique": qa_f1_score, "gov_report": rouge_l_score, "qmsum": rouge_l_score,
    "multi_news": rouge_l_score, "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_l_score,
    "passage_retrieval_en": retrieval_score, "passage_count": count_score, "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}


def score(dataset: str, prediction: str, answers: list[str], all_classes=None) -> float:
    """LongBench's per-sample score: the best over the reference answers (0..1)."""
    metric = DATASET_METRIC.get(dataset, qa_f1_score)
    if dataset in ("trec", "triviaqa", "samsum", "lsht"):
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max((metric(prediction, gt, all_classes=all_classes) for gt in answers), default=0.0)


def available_datasets(folder: str | Path) -> list[str]:
    folder = Path(folder)
    return sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []


def load_longbench(folder: str | Path, dataset: str, limit: int | None = None) -> list[dict]:
    """Rows of ``FOLDER/DATASET.jsonl``; a missing folder or file names what to provide."""
    folder = Path(folder).expanduser()
    path = folder / f"{dataset}.jsonl"
    if not path.is_file():
        have = available_datasets(folder)
        raise FileNotFoundError(
            f"LongBench file {path} not found; put LongBench's {dataset}.jsonl (from its data.zip) in {folder}"
            + (f" (that folder has: {', '.join(have)})" if have else " (that folder has no .jsonl files)"))
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc})") from exc
            for key in ("context", "answers"):
                if key not in row:
                    raise ValueError(f"{path}:{n}: LongBench rows need '{key}'")
            row.setdefault("input", "")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def truncate_middle(tokenizer, text: str, max_tokens: int) -> str:
    """LongBench's truncation: keep the first and last max_tokens/2 tokens of a prompt that is too long."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    half = max_tokens // 2
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[len(ids) - (max_tokens - half):], skip_special_tokens=True))


def build_prompt(dataset: str, row: dict, tokenizer, max_tokens: int,
                 use_chat_template: bool | None = None) -> tuple[str, bool]:
    """(prompt, chat template used) for one row, middle-truncated to ``max_tokens`` before the chat template."""
    text = PROMPTS.get(dataset, GENERIC_PROMPT).format(context=row["context"], input=row.get("input", ""))
    text = truncate_middle(tokenizer, text, max_tokens)
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if use_chat_template is None else use_chat_template
    # LongBench leaves few-shot / code tasks without a chat template
    use_chat = use_chat and dataset not in ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
    if use_chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text, use_chat
