#!/usr/bin/env python3
"""Answers the questions of a `bessie-eval` output file with llama.cpp or bitnet.cpp from a GGUF written by
`bessie-export -f gguf`, and counts how many answers equal Bessie's `guess`:

    bessie-eval -m CHECKPOINT -d dev.jsonl -o eval.jsonl -n 40
    bessie-export -m CHECKPOINT -f gguf -o model.gguf                 # TQ2_0
    python3 llama_cpp_eval.py model.gguf eval.jsonl                   # llama.cpp, through llama-cpp-python
    bessie-export -m CHECKPOINT -f gguf --type i2_s -o model-i2s.gguf
    python3 llama_cpp_eval.py model-i2s.gguf eval.jsonl --llama-cli BITNET_CPP/build/bin/llama-cli

Each question is rendered with the chat template the GGUF carries (`tokenizer.chat_template`, read with
gguf-py; rendered with jinja2 as transformers renders it), tokenized by the engine with BOS and without
parsing special tokens, answered greedily for at most --max-new-tokens (bessie-eval's 50), and cut at the 🐂
end marker and trailing whitespace as Bessie cuts it. llama.cpp's TQ2_0 path quantizes activations per
block of 256 (Q8_K) where Bessie quantizes per token (bitnet.cpp's I2_S path per token, as Bessie), so
answers may differ where two tokens are nearly tied. Prints the differing answers and a JSON summary with
the engine's own prompt and decode speeds (tokens/s, from its timing report; llama-cli only).

Needs numpy, gguf and jinja2; llama-cpp-python for the default engine.
"""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import jinja2

sys.path.insert(0, str(Path(__file__).parent))
import read_gguf  # noqa: E402  (registers bitnet.cpp's I2_S with gguf-py)

END_MARKER = "🐂"


def chat_template(model):
    reader = gguf.GGUFReader(model)
    field = reader.fields.get("tokenizer.chat_template")
    if field is None:
        sys.exit(f"{model} has no tokenizer.chat_template")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(field.contents())


def cut(text):
    return text.split(END_MARKER)[0].rstrip()


class LlamaCppPython:
    def __init__(self, model, threads):
        from llama_cpp import Llama

        self.llm = Llama(model_path=model, n_ctx=1024, n_threads=threads, verbose=False)

    def answer(self, text, max_new_tokens):
        llm = self.llm
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        out = []
        for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            if t == llm.token_eos() or len(out) == max_new_tokens:
                break
            out.append(t)
            if END_MARKER in llm.detokenize(out).decode("utf-8", errors="ignore"):
                break
        return cut(llm.detokenize(out).decode("utf-8", errors="replace")), None


class LlamaCli:
    """bitnet.cpp's (or llama.cpp's) llama-cli, one process per question."""

    SPEED = re.compile(r"llama_perf_context_print:\s+(prompt eval|eval) time =.*?([\d.]+) tokens per second")

    def __init__(self, model, threads, cli):
        self.model, self.threads, self.cli = model, threads, cli

    def answer(self, text, max_new_tokens):
        cmd = [self.cli, "-m", self.model, "-p", text, "-n", str(max_new_tokens), "-t", str(self.threads),
               "--temp", "0", "-c", "1024", "--no-escape", "--no-display-prompt", "--no-warmup", "--simple-io"]
        run = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=300)
        if run.returncode != 0:
            sys.exit(f"llama-cli failed:\n{run.stderr.decode(errors='replace')[-3000:]}")
        out = run.stdout.decode("utf-8", errors="replace")
        out = out.removesuffix("\n").removesuffix(" [end of text]")
        speeds = dict((kind, float(v)) for kind, v in self.SPEED.findall(run.stderr.decode(errors="replace")))
        return cut(out), speeds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("eval_jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-cli", help="run this llama-cli (bitnet.cpp's) instead of llama-cpp-python")
    args = ap.parse_args()
    template = chat_template(args.model)
    engine = (LlamaCli(args.model, args.threads, args.llama_cli) if args.llama_cli
              else LlamaCppPython(args.model, args.threads))
    same, total, speeds = 0, 0, []
    with open(args.eval_jsonl, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            text = template.render(messages=[{"role": "user", "content": row["prompt"]}],
                                   add_generation_prompt=True)
            got, speed = engine.answer(text, args.max_new_tokens)
            if speed:
                speeds.append(speed)
            total += 1
            if got == row["guess"]:
                same += 1
            else:
                print(f"differs: {row['prompt']!r}\n  bessie: {row['guess']!r}\n  engine: {got!r}")
    summary = {"answers": total, "identical": same}
    for kind in ("prompt eval", "eval"):
        values = [s[kind] for s in speeds if kind in s]
        if values:
            summary[f"{kind} tok/s (median)"] = sorted(values)[len(values) // 2]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
