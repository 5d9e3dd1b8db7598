#!/usr/bin/env python3
"""Writes the reference token ids that tests/tokenizer.rs checks Bessie's tokenizer against.

Ids come from Python `sentencepiece` (`SentencePieceProcessor.encode(text)` with BOS = 1 prepended):
  tests/fixtures/llama_sentencepiece_ids.json    ../shared/tokenizers/llama/tokenizer.model (skipped if absent)
  tests/fixtures/shipped_sentencepiece_ids.json  assets/tokenizer/tokenizer.model
and, with `transformers` installed, the shipped tokenizer converted to Hugging Face's tokenizer.json form:
  tests/fixtures/shipped_tokenizer_json/tokenizer.json
and the ids transformers' LlamaTokenizer gives texts that hold special and added tokens (`<s>`, `</s>`,
`<pad>`, ...), which it splits out as their ids, among them configs/chat_template.jinja's renderings:
  tests/fixtures/shipped_special_token_ids.json

    pip install sentencepiece transformers protobuf
    python3 tests/reference/sentencepiece_ids.py
"""
import json
import random
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
SHIPPED = ROOT / "assets" / "tokenizer"
LLAMA = ROOT.parent / "shared" / "tokenizers" / "llama" / "tokenizer.model"

SYSTEM = (
    "You are Bessie, created by Oxen.ai. You are happy to help with writing, analysis, question answering, "
    "math, coding, and all sorts of other tasks. You give concise responses to simple questions or statements, "
    "but provide thorough responses to more complex and open-ended questions. Answer the user's query as best "
    "as you can, and say \"I don't know\" if you don't know the answer."
)
PROMPT = "How many stomachs does a cow have?"
RESPONSE = "A cow has one stomach with four compartments: the rumen, reticulum, omasum and abomasum."

TEXTS = [
    "",
    "Hello world",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "multiple   spaces   inside  words",
    " ",
    "   ",
    "\t tab\tseparated\t",
    "line one\nline two",
    "\n",
    "\n\n",
    "paragraph one\n\nparagraph two\n",
    " \n \t mixed whitespace \r\n",
    "\r\nwindows line endings\r\n",
    "café",
    "naïve",
    "Ångström",
    "crème brûlée, façade, jalapeño",
    "e\u0301 (combining accent)",
    "中文",
    "日本語のテキストです。",
    "한국어 문장",
    "Привет, мир",
    "Γειά σου Κόσμε",
    "مرحبا بالعالم",
    "नमस्ते",
    "🐂",
    "Bessie 🐂 says moo 🐄🐮",
    "emoji at the end 🐂\n",
    "👍🏽 family: 👨‍👩‍👧",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters",
    "Ω≈ç√∫˜µ≤≥÷",
    "12345",
    "3.14159 and 2,718 and 1e-5",
    "Year 2024-01-15, time 10:30:59",
    "fn main() { println!(\"Hello\"); }",
    "def f(x):\n    return x * 2\n",
    "if (a < b && c > d) { x += 1; } // done",
    "<s> and </s> and <unk> as plain text",
    "<pad> and </line> as plain text",
    "\u2581 literal lower one eighth block \u2581\u2581",
    "zero\u200bwidth space and nul \x00 and bell \x07",
    "\ufffd replacement character",
    "URL: https://example.com/path?query=1&b=2#frag",
    "ALL CAPS SENTENCE and MiXeD CaSe",
    "ha" * 40,
    "a" * 64,
    "¿Qué tal? ¡Muy bien!",
    f"\n{SYSTEM}\n\nUser:\n{PROMPT}\n\nBessie:\n{RESPONSE}\n🐂\n",
    f"\n{SYSTEM}\n\nUser:\n{PROMPT}\n\nBessie:\n",
]

# Random strings over an alphabet that stresses merges, spaces, digits and byte fallback.
ALPHABET = list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ0123456789.,;:!?'\"()-_\n\t") + [
    "  ", "the", "ing", " and", "é", "ü", "中", "語", "🐂", "😀", "\u2581", "\u200b",
]
rng = random.Random(1234)
RANDOM = ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 40))) for _ in range(40)]


def write_ids(model_file: Path, out: Path):
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    table = {}
    for text in TEXTS + RANDOM:
        ids = [sp.bos_id()] + sp.encode(text)
        # Decoding gives the text back, except that a literal U+2581 comes back as a space.
        assert sp.decode(ids) == text.replace("\u2581", " "), (text, sp.decode(ids))
        table[text] = ids
    lines = (f"{json.dumps(t, ensure_ascii=False)}: {json.dumps(ids)}" for t, ids in table.items())
    out.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"{out}: {len(table)} strings from {model_file}")


def write_tokenizer_json(out_dir: Path):
    try:
        from transformers import LlamaTokenizerFast
    except ImportError:
        print("transformers not installed: tokenizer.json not written")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]:
            shutil.copy(SHIPPED / name, tmp)
        tok = LlamaTokenizerFast.from_pretrained(tmp, from_slow=True)
        tok.save_pretrained(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "tokenizer.json", out_dir)
    print(f"{out_dir / 'tokenizer.json'} written")


# Texts with the special and added tokens' texts in every position. None starts with a space: there
# transformers' Metaspace pre-tokenizer adds no dummy prefix where sentencepiece does (tests/tokenizer.rs).
SPECIAL_TEXTS = [
    "<s> and </s> and <unk> as plain text",
    "<pad> and </line> as plain text",
    "</s>",
    "<s>",
    "<unk>",
    "</s></s><s>",
    "a </s> b",
    "a</s>b",
    "hi</s>\n<|user|>\n",
    "x</s>  y  ",
    "cow<pad> cow</line>cow",
    "text\n</s>\n\nmore</s>",
    "</s >< /s></s",
    "<</s>>",
    "é</s>🐂</s>中",
]


def write_special_ids(out: Path):
    try:
        from transformers import LlamaTokenizer
    except ImportError:
        print("transformers not installed: special-token ids not written")
        return
    tok = LlamaTokenizer.from_pretrained(SHIPPED)
    template = (ROOT / "configs" / "chat_template.jinja").read_text()
    texts = list(SPECIAL_TEXTS)
    with open(ROOT / "data" / "tiny" / "chat.jsonl") as f:
        for line in list(f)[:3]:
            messages = json.loads(line)["messages"]
            for end in range(1, len(messages) + 1):
                gen = messages[end - 1]["role"] != "assistant"
                texts.append(tok.apply_chat_template(messages[:end], chat_template=template, tokenize=False,
                                                     add_generation_prompt=gen))
    # The template writes the BOS text itself, so its renderings are tokenized without adding one.
    table = {t: tok.encode(t, add_special_tokens=False) for t in texts}
    lines = (f"{json.dumps(t, ensure_ascii=False)}: {json.dumps(ids)}" for t, ids in table.items())
    out.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"{out}: {len(table)} strings from transformers {type(tok).__name__}")


if __name__ == "__main__":
    FIXTURES.mkdir(parents=True, exist_ok=True)
    if LLAMA.exists():
        write_ids(LLAMA, FIXTURES / "llama_sentencepiece_ids.json")
    else:
        print(f"{LLAMA} not found: LLaMA fixture not written")
    write_ids(SHIPPED / "tokenizer.model", FIXTURES / "shipped_sentencepiece_ids.json")
    write_tokenizer_json(FIXTURES / "shipped_tokenizer_json")
    write_special_ids(FIXTURES / "shipped_special_token_ids.json")
