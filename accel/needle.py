"""Deterministic needle-in-a-haystack prompts, measured in the model's own tokens.

`build_needle_prompt(tokenizer, context_tokens, depth)` hides one fact (the *needle*) at a chosen depth inside
filler text that is generated from a seed (plain, varied, number-free sentences: no external text), asks for it at
the end, and returns the prompt with its answer. `needle_found(text, answer)` scores a generation.

The prompt ends with the start of the answer ("... The pass key is"), which makes even 135M-parameter models answer
with the number right away. When the tokenizer has a chat template (SmolLM2-Instruct) the haystack and question go
in a user turn and the answer prefix opens the assistant turn; without one (the Gemma-3-270M GGUF is a base model
and ships no template) a plain "Question: / Answer:" layout is used.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

__all__ = ["NeedlePrompt", "build_needle_prompt", "needle_found", "filler_sentences", "NEEDLE_KINDS"]

# Filler vocabulary: ordinary words, no digits, nothing that looks like a key or a number.
_SUBJECTS = [
    "The old fisherman", "A quiet librarian", "The young gardener", "Our neighbour", "The tired baker",
    "A curious child", "The village teacher", "The tall carpenter", "A travelling musician", "The shepherd",
    "The painter", "A careful doctor", "The mayor", "An elderly poet", "The ferry captain", "The farmer's daughter",
    "A wandering monk", "The clockmaker", "The new postman", "A stubborn goat",
]
_VERBS = [
    "walked slowly along", "often thought about", "painted a picture of", "told a long story about",
    "carefully repaired", "spent the afternoon near", "wrote a letter about", "quietly admired",
    "forgot everything about", "sang a song about", "cleaned", "dreamed of", "searched for", "watched",
    "complained about", "laughed at", "carried a basket to", "planted flowers beside",
]
_OBJECTS = [
    "the river bank", "the stone bridge", "the bakery on the corner", "the empty market square",
    "the lighthouse", "the apple orchard", "the narrow mountain path", "the wooden boat", "the church tower",
    "the library garden", "the frozen lake", "the windmill", "the little harbour", "the train station",
    "the meadow behind the school", "the abandoned mill", "the village well", "the pine forest",
]
_TAILS = [
    "before the sun went down", "while the rain kept falling", "on a cold winter morning",
    "as the bells rang in the distance", "without saying a word", "because nobody else would",
    "after a long and busy week", "while the birds were singing", "under a grey and heavy sky",
    "when the wind changed direction", "just as the shops were closing", "in the warm evening light",
]
_REMARKS = [
    "Nobody could remember a calmer day.", "The air smelled of bread and wet leaves.",
    "It was the kind of place where little ever changed.", "Later that evening everyone went home early.",
    "The road was quiet and the fields were green.", "Some people said it would rain again tomorrow.",
    "Life in the valley moved at its own gentle pace.", "The cat slept in the sun by the door.",
    "A few clouds drifted slowly over the hills.", "Children played games in the street until dark.",
]


def filler_sentences(seed: int = 0):
    """Yield an endless, deterministic stream of varied plain sentences (no digits) for the given seed."""
    rng = random.Random(seed)
    while True:
        if rng.random() < 0.2:
            yield rng.choice(_REMARKS)
        else:
            yield f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."


@dataclass(frozen=True)
class _NeedleKind:
    intro: str  # task description placed before the haystack
    needle: str  # the sentence hidden in the haystack, with {answer}
    question: str  # asked after the haystack
    answer_prefix: str  # start of the answer, placed where the model continues
    digits: int  # length of the random answer


NEEDLE_KINDS = {
    "passkey": _NeedleKind(
        intro="There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the pass key.",
        needle="The pass key is {answer}. Remember it. {answer} is the pass key.",
        question="What is the pass key?",
        answer_prefix="The pass key is",
        digits=5,
    ),
    "magic_number": _NeedleKind(
        intro="A special magic number is hidden inside the following text. Find it and memorize it.",
        needle="The special magic number is {answer}.",
        question="What is the special magic number mentioned in the text?",
        answer_prefix="The special magic number is",
        digits=4,
    ),
}


@dataclass
class NeedlePrompt:
    """A built prompt. `input_ids` is what to feed the model (already includes special tokens)."""

    prompt_text: str
    input_ids: list[int]
    answer: str
    needle: str
    question: str
    depth: float
    needle_kind: str
    needle_token_start: int  # approximate token index where the needle starts
    needle_token_end: int  # approximate token index just after the needle
    chat_template: bool
    seed: int
    meta: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, kind: _NeedleKind, haystack: str, use_chat: bool) -> str:
    body = f"{kind.intro}\n\n{haystack}\n\n{kind.question}"
    if use_chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
        )
        return text + kind.answer_prefix
    return f"{body}\nAnswer: {kind.answer_prefix}"


def build_needle_prompt(
    tokenizer,
    context_tokens: int,
    depth: float = 0.5,
    seed: int = 0,
    needle_kind: str = "magic_number",
    use_chat_template: bool | None = None,
    answer: str | None = None,
) -> NeedlePrompt:
    """Build a needle-in-a-haystack prompt of about `context_tokens` tokens (within a few tokens, never more).

    depth: where the needle goes, 0.0 = start of the haystack, 1.0 = its end.
    seed: picks the filler sentences and the answer, so the same arguments always give the same prompt.
    use_chat_template: default: use it when the tokenizer has one.
    """
    if needle_kind not in NEEDLE_KINDS:
        raise ValueError(f"unknown needle_kind {needle_kind!r}; choose one of {sorted(NEEDLE_KINDS)}")
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth must be between 0.0 and 1.0 (a fraction of the haystack), got {depth}")
    kind = NEEDLE_KINDS[needle_kind]
    use_chat = _has_chat_template(tokenizer) if use_chat_template is None else bool(use_chat_template)
    add_special = not use_chat  # a chat template writes its own special tokens
    rng = random.Random(f"needle-{seed}")
    if answer is None:
        answer = str(rng.randrange(10 ** (kind.digits - 1), 10**kind.digits))
    needle = kind.needle.format(answer=answer)

    overhead = len(_encode(tokenizer, _render(tokenizer, kind, needle, use_chat), add_special))
    budget = int(context_tokens) - overhead
    if budget < 0:
        raise ValueError(
            f"context_tokens={context_tokens} is too small: the question and needle alone take {overhead} tokens; "
            f"ask for at least {overhead + 16}"
        )

    # Gather sentences until their (separately measured) lengths fill the budget; joined text is close to additive.
    sentences, lengths, total = [], [], 0
    for sentence in filler_sentences(seed):
        n = len(_encode(tokenizer, " " + sentence, False))
        if total + n > budget:
            break
        sentences.append(sentence)
        lengths.append(n)
        total += n

    def assemble(sents):
        cut = 0 if not sents else min(len(sents), int(round(depth * len(sents))))
        parts = sents[:cut] + [needle] + sents[cut:]
        return " ".join(parts)

    # Trim from the end until the real tokenized prompt fits (tokenization is nearly, not exactly, additive).
    while True:
        haystack = assemble(sentences)
        text = _render(tokenizer, kind, haystack, use_chat)
        ids = _encode(tokenizer, text, add_special)
        if len(ids) <= context_tokens or not sentences:
            break
        excess = len(ids) - context_tokens
        drop = 1
        while drop < len(sentences) and sum(lengths[-drop:]) < excess:
            drop += 1
        del sentences[-drop:]
        del lengths[-drop:]

    # Where the needle lands, in tokens: measure the text before it.
    needle_char = text.index(needle)  # unique: it carries the answer
    start = len(_encode(tokenizer, text[:needle_char], add_special))
    end = len(_encode(tokenizer, text[: needle_char + len(needle)], add_special))
    return NeedlePrompt(
        prompt_text=text,
        input_ids=ids,
        answer=answer,
        needle=needle,
        question=kind.question,
        depth=float(depth),
        needle_kind=needle_kind,
        needle_token_start=start,
        needle_token_end=end,
        chat_template=use_chat,
        seed=seed,
        meta={"filler_sentences": len(sentences), "requested_tokens": int(context_tokens)},
    )


def needle_found(generated_text: str, answer: str) -> bool:
    """True when the answer appears in the generated text as a whole token (digits not glued to other digits)."""
    answer = str(answer).strip()
    if not answer:
        return False
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])", generated_text) is not None
