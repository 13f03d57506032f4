"""Training data the repo makes itself, and a tokenizer trained on it: the embedded default runs offline.

The text comes from a small invented world (animals, colours, counting, sums) through fixed templates:
nothing is copied from anywhere, the same seed gives the same rows, and a tiny model learns it in a minute.
"""

from __future__ import annotations

import random
from typing import Any

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "hen", "elk", "ant", "bat", "yak", "emu"]
COLOURS = ["red", "blue", "green", "gold", "grey", "pink", "black", "white"]
PLACES = ["barn", "hill", "lake", "wood", "field", "cave"]
VERBS = ["sees", "finds", "follows", "greets", "meets", "hears"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]

# The world's fixed facts: every animal has one colour and one home, so questions have one answer.
COLOUR_OF = {a: COLOURS[i % len(COLOURS)] for i, a in enumerate(ANIMALS)}
HOME_OF = {a: PLACES[(3 * i) % len(PLACES)] for i, a in enumerate(ANIMALS)}

GENERATOR_VERSION = 1  # bump when the same seed would give different rows (prepared-data caches are keyed by it)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(5)
    a, b = rng.sample(ANIMALS, 2)
    if kind == 0:
        return f"the {COLOUR_OF[a]} {a} {rng.choice(VERBS)} the {COLOUR_OF[b]} {b} ."
    if kind == 1:
        return f"the {a} lives in the {HOME_OF[a]} ."
    if kind == 2:
        start = rng.randrange(0, 8)
        return "count : " + " ".join(NUMBERS[start:start + rng.randrange(3, 6)]) + " ."
    if kind == 3:
        x, y = rng.randrange(0, 7), rng.randrange(0, 6)
        return f"{NUMBERS[x]} plus {NUMBERS[y]} is {NUMBERS[x + y]} ."
    n = rng.randrange(2, 6)
    return f"{NUMBERS[n]} {a}s walk to the {HOME_OF[a]} ."


def pretrain_texts(n: int, seed: int) -> list[dict[str, str]]:
    """`n` documents of 2-6 sentences: rows {"text": ...} for task: pretrain."""
    rng = random.Random(seed)
    return [{"text": " ".join(_sentence(rng) for _ in range(rng.randrange(2, 7)))} for _ in range(n)]


def _task(rng: random.Random) -> tuple[str, str, str]:
    """(instruction, input, output) for one of four question kinds."""
    kind = rng.randrange(4)
    a = rng.choice(ANIMALS)
    if kind == 0:
        return "what colour is the animal ?", a, COLOUR_OF[a]
    if kind == 1:
        return "where does the animal live ?", a, f"the {a} lives in the {HOME_OF[a]} ."
    if kind == 2:
        x, y = rng.randrange(0, 7), rng.randrange(0, 6)
        return "add the two numbers .", f"{NUMBERS[x]} {NUMBERS[y]}", NUMBERS[x + y]
    start = rng.randrange(0, 8)
    words = NUMBERS[start:start + rng.randrange(2, 5)]
    return "reverse the words .", " ".join(words), " ".join(reversed(words))


def alpaca_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Alpaca-style rows {"instruction", "input", "output"}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        instruction, inp, out = _task(rng)
        rows.append({"instruction": instruction, "input": inp, "output": out})
    return rows


def chat_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Chat rows {"messages": [...]}: an optional system line, one user turn, one assistant answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        instruction, inp, out = _task(rng)
        messages = [{"role": "system", "content": "answer in a few words ."}] if rng.random() < 0.5 else []
        messages += [{"role": "user", "content": f"{instruction} {inp}"}, {"role": "assistant", "content": out}]
        rows.append({"messages": messages})
    return rows


