#!/usr/bin/env python3
"""Writes the reference renderings that Bessie's chat-template renderer is checked against, byte for byte.

Every template under tests/fixtures/chat_templates/ (SOURCES.json says where each came from and which bos_token /
eos_token to pass) is rendered by transformers' own renderer,
`transformers.utils.chat_template_utils.render_jinja_template` (what `apply_chat_template(..., tokenize=False)` calls),
for the conversations below, with add_generation_prompt false and true:

  tests/fixtures/chat_template_renderings.json

  - "renderings": per (template, conversation, add_generation_prompt) the rendered text.
  - "turns": per template, conversation and assistant turn k, `prompt` = render(messages[:k], add_generation_prompt=True)
    and `full` = render(messages[:k+1], add_generation_prompt=False); `prefix` says whether prompt is a prefix of full
    (then `assistant` = full minus prompt is the assistant's span, the tokens a trainer puts loss on) and `history`
    whether full is a prefix of the whole conversation's rendering.
  - "templates": per template bos_token/eos_token and `prefix_consistent` (every turn's prefix and history hold).
    For the templates of LLaMA 3 checkpoints, also `token_prefix_consistent`: whether the ids of every `prompt` are a
    prefix of the ids of its `full` under ../shared/tokenizers/llama3/tokenizer.json (null when that file is absent or
    the template belongs to another tokenizer). Where they are not, masking by string span and masking by token
    prefix give different loss masks.

The script also checks that `PreTrainedTokenizerFast.apply_chat_template(tokenize=False)` gives the same text as the
direct renderer for the LLaMA 3 templates, and the one rendering TRL's documentation shows.

    pip install transformers jinja2   # no torch needed
    python3 tests/reference/chat_templates.py
"""
import json
import re
import sys
from pathlib import Path

import transformers
from transformers.utils.chat_template_utils import render_jinja_template

import fixture_json

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
TEMPLATES = FIXTURES / "chat_templates"
OUT = FIXTURES / "chat_template_renderings.json"
LLAMA3 = ROOT.parent / "shared" / "tokenizers" / "llama3" / "tokenizer.json"
LLAMA3_TEMPLATES = {"bitnet-b1.58-2B-4T", "llama3-instruct"}

SYSTEM = "You are Bessie, a helpful cow. Answer briefly."
CONVERSATIONS = {
    "single_user": [
        {"role": "user", "content": "How many stomachs does a cow have?"},
    ],
    "system_user": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "How many stomachs does a cow have?"},
    ],
    "multi_turn_system": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "How many stomachs does a cow have?"},
        {"role": "assistant", "content": "One stomach with four compartments."},
        {"role": "user", "content": "Name them."},
        {"role": "assistant", "content": "Rumen, reticulum, omasum and abomasum."},
    ],
    "multi_turn_no_system": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    "whitespace_unicode": [
        {"role": "system", "content": "Be kind.\n"},
        {"role": "user", "content": "  leading and trailing spaces  "},
        {"role": "assistant", "content": "\nLine one\n\nLine two\n"},
        {"role": "user", "content": "Ünïcödé, 中文, مرحبا, 👨‍👩‍👧 and a CRLF\r\nhere\t"},
        {"role": "assistant", "content": " 🐂 moo "},
    ],
    "jinja_specials": [
        {"role": "user", "content": "What does {{ messages }} print? And {% if true %}x{% endif %} or {# note #}?"},
        {"role": "assistant", "content": "It prints them as written: '{{', '}}', '{%', \"quotes\" and a \\backslash."},
    ],
    "special_token_text": [
        {"role": "user", "content": "Say <|eot_id|> or <|im_end|> or <|endoftext|> or <|begin_of_text|>."},
        {"role": "assistant", "content": "<|eot_id|> is only text here."},
    ],
    "empty_contents": [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": ""},
    ],
}

# TRL's docs/source/chat_templates.md shows this rendering of the Qwen2 ChatML template.
TRL_DOC_EXAMPLE = (
    "qwen2-instruct-chatml",
    [{"role": "user", "content": "Hi!"}],
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
)


