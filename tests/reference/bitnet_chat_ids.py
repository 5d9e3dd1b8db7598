#!/usr/bin/env python3
"""Writes the token ids and loss targets of Microsoft's own chat format for BitNet b1.58 2B4T, for the conversations
of tests/reference/chat_templates.py:

  tests/fixtures/bitnet_chat_format_ids.json

Microsoft's GPU reference code (microsoft/BitNet, gpu/tokenizer.py, class ChatFormat) tokenizes a dialog segment by
segment: <|begin_of_text|>, then per message encode("System: " | "User: " | "Assistant: ") + encode(content.strip())
+ <|eot_id|>, and for a completion prompt a final encode("Assistant: "). Its targets put the loss on each assistant
message's content and closing <|eot_id|>, nothing else. Special-token text inside content is encoded as plain text
(tiktoken's disallowed_special=()).

Per conversation the fixture holds `ids` and `targets` (ChatFormat.encode_dialog_prompt(return_target=True); -1 = no
loss, else the id at that position), `prompt_ids` for the conversation up to its last assistant turn (the whole
conversation when it has none) with the completion header, and `template_ids`: BOS + the LLaMA 3 tokenizer's ids of
the string that the 2B4T chat template (tests/fixtures/chat_templates/bitnet-b1.58-2B-4T.jinja) renders, tokenized
whole as transformers does (special-token text parsed). `same_as_template` says whether the two agree. They differ
where whole-string tokenization joins the space of "System: ", "User: " or "Assistant: " to the word after it (segment
by segment it stays a token of its own, 220), and where content holds special-token text.

The script checks that gpu/tokenizer.model holds the same 128,000 ranks as ../shared/tokenizers/llama3/tokenizer.json.

    git clone https://github.com/microsoft/BitNet /tmp/BitNet   # only gpu/tokenizer.py and gpu/tokenizer.model are read
    pip install tiktoken transformers   # no torch needed
    python3 tests/reference/bitnet_chat_ids.py /tmp/BitNet
"""
import importlib.util
import json
import sys
from pathlib import Path

from tiktoken.load import load_tiktoken_bpe
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture_json  # noqa: E402
from bpe_ids import TOKENIZER, mergeable_ranks  # noqa: E402
from chat_templates import CONVERSATIONS, TEMPLATES, render  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "bitnet_chat_format_ids.json"
TEMPLATE = "bitnet-b1.58-2B-4T"


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    gpu = Path(sys.argv[1]) / "gpu"
    spec = importlib.util.spec_from_file_location("bitnet_gpu_tokenizer", gpu / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ms = module.Tokenizer(str(gpu / "tokenizer.model"))
    chat = module.ChatFormat(ms)

    assert load_tiktoken_bpe(str(gpu / "tokenizer.model")) == mergeable_ranks(json.loads(TOKENIZER.read_text())), \
        "gpu/tokenizer.model and the shared LLaMA 3 tokenizer.json have different ranks"
    hf = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER))
    template_spec = json.loads((TEMPLATES / "SOURCES.json").read_text())["templates"][TEMPLATE]
    template = (TEMPLATES / template_spec["file"]).read_text()

    cases = []
    for name, messages in CONVERSATIONS.items():
        ids, targets = chat.encode_dialog_prompt(messages, return_target=True)
        last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        prompt_ids = chat.encode_dialog_prompt(messages[:last], completion=True)
        # The prompt for an assistant turn is a token prefix of the dialog that contains the turn.
        assert last == len(messages) or ids[: len(prompt_ids)] == prompt_ids, name
        text = render(template, template_spec, messages, False)
        template_ids = [ms.bos_id] + hf.encode(text, add_special_tokens=False)
        cases.append({"conversation": name, "ids": ids, "targets": targets, "prompt_ids": prompt_ids,
                      "template_ids": template_ids, "same_as_template": template_ids == ids})

    header = {
        "source": "tests/reference/bitnet_chat_ids.py",
        "format": "microsoft/BitNet gpu/tokenizer.py ChatFormat.encode_dialog_prompt",
        "template": f"chat_templates/{template_spec['file']}",
        "bos_id": ms.bos_id,
        "eot_id": chat.eot_id,
    }
    fixture_json.write(OUT, header, {"cases": cases})
    print(f"{OUT}: {len(cases)} conversations, {sum(c['same_as_template'] for c in cases)} tokenized as the template")
    return 0


if __name__ == "__main__":
    sys.exit(main())
