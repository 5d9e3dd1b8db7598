#!/usr/bin/env python3
"""Answers the questions of a `bessie-eval` output file with llama.cpp itself (through llama-cpp-python,
`pip install llama-cpp-python`, which builds llama.cpp) from a GGUF written by `bessie-export -f gguf`, and
counts how many answers equal Bessie's `guess`:

    bessie-eval -m CHECKPOINT -d dev.jsonl -o eval.jsonl -n 40
    bessie-export -m CHECKPOINT -f gguf -o model.gguf
    python3 llama_cpp_eval.py model.gguf eval.jsonl

Each prompt is rendered with Bessie's chat template and default system prompt (as bessie-eval renders it;
llama.cpp adds BOS), answered greedily for at most --max-new-tokens (bessie-eval's 50), stopping at EOS or
at the 🐂 end marker, and cut at the marker and trailing whitespace as Bessie cuts it. llama.cpp quantizes
activations per block of 256 (Q8_K) where Bessie quantizes per token, so answers may differ where two
tokens are nearly tied. Prints the differing answers and a JSON summary.
"""
import argparse
import json

from llama_cpp import Llama

SYSTEM = (
    "You are Bessie, created by Oxen.ai. You are happy to help with writing, analysis, question answering, "
    "math, coding, and all sorts of other tasks. You give concise responses to simple questions or statements, "
    "but provide thorough responses to more complex and open-ended questions. Answer the user's query as best "
    'as you can, and say "I don\'t know" if you don\'t know the answer.'
)
END_MARKER = "🐂"


def answer(llm, prompt, max_new_tokens):
    ids = llm.tokenize(f"\n{SYSTEM}\n\nUser:\n{prompt}\n\nBessie:\n".encode("utf-8"), add_bos=True, special=False)
    out = []
    for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        if t == llm.token_eos() or len(out) == max_new_tokens:
            break
        out.append(t)
        if END_MARKER in llm.detokenize(out).decode("utf-8", errors="ignore"):
            break
    text = llm.detokenize(out).decode("utf-8", errors="replace")
    return text.split(END_MARKER)[0].rstrip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("eval_jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=50)
    args = ap.parse_args()
    llm = Llama(model_path=args.model, n_ctx=1024, n_threads=2, verbose=False)
    same, total = 0, 0
    with open(args.eval_jsonl, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            got = answer(llm, row["prompt"], args.max_new_tokens)
            total += 1
            if got == row["guess"]:
                same += 1
            else:
                print(f"differs: {row['prompt']!r}\n  bessie:    {row['guess']!r}\n  llama.cpp: {got!r}")
    print(json.dumps({"answers": total, "identical": same}))


if __name__ == "__main__":
    main()