def generate(kind: str, train_samples: int, eval_samples: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of `kind`; eval rows use another seed so they are held out."""
    make = {"pretrain": pretrain_texts, "alpaca": alpaca_rows, "chat": chat_rows}[kind]
    return make(train_samples, seed), make(eval_samples, seed + 1_000_003)


def corpus_for_tokenizer() -> list[str]:
    """Every word the generators can emit, several times, so the tokenizer covers the whole world."""
    words = ANIMALS + [a + "s" for a in ANIMALS] + COLOURS + PLACES + VERBS + NUMBERS
    glue = ["the", "lives", "in", "count", ":", "plus", "is", "walk", "to", ".", "?", "what", "colour", "animal",
            "where", "does", "live", "add", "two", "numbers", "reverse", "words", "answer", "a", "few"]
    return [" ".join(words + glue)] * 4


def train_tokenizer(texts, vocab_size: int, chat_template: str | None = None):
    """A byte-level BPE tokenizer trained here (no download) with pad/bos/eos and chat role tokens, on `texts`
    (any iterable of strings: give a bounded sample of a large corpus) plus the tiny world's words."""
    import itertools

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(itertools.chain(texts, corpus_for_tokenizer()), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens=SPECIAL_TOKENS[4:])
    fast.chat_template = chat_template or CHAT_TEMPLATE
    return fast


# --------------------------------------------------------------------------- a real-looking corpus, at any size
# The tiny world above is for models that must learn in a minute. Benchmarks of the data path need text shaped like
# a web or book corpus instead: a Zipf-distributed vocabulary of invented words over English function words, topics
# per document, sentences and paragraphs of varied length, numbers, names, lists, a title now and then, and document
# lengths with a long tail. Invented, not copied; the same seed gives the same bytes.

FUNCTION_WORDS = (
    "the of and a to in is that for it as with was on be by at this are from or an which not but had have has they "
    "their its were been one all can more than also into when there after about other most some these would over "
    "only first new such two time may between many three where while during under both each through before because "
    "however then those since until against within without among we our you he she his her them what who how"
).split()
_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "ch",
           "cl", "dr", "fl", "gr", "kr", "pl", "pr", "sh", "sk", "sl", "sp", "st", "str", "th", "tr", "qu"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "ee", "oa", "y", "ä", "é"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "rk", "ng", "x", "th", "ck", "ss"]
_SUFFIXES = ["", "", "", "s", "ed", "ing", "ly", "er", "tion", "ment", "ness", "al", "ic", "ous"]


def _invented_words(n: int, rng) -> list[str]:
    """`n` distinct pronounceable words of 1-4 syllables."""
    words: list[str] = []
    seen = set(FUNCTION_WORDS)
    while len(words) < n:
        syllables = 1 + int(rng.choice(4, p=[0.35, 0.4, 0.2, 0.05]))
        w = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _NUCLEI[rng.integers(len(_NUCLEI))] +
                    _CODAS[rng.integers(len(_CODAS))] for _ in range(syllables)) + _SUFFIXES[rng.integers(len(_SUFFIXES))]
        if len(w) > 1 and w not in seen:
            seen.add(w)
            words.append(w)
    return sorted(words, key=len)  # frequent words are short, as in any language


