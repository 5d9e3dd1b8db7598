#!/usr/bin/env python3
"""A dev file whose answers differ in length, for timing bessie-eval's batching on the tiny demo's model.

Most lines are the demo's own dev questions (data/tiny/dev.jsonl), which the trained demo answers in a few
tokens; about one in eight is a prompt of digits or of a repeated word, which it answers with a loop until
--max-new-tokens. A batch that waits for its longest answer idles on such lines; continuous batching does
not. Deterministic (seed 11).

    python3 tests/reference/mixed_dev.py --out /tmp/mixed400.jsonl [--lines 400]
"""
import argparse, json, random
from pathlib import Path

DEV = Path(__file__).resolve().parents[2] / "data" / "tiny" / "dev.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--lines", type=int, default=400)
    a = ap.parse_args()
    rng = random.Random(11)
    dev = [json.loads(line) for line in DEV.open() if line.strip()]
    with open(a.out, "w") as f:
        for _ in range(a.lines):
            if rng.random() < 0.88:
                line = dict(rng.choice(dev))
            else:
                n = rng.randint(4, 30)
                digits = rng.random() < 0.5
                words = [str(rng.randint(1, 9)) for _ in range(n)] if digits else ["The"] + ["the"] * n
                line = {"prompt": " ".join(words), "answers": []}
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
