#!/usr/bin/env python3
"""Writes the reference token ids that Bessie's byte-level BPE tokenizer is checked against.

Two independent encoders must agree on every text, else the script stops:
  - transformers: `PreTrainedTokenizerFast(tokenizer_file=...).encode(text, add_special_tokens=False)`; special tokens
    written in the text (`<|eot_id|>`, ...) are parsed as special tokens, transformers' default.
  - tiktoken: an `Encoding` built from the same file's 128,000 ranks (each vocab entry mapped back from GPT-2's
    byte-to-unicode alphabet to its bytes), the LLaMA 3 split pattern, and the 256 added tokens as special tokens,
    encoded with `allowed_special="all"`.

  tests/fixtures/llama3_bpe_ids.json    ../shared/tokenizers/llama3/tokenizer.json (nothing is written if absent)

The fixture holds, per text, the ids (`"agreed": "transformers+tiktoken"` says both produced them), and for some texts
`decoded`: transformers' `decode(ids)` (special tokens kept), which equals the text. Running the script again writes
the same file.

    pip install transformers tiktoken   # no torch needed
    python3 tests/reference/bpe_ids.py
"""
import json
import random
import sys
from pathlib import Path

import tiktoken
import transformers
from transformers import PreTrainedTokenizerFast

import fixture_json

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "llama3_bpe_ids.json"
TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "llama3" / "tokenizer.json"

# The pre-tokenizer regex of LLaMA 3 (llama_models.llama3.tokenizer.Tokenizer.pat_str); checked below against the one
# in tokenizer.json so that the two encoders cannot split text differently by construction.
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)

PARAGRAPH = (
    "Cows are ruminants: their stomach has four compartments, the rumen, the reticulum, the omasum and the abomasum. "
    "A dairy cow drinks 80 to 150 litres of water a day and eats around 45 kg of feed; she spends 8 hours chewing "
    "cud.\n\nIn 2023 the world had about 1.5 billion cattle. Breeds differ: Holstein-Friesians give the most milk, "
    "Jerseys the richest (5.0% fat vs. 3.7%), and Highland cattle don't mind the cold. Farmers say \"happy cows make "
    "better milk\" - whether that's true is hard to measure, but it's a nice thought.\n"
)

TEXTS = [
    "",
    "Hello world",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "  two leading spaces and two trailing  ",
    " ",
    "   ",
    "multiple   spaces   inside  words",
    "\t tab\tseparated\t\t",
    "line one\nline two",
    "\n",
    "\n\n\n",
    "paragraph one\n\nparagraph two\n",
    " \n \t mixed whitespace \r\n",
    "\r\nwindows line endings\r\nsecond line\r\n\r\n",
    "a\r\rb\r",
    "spaces before newline   \n   and after",
    "    four-space indent\n        eight\n",
    "I'm sure you'll see it's what they've done, we'd say; YOU'RE, I'LL, HE'S",
    "café naïve Ångström crème brûlée façade jalapeño",
    "e\u0301 (combining acute) vs \u00e9 (precomposed)",
    "Straße, Œuvre, Ærø, İstanbul, ǅ",
    "中文分词测试：我们今天去看牛。",
    "日本語のテキストです。カタカナとひらがな。",
    "한국어 문장입니다",
    "Привет, мир! Как дела?",
    "Γειά σου Κόσμε",
    "مرحبا بالعالم، كيف حالك؟",
    "שלום עולם",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "தமிழ் மொழி",
    "สวัสดีครับ",
    "🐂",
    "Bessie 🐂 says moo 🐄🐮",
    "🐂🐂🐂",
    "emoji at the end 🐂\n",
    "👍🏽 thumbs with skin tone",
    "family: 👨‍👩‍👧‍👦 and 👩🏽‍💻 (ZWJ sequences)",
    "flags 🇫🇷🇯🇵 and keycap 1️⃣",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters",
    "Ω≈ç√∫˜µ≤≥÷ ∀x∈ℝ",
    "\u2581 lower one eighth block \u2581\u2581",
    "zero\u200bwidth, nbsp\u00a0here, bom\ufeff, nul \x00 and bell \x07",
    "\ufffd replacement character",
    "0",
    "12",
    "123",
    "1234",
    "12345",
    "123456",
    "1234567",
    "1234567890123456789",
    "3.14159 and 2,718 and 1e-5 and -42",
    "Year 2024-01-15, time 10:30:59, ٣٤٥ Arabic-Indic and १२३ Devanagari digits",
    "fn main() {\n    println!(\"Hello, {}!\", name);\n}\n",
    "def f(x):\n\treturn x ** 2  # square\n",
    "if (a < b && c > d) { x += 1; } // done",
    "<div class=\"a\">&amp;</div>",
    "SELECT * FROM cows WHERE name = 'Bessie';",
    "URL: https://example.com/path?query=1&b=2#frag",
    "{{ jinja }} {% if x %}y{% endif %}",
    "ALL CAPS SENTENCE and MiXeD CaSe",
    "!!!???...,,,;;;",
    "ha" * 40,
    "a" * 64,
    " " * 20 + "x",
    "<|begin_of_text|>",
    "<|begin_of_text|>Hello",
    "<|eot_id|>",
    "Hi there<|eot_id|>",
    "<|start_header_id|>user<|end_header_id|>\n\nHow many stomachs does a cow have?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>",
    "User: Hello<|eot_id|>Assistant: ",
    "<|end_of_text|> <|finetune_right_pad_id|> <|reserved_special_token_5|> <|eom_id|> <|python_tag|>",
    " <|eot_id|> spaces around a special token ",
    "<|eot_id|><|eot_id|>",
    "<|not_a_special_token|> and <|eot_id without a close",
    "<s> and </s> as plain text",
    PARAGRAPH,
]