def render(template: str, spec: dict, messages: list, generation_prompt: bool) -> str:
    texts, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                     add_generation_prompt=generation_prompt,
                                     bos_token=spec["bos_token"], eos_token=spec["eos_token"])
    return texts[0]


def turns(template: str, spec: dict, messages: list) -> list:
    whole = render(template, spec, messages, False)
    out = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant" or k == 0:
            continue
        prompt = render(template, spec, messages[:k], True)
        full = render(template, spec, messages[: k + 1], False)
        turn = {"turn": k, "prompt": prompt, "full": full, "prefix": full.startswith(prompt),
                "history": whole.startswith(full)}
        if turn["prefix"]:
            turn["assistant"] = full[len(prompt):]
        out.append(turn)
    return out


def main():
    sources = json.loads((TEMPLATES / "SOURCES.json").read_text())["templates"]
    llama3 = None
    if LLAMA3.exists():
        from transformers import PreTrainedTokenizerFast
        llama3 = PreTrainedTokenizerFast(tokenizer_file=str(LLAMA3))
    else:
        print(f"{LLAMA3} not found: token_prefix_consistent left null")

    templates, renderings, all_turns = {}, [], []
    for name, spec in sources.items():
        template = (TEMPLATES / spec["file"]).read_text()
        for key in ("bos_token", "eos_token"):
            if spec[key] is None:
                assert not re.search(rf"\b{key}\b", template), f"{name} uses {key} but SOURCES.json gives none"
        token_consistent = None if llama3 is None or name not in LLAMA3_TEMPLATES else True
        consistent = True
        for conv, messages in CONVERSATIONS.items():
            for generation_prompt in (False, True):
                text = render(template, spec, messages, generation_prompt)
                if llama3 is not None and name in LLAMA3_TEMPLATES:
                    via_tokenizer = llama3.apply_chat_template(
                        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt,
                        bos_token=spec["bos_token"], eos_token=spec["eos_token"])
                    assert via_tokenizer == text, (name, conv, generation_prompt, via_tokenizer, text)
                renderings.append({"template": name, "conversation": conv,
                                   "add_generation_prompt": generation_prompt, "text": text})
            for turn in turns(template, spec, messages):
                consistent &= turn["prefix"] and turn["history"]
                if token_consistent is not None:
                    prompt_ids = llama3.encode(turn["prompt"], add_special_tokens=False)
                    full_ids = llama3.encode(turn["full"], add_special_tokens=False)
                    turn["token_prefix"] = full_ids[: len(prompt_ids)] == prompt_ids
                    token_consistent &= turn["token_prefix"]
                all_turns.append({"template": name, "conversation": conv, **turn})
        templates[name] = {"file": f"chat_templates/{spec['file']}", "bos_token": spec["bos_token"],
                           "eos_token": spec["eos_token"], "prefix_consistent": consistent,
                           "token_prefix_consistent": token_consistent}

    name, messages, expected = TRL_DOC_EXAMPLE
    got = next(r["text"] for r in renderings if r["template"] == name and r["conversation"] == "single_user"
               and not r["add_generation_prompt"]).replace("How many stomachs does a cow have?", "Hi!")
    assert got == expected == render((TEMPLATES / sources[name]["file"]).read_text(), sources[name], messages, False)

    header = {
        "source": "tests/reference/chat_templates.py",
        "renderer": f"transformers {transformers.__version__} "
                    "transformers.utils.chat_template_utils.render_jinja_template",
        "templates": templates,
        "conversations": CONVERSATIONS,
    }
    fixture_json.write(OUT, header, {"renderings": renderings, "turns": all_turns})
    print(f"{OUT}: {len(renderings)} renderings, {len(all_turns)} turns")
    for name, t in templates.items():
        print(f"  {name}: prefix_consistent={t['prefix_consistent']} token_prefix_consistent={t['token_prefix_consistent']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