class CorpusGenerator:
    """Documents {"text": ...} of real-looking text, generated with numpy so 250M tokens take minutes, not hours."""

    def __init__(self, seed: int = 0, vocab: int = 40_000, median_words: int = 220) -> None:
        import numpy as np

        self.np = np
        self.rng = np.random.default_rng(seed)
        self.median_words = median_words
        content = _invented_words(vocab, self.rng)
        self.content = np.array(content, dtype=object)
        self.content_cap = np.array([w.capitalize() for w in content], dtype=object)
        self.function = np.array(FUNCTION_WORDS, dtype=object)
        self.function_cap = np.array([w.capitalize() for w in FUNCTION_WORDS], dtype=object)
        self.content_cdf = self._zipf_cdf(vocab, 1.07)
        self.function_cdf = self._zipf_cdf(len(FUNCTION_WORDS), 1.0)

    def _zipf_cdf(self, n: int, s: float):
        w = 1.0 / (self.np.arange(n) + 2.7) ** s
        return self.np.cumsum(w) / w.sum()

    def document(self) -> str:
        np, rng = self.np, self.rng
        n = int(np.clip(rng.lognormal(np.log(self.median_words), 1.1), 8, 30_000))
        topic = rng.choice(len(self.content), size=300, replace=False)  # this document's own vocabulary
        is_function = rng.random(n) < 0.42
        from_topic = rng.random(n) < 0.35
        content_idx = np.searchsorted(self.content_cdf, rng.random(n))
        content_idx = np.where(from_topic, topic[np.minimum(np.searchsorted(self._topic_cdf, rng.random(n)), 299)], content_idx)
        function_idx = np.searchsorted(self.function_cdf, rng.random(n))
        words = np.where(is_function, self.function[function_idx], self.content[content_idx])
        names = rng.random(n) < 0.035  # proper names and acronyms
        words[names] = self.content_cap[content_idx[names]]
        numbers = np.flatnonzero(rng.random(n) < 0.02)
        for i in numbers:
            words[i] = self._number()
        ends = self._sentence_ends(n)
        starts = np.concatenate(([0], ends[:-1] + 1))
        words[starts] = np.where(is_function[starts], self.function_cap[function_idx[starts]],
                                 self.content_cap[content_idx[starts]])
        commas = np.flatnonzero(rng.random(n) < 0.07)
        commas = commas[~np.isin(commas, ends)]
        words[commas] = words[commas] + ","
        marks = rng.choice([".", ".", ".", ".", ".", ".", "?", "!", ":", ";"], size=len(ends))
        words[ends] = words[ends] + marks
        return self._layout(words.tolist(), ends.tolist())

    @property
    def _topic_cdf(self):
        if not hasattr(self, "_tcdf"):
            self._tcdf = self._zipf_cdf(300, 0.9)
        return self._tcdf

    def _number(self) -> str:
        r, k = self.rng, int(self.rng.integers(6))
        if k == 0:
            return str(int(r.integers(1700, 2031)))
        if k == 1:
            return f"{r.random() * 100:.1f}%"
        if k == 2:
            return f"{int(r.integers(1, 10**int(r.integers(1, 8)))):,}"
        if k == 3:
            return f"({int(r.integers(1, 500))})"
        if k == 4:
            return f"{r.random() * 10:.2f}"
        return str(int(r.integers(0, 100)))

    def _sentence_ends(self, n: int):
        np = self.np
        lengths = np.clip(self.rng.lognormal(np.log(15), 0.5, size=n // 4 + 2), 3, 80).astype(int)
        ends = np.cumsum(lengths) - 1
        ends = ends[ends < n - 1]
        return np.append(ends, n - 1)

    def _layout(self, words: list[str], ends: list[int]) -> str:
        """Sentences into paragraphs (3-8 sentences), with a title or a bullet list now and then."""
        r = self.rng
        parts: list[str] = []
        if r.random() < 0.3:
            parts.append(" ".join(w.capitalize().rstrip(",.;:?!") for w in words[: int(r.integers(2, 8))]))
        sentences, cut, para_start = 0, int(r.integers(3, 9)), 0
        for end in ends:
            sentences += 1
            if sentences == cut or end == ends[-1]:
                text = " ".join(words[para_start:end + 1])
                if r.random() < 0.08:  # a list: one item per line
                    items = text.split(", ")
                    text = "\n".join("- " + item.strip() for item in items if item.strip())
                parts.append(text)
                para_start, sentences, cut = end + 1, 0, int(r.integers(3, 9))
        return "\n\n".join(parts)


def write_corpus(path, words: int, seed: int = 0) -> dict[str, int]:
    """A jsonl corpus of about `words` words at `path`, written as it is generated (memory stays flat)."""
    import json
    from pathlib import Path

    gen = CorpusGenerator(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    done = docs = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while done < words:
            text = gen.document()
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            done += text.count(" ") + text.count("\n") + 1
            docs += 1
    tmp.replace(path)
    return {"documents": docs, "words": done, "bytes": path.stat().st_size}