# Which texts also get their decoded text recorded (decode must give the text back).
DECODED = {
    "",
    " leading space",
    "\r\nwindows line endings\r\nsecond line\r\n\r\n",
    "中文分词测试：我们今天去看牛。",
    "family: 👨‍👩‍👧‍👦 and 👩🏽‍💻 (ZWJ sequences)",
    "Bessie 🐂 says moo 🐄🐮",
    "e\u0301 (combining acute) vs \u00e9 (precomposed)",
    "<|start_header_id|>user<|end_header_id|>\n\nHow many stomachs does a cow have?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    " <|eot_id|> spaces around a special token ",
    PARAGRAPH,
}

# Random strings over an alphabet that stresses merges, whitespace runs, digits, multi-byte characters and specials.
ALPHABET = list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ0123456789.,;:!?'\"()-_\n\t\r") + [
    "  ", "the", "ing", " and", "'s", "é", "ü", "中", "語", "ب", "न", "🐂", "😀", "\u200d", "\u00a0",
    "<|eot_id|>", "<|begin_of_text|>",
]
rng = random.Random(1234)
RANDOM = ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 40))) for _ in range(40)]


def byte_decoder():
    """GPT-2's byte-level alphabet, unicode character -> byte (the inverse of bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def mergeable_ranks(spec: dict) -> dict:
    """tokenizer.json's BPE vocabulary as tiktoken ranks: token bytes -> id."""
    dec = byte_decoder()
    ranks = {bytes(dec[ch] for ch in token): rank for token, rank in spec["model"]["vocab"].items()}
    assert sorted(ranks.values()) == list(range(len(ranks))), "vocab ids are not 0..n-1"
    return ranks


def tiktoken_encoding(spec: dict) -> tiktoken.Encoding:
    specials = {t["content"]: t["id"] for t in spec["added_tokens"]}
    return tiktoken.Encoding(name="llama3", pat_str=PATTERN, mergeable_ranks=mergeable_ranks(spec),
                             special_tokens=specials)


def main():
    if not TOKENIZER.exists():
        print(f"{TOKENIZER} not found: fixture not written")
        return 1
    spec = json.loads(TOKENIZER.read_text())
    assert spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == PATTERN, "tokenizer.json has another pattern"
    hf = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER))
    tk = tiktoken_encoding(spec)
    assert len(hf) == tk.n_vocab == 128256, (len(hf), tk.n_vocab)

    cases = []
    for text in TEXTS + RANDOM:
        ids = hf.encode(text, add_special_tokens=False)
        theirs = tk.encode(text, allowed_special="all")
        assert ids == theirs, f"transformers and tiktoken disagree on {text!r}:\n{ids}\n{theirs}"
        case = {"text": text, "ids": ids}
        if text in DECODED:
            case["decoded"] = hf.decode(ids)
            assert case["decoded"] == text == tk.decode(ids), (text, case["decoded"])
        cases.append(case)

    specials = {t["content"]: t["id"] for t in spec["added_tokens"] if not t["content"].startswith("<|reserved")}
    header = {
        "source": "tests/reference/bpe_ids.py",
        "tokenizer": "../shared/tokenizers/llama3/tokenizer.json (LLaMA 3, as microsoft/bitnet-b1.58-2B-4T ships it)",
        "encoders": f"transformers {transformers.__version__} PreTrainedTokenizerFast.encode(add_special_tokens=False); "
                    f"tiktoken {tiktoken.__version__} Encoding.encode(allowed_special=\"all\")",
        "agreed": "transformers+tiktoken",
        "vocab_size": len(hf),
        "special_tokens": specials,
    }
    fixture_json.write(FIXTURE, header, {"cases": cases})
    print(f"{FIXTURE}: {len(cases)} texts, transformers and tiktoken agree on all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
