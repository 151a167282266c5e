"""Offline long-context tasks in the style of RULER (arXiv 2404.06654), generated here and deterministically.

Every task builds a prompt from a number of "units" (haystack sentences, list words, coded words) and a seed; the
number of units is searched so that the prompt is as long as possible without exceeding the requested length in
tokens of the model's own tokenizer. Nothing is downloaded: the haystack is plain number-free sentences generated
in code (`accel.needle.filler_sentences`), keys are adjective-noun pairs and the word lists are written below.

Tasks (all scored by RULER's string match: the share of expected strings that appear in the answer):

| name | what is asked |
| --- | --- |
| niah_single | one needle "One of the special magic numbers for KEY is: VALUE." at a chosen depth |
| niah_multikey | the same, with 3 distractor needles of other keys |
| niah_multivalue | one key with 4 values; all 4 must be returned |
| niah_multiquery | 4 keys asked at once; all 4 values must be returned |
| vt | variable tracking: a chain VAR A = 12345, VAR B = VAR A, ... spread through the haystack |
| cwe | common-word extraction: the 10 most common words of a numbered list |
| fwe | frequent-word extraction: the 3 most frequent coded words of a Zipf-distributed text |
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from accel.needle import filler_sentences

__all__ = ["TASKS", "OFFLINE_TASKS", "Task", "generate_samples", "render_prompt", "string_match_all",
           "string_match_part", "score_sample", "UnknownTaskError", "LengthTooSmallError", "DEFAULT_DEPTHS"]

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

_ADJS = [
    "amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly", "keen", "lucky",
    "mellow", "noisy", "olive", "proud", "quick", "rusty", "silent", "tidy", "upper", "vivid", "wild", "young",
    "zesty", "bold", "crisp", "damp", "early", "fuzzy", "grand", "hasty", "ivory", "jagged", "lively", "misty",
]
_NOUNS = [
    "anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket", "kettle",
    "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "rabbit", "saddle", "tunnel", "umbrella",
    "valley", "wagon", "yard", "zebra", "basket", "castle", "desert", "feather", "glacier", "hammer", "igloo",
]
# Ordinary English words for common-word extraction (no overlap with the filler vocabulary matters: lists only).
_WORDS = """apple border cabin daisy eagle fabric garlic helmet insect jungle kitchen ladder magnet napkin oyster
parrot quilt ribbon salad tablet uncle violin walrus yogurt zipper almond bamboo cactus donkey elbow fossil goblin
hazel iris jigsaw koala lemon mango nutmeg onion peanut radish spinach tomato turnip walnut acorn blanket cobweb
dragon emerald forest gravel hockey iceberg jewel kayak lobster marble nectar octopus pepper raven sponge thimble
tulip vapor wizard anvil banjo cobalt dagger ermine ferret gazebo hornet ink jasmine kiosk llama mosaic nickel
orbit pirate rocket saffron trumpet unicorn velvet willow bucket canyon dune ember flute glove honey ivy jar kite
lily moss nest oak pearl quiver reed shell twig urn vine wheat yarn zinc arrow bell clover drum fern goose hive
lace mint nut owl pine rose seed tent vase wren bridge cloud dust flame grass hill lake moon path rain snow star
stone storm tree wave wind wood brick chalk coal glass iron lead paper silk steel tin wool cotton leather rubber
butter cheese cream flour sugar bread cake candy cookie juice milk soup tea toast beans corn grape melon peach
pear plum berry cherry lime olive bean carrot celery cabbage potato pumpkin squash""".split()
_SYLLABLES = ["ka", "lo", "mi", "ren", "to", "su", "van", "pe", "dri", "gol", "na", "be", "shi", "ur", "fa", "ti",
              "mor", "ze", "qua", "li", "po", "sen", "dra", "ku"]


class UnknownTaskError(KeyError):
    """A task name that does not exist; the message lists the offline tasks."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class LengthTooSmallError(ValueError):
    pass


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJS)}-{rng.choice(_NOUNS)}"


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _distinct(rng: random.Random, make: Callable[[random.Random], str], k: int) -> list[str]:
    out: list[str] = []
    while len(out) < k:
        v = make(rng)
        if v not in out:
            out.append(v)
    return out


def _sentences(seed: int, n: int) -> list[str]:
    gen = filler_sentences(seed)
    return [next(gen) for _ in range(n)]


def _insert(haystack: list[str], items: list[tuple[float, str]]) -> str:
    """Insert (depth, text) items into the haystack sentences at their depth fractions (stable for equal depth)."""
    n = len(haystack)
    slots: dict[int, list[str]] = {}
    for depth, text in items:
        slots.setdefault(min(n, int(round(depth * n))), []).append(text)
    parts: list[str] = []
    for i in range(n + 1):
        parts.extend(slots.get(i, []))
        if i < n:
            parts.append(haystack[i])
    return " ".join(parts)


_NIAH_TEMPLATE = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
                  "I will quiz you about the {type_v} afterwards.\n{context}\nWhat are all the special magic "
                  "{type_v} for {query} mentioned in the provided text?")
