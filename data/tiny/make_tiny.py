#!/usr/bin/env python3
"""Writes the tiny demo data set: data/tiny/train.jsonl, data/tiny/dev.jsonl and data/tiny/chat.jsonl.

The demo trains a random BitNet of a few hundred thousand parameters for a few minutes on CPU, so the
responses are short and follow a handful of fixed patterns that it learns to answer exactly: counting animals from a
one- or two-sentence context, adding two digits, naming a color from the context, and answering
"Not in context." when the context does not say. Lines have the project's JSONL format (`prompt`,
`response`, `source`); dev lines also carry `answers` (an empty list means unanswerable). The output is
deterministic (fixed seed); dev prompts never occur in train. 2,000 training lines hold every sum of two
digits (the model learns them by heart; the dev questions ask them in other words) and enough counting
questions for the model to learn to pick the right number out of the context. chat.jsonl holds the same kinds of exchange as
multi-turn conversations in TRL's `messages` format, with a system prompt (configs/tiny-chat.toml).

    python3 data/tiny/make_tiny.py
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234
TRAIN, DEV, CHAT = 2000, 40, 200
SYSTEM = "You are Bessie, a farm assistant. Answer in one sentence."

ANIMALS = ["cows", "calves", "goats", "hens", "sheep", "pigs", "horses", "ducks"]
PLACES = ["barn", "field", "pasture", "shed", "yard", "stable"]
THINGS = ["tractor", "gate", "barn door", "feed wagon", "milk truck", "fence"]
COLORS = ["red", "brown", "white", "black", "green", "blue"]
FARMERS = ["The farmer", "Anna", "Tom", "The old farmer", "Bessie's farmer"]


def count(rng):
    a, b = rng.sample(ANIMALS, 2)
    p, q = rng.sample(PLACES, 2)
    n, m = rng.randint(2, 19), rng.randint(2, 19)
    context = f"{rng.choice(FARMERS)} keeps {n} {a} in the {p}. There are also {m} {b} in the {q}."
    response = f"There are {n} {a} in the {p}."
    return "count", f"{context} How many {a} are in the {p}?", response, [response, str(n)]


def arithmetic(rng):
    x, y = rng.randint(1, 9), rng.randint(1, 9)
    response = f"{x} plus {y} is {x + y}."
    return "arithmetic", f"{rng.choice(FARMERS)} asks: what is {x} plus {y}?", response, [response, str(x + y)]


def color(rng):
    t = rng.choice(THINGS)
    c = rng.choice(COLORS)
    response = f"The {t} is {c}."
    return "color", f"The {t} on the farm is {c}. What color is the {t}?", response, [response, c]


def unanswerable(rng):
    a, b = rng.sample(ANIMALS, 2)
    p = rng.choice(PLACES)
    n = rng.randint(2, 19)
    if rng.random() < 0.5:
        prompt = f"{rng.choice(FARMERS)} keeps {n} {a} in the {p}. How many {b} are in the {p}?"
    else:
        prompt = f"There are {n} {a} in the {p}. What color is the {rng.choice(THINGS)}?"
    return "unanswerable", prompt, "Not in context.", []


KINDS = [(count, 35), (arithmetic, 25), (color, 15), (unanswerable, 25)]


def example(rng):
    make = rng.choices([k for k, _ in KINDS], weights=[w for _, w in KINDS])[0]
    kind, prompt, response, answers = make(rng)
    assert 5 <= len(prompt.split()) <= 40, prompt
    return {"prompt": prompt, "response": response, "source": f"tiny-farm/{kind}"}, answers


def main():
    rng = random.Random(SEED)
    train = [example(rng)[0] for _ in range(TRAIN)]
    seen = {line["prompt"] for line in train}
    dev = []
    while len(dev) < DEV:
        line, answers = example(rng)
        if line["prompt"] not in seen:
            seen.add(line["prompt"])
            dev.append({**line, "answers": answers})
    # Its own generator, so train.jsonl and dev.jsonl stay as they were.
    chat_rng = random.Random(SEED + 1)
    chat = []
    for _ in range(CHAT):
        messages = [{"role": "system", "content": SYSTEM}]
        for _ in range(chat_rng.randint(2, 3)):
            line, _ = example(chat_rng)
            messages += [{"role": "user", "content": line["prompt"]}, {"role": "assistant", "content": line["response"]}]
        chat.append({"messages": messages, "source": "tiny-farm/chat"})
    for name, lines in [("train.jsonl", train), ("dev.jsonl", dev), ("chat.jsonl", chat)]:
        with open(HERE / name, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
