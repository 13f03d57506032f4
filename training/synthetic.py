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


def train_tokenizer(texts: list[str], vocab_size: int, chat_template: str | None = None):
    """A byte-level BPE tokenizer trained here (no download) with pad/bos/eos and chat role tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts + corpus_for_tokenizer(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens=SPECIAL_TOKENS[4:])
    fast.chat_template = chat_template or CHAT_TEMPLATE
    return fast