_NEEDLE = "One of the special magic numbers for {key} is: {value}."


def _niah(kind: str):
    def build(seed: int, n: int, depth: float | None, length: int):
        rng = random.Random(f"accel-niah-{kind}-{seed}")
        n_keys = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 1, "niah_multiquery": 4}[kind]
        n_vals = 4 if kind == "niah_multivalue" else 1
        keys = _distinct(rng, _key, n_keys)
        values = [_distinct(rng, _number, n_vals) for _ in keys]
        target_depth = rng.random() if depth is None else float(depth)
        needles: list[tuple[float, str]] = []
        for i, (k, vs) in enumerate(zip(keys, values)):
            for j, v in enumerate(vs):
                if kind == "niah_single" or (i == 0 and j == 0 and kind == "niah_multikey"):
                    d = target_depth
                else:
                    d = rng.random()
                needles.append((d, _NEEDLE.format(key=k, value=v)))
        if kind == "niah_multivalue":  # values of one key spread out, the first at the requested depth
            needles = [(target_depth if j == 0 else rng.random(), t) for j, (_, t) in enumerate(needles)]
        queried = keys if kind == "niah_multiquery" else keys[:1]
        outputs = [v for i, k in enumerate(keys) if k in queried for v in values[i]]
        query = ", ".join(queried[:-1]) + ", and " + queried[-1] if len(queried) > 1 else queried[0]
        plural = len(outputs) > 1
        template = _NIAH_TEMPLATE if plural else (
            _NIAH_TEMPLATE.replace("Some", "A").replace("are all", "is").replace("are", "is"))
        type_v = "numbers" if plural else "number"
        context = _insert(_sentences(seed, n), needles)
        text = template.format(type_v=type_v, context=context, query=query)
        prefix = (f"The special magic {type_v} for {query} mentioned in the provided text "
                  f"{'are' if plural else 'is'}")
        return text, prefix, outputs, {"depth": target_depth}

    return build


def _vt(seed: int, n: int, depth: float | None, length: int):
    rng = random.Random(f"accel-vt-{seed}")
    names = _distinct(rng, lambda r: "".join(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)), 5)
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(4)]
    depths = sorted(rng.random() for _ in chain)
    context = _insert(_sentences(seed, n), list(zip(depths, chain)))
    text = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
            f"{context}\nQuestion: Find all variables that are assigned the value {value} in the text above.")
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
              f"assigned the value {value}, they are:")
    return text, prefix, names, {}


def _vocabulary(k: int) -> list[str]:
    words = list(_WORDS)
    rng = random.Random("accel-pseudo-words")
    seen = set(words)
    while len(words) < k:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words[:k]


def _cwe(seed: int, n: int, depth: float | None, length: int):
    # Frequencies scale with the requested length (RULER lowers them for short contexts too).
    freq_cw = max(3, min(30, length // 250))
    freq_ucw = 3 if freq_cw >= 15 else 1
    rng = random.Random(f"accel-cwe-{seed}")
    vocab = _vocabulary(10 + n)
    real = list(_WORDS)
    common = rng.sample(real, 10)
    rest = [w for w in vocab if w not in common]
    random.Random(f"accel-cwe-order-{seed}").shuffle(rest)
    uncommon = rest[:n]
    words = common * freq_cw + uncommon * freq_ucw
    random.Random(f"accel-cwe-shuffle-{seed}-{n}").shuffle(words)
    context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    text = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
            f"ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
            "list?")
    prefix = "Answer: The top 10 words that appear most often in the list are:"
    return text, prefix, common, {"freq_common": freq_cw, "freq_uncommon": freq_ucw}


_FWE_DRAWS: dict[int, list[int]] = {}


def _zipf_ranks(seed: int, n: int) -> list[int]:
    """The first n ranks of a fixed, seeded Zipf(alpha=2) stream (so longer texts extend shorter ones)."""
    import numpy as np

    have = _FWE_DRAWS.get(seed, [])
    if len(have) < n:
        rs = np.random.default_rng(seed + 1_000_003)
        size = max(n, 2 * len(have), 1024)
        draws = rs.zipf(2.0, size * 2)
        have = [int(x) for x in draws[draws <= 500][:size]]
        _FWE_DRAWS[seed] = have
    return have[:n]


def _fwe(seed: int, n: int, depth: float | None, length: int):
    rng = random.Random(f"accel-fwe-{seed}")
    coded = _distinct(rng, lambda r: "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)), 500)
    ranks = _zipf_ranks(seed, max(n, 1))
    words = [coded[r - 1] for r in ranks]
    counts: dict[str, int] = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    top = sorted(counts, key=lambda w: (-counts[w], w))[:3]
    context = " ".join(words)
    text = ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. " + context + "\nQuestion: Do not provide any explanation. What are the three most frequently appeared words in the above coded text?")
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    return text, prefix, top, {"counts": [counts[w] for w in top]}


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    build: Callable
    max_new_tokens: int
    uses_depth: bool = False


TASKS: dict[str, Task] = {
    "niah_single": Task("niah_single", "one needle (key -> 7-digit number) at a chosen depth", _niah("niah_single"),
                        24, uses_depth=True),
    "niah_multikey": Task("niah_multikey", "one needle among 3 distractor needles of other keys",
                          _niah("niah_multikey"), 24, uses_depth=True),
    "niah_multivalue": Task("niah_multivalue", "one key with 4 values; return all 4", _niah("niah_multivalue"), 64,
                            uses_depth=True),
    "niah_multiquery": Task("niah_multiquery", "4 keys asked at once; return all 4 values",
                            _niah("niah_multiquery"), 64),
    "vt": Task("vt", "variable tracking: 5 variables chained to one value", _vt, 32),
    "cwe": Task("cwe", "common-word extraction: the 10 most common words of a list", _cwe, 96),
    "fwe": Task("fwe", "frequent-word extraction: the 3 most frequent coded words", _fwe, 32),
}
OFFLINE_TASKS = tuple(TASKS)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UnknownTaskError(
            f"unknown task {name!r}; offline tasks: {', '.join(OFFLINE_TASKS)} (and longbench:NAME with a local "
            "LongBench folder)")
    return TASKS[name]


def _has_chat(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, text: str, gen_prefix: str, use_chat_template: bool | None = None) -> tuple[str, bool]:
    """The full prompt: a user turn + the answer prefix opening the assistant turn when the tokenizer has a chat
    template; otherwise `text + " " + gen_prefix` (how lm-eval joins a document and its gen_prefix)."""
    use_chat = _has_chat(tokenizer) if use_chat_template is None else bool(use_chat_template)
    if use_chat:
        body = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return body + gen_prefix, True
    return f"{text} {gen_prefix}", False


def _n_tokens(tokenizer, prompt: str, chat: bool) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=not chat)["input_ids"])


def _fit(task: Task, tokenizer, length: int, seed: int, depth, use_chat):
    def measure(n):
        text, prefix, outputs, extra = task.build(seed, n, depth, length)
        prompt, chat = render_prompt(tokenizer, text, prefix, use_chat)
        return len(_n_tokens(tokenizer, prompt, chat)), (text, prefix, outputs, extra, prompt, chat)

    size0, built0 = measure(0)
    if size0 > length:
        raise LengthTooSmallError(
            f"length {length} is too small for task {task.name!r}: its question and needles alone take {size0} "
            f"tokens; ask for at least {size0 + 32}")
    lo, lo_built, hi = 0, built0, 16
    while True:  # find an n that is too long
        size, built = measure(hi)
        if size > length:
            break
        lo, lo_built, hi = hi, built, hi * 2
        if hi > 1_000_000:  # pragma: no cover - tokenizer measuring nothing
            raise ValueError("the tokenizer reports no growth in length; cannot size the prompt")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        size, built = measure(mid)
        if size <= length:
            lo, lo_built = mid, built
        else:
            hi = mid
    return lo, lo_built


def generate_samples(task_name: str, tokenizer, length: int, num_samples: int = 10, seed: int = 0,
                     depths=None, use_chat_template: bool | None = None) -> list[dict]:
    """`num_samples` prompts of at most `length` tokens for one task, deterministic in (task, length, seed).

    Sample i uses seed `seed * 100003 + i`; niah tasks with depths place sample i's needle at depths[i % len].
    Each sample: input (the document), gen_prefix, prompt (what to feed, chat template applied when
    `use_chat_template` or by default when the tokenizer has one), chat_template, outputs (expected strings),
    depth, length (prompt tokens), max_length, max_new_tokens, task, index, seed.
    """
    task = get_task(task_name)
    length = int(length)
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    if task.uses_depth and depths is None:
        depths = DEFAULT_DEPTHS
    out = []
    for i in range(int(num_samples)):
        s = seed * 100003 + i
        depth = None
        if task.uses_depth and depths:
            depth = float(depths[i % len(depths)])
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"depth must be between 0.0 and 1.0, got {depth}")
        n, (text, prefix, outputs, extra, prompt, chat) = _fit(task, tokenizer, length, s, depth, use_chat_template)
        ids = _n_tokens(tokenizer, prompt, chat)
        out.append({
            "task": task.name, "index": i, "seed": s, "input": text, "gen_prefix": prefix, "prompt": prompt,
            "chat_template": chat, "outputs": list(outputs), "depth": extra.get("depth", depth),
            "length": len(ids), "max_length": length, "max_new_tokens": task.max_new_tokens, "units": n,
        })
    return out


def _clean(pred: str) -> str:
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip()


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    """RULER's metric: mean over samples of the share of reference strings found (case-insensitive)."""
    if not preds:
        return 0.0
    return sum(sum(r.lower() in _clean(p).lower() for r in ref) / len(ref) for p, ref in zip(preds, refs)) / len(
        preds)


def string_match_part(preds: list[str], refs: list[list[str]]) -> float:
    """RULER's QA metric: 1 when any reference string is found."""
    if not preds:
        return 0.0
    return sum(max(r.lower() in _clean(p).lower() for r in ref) for p, ref in zip(preds, refs)) / len(preds)


def score_sample(pred: str, outputs: list[str]) -> float:
    return string_match_all([pred], [outputs])
