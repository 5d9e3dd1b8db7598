#!/usr/bin/env python3
"""Trains the small demo/CI tokenizer shipped in assets/tokenizer/.

Same kind of model as LLaMA's tokenizer.model (SentencePiece BPE, byte fallback, identity normalization,
dummy prefix, digits split, unk=0 bos=1 eos=2, no pad piece), just with a ~1000-piece vocabulary trained on
corpus.txt. Like the 1bitLLM BitNet checkpoints, `<pad>` and `</line>` are added right after the vocabulary
in tokenizer_config.json / special_tokens_map.json.

    pip install sentencepiece
    python3 assets/tokenizer/train_tokenizer.py
"""
import io
import json
from pathlib import Path

import sentencepiece as spm

HERE = Path(__file__).resolve().parent
VOCAB_SIZE = 1000

model = io.BytesIO()
spm.SentencePieceTrainer.train(
    input=str(HERE / "corpus.txt"),
    model_writer=model,
    model_type="bpe",
    vocab_size=VOCAB_SIZE,
    byte_fallback=True,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    character_coverage=1.0,
    max_sentencepiece_length=16,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    num_threads=1,
    minloglevel=2,
)
(HERE / "tokenizer.model").write_bytes(model.getvalue())

sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
assert sp.get_piece_size() == VOCAB_SIZE, sp.get_piece_size()


def token(content, special):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}


config = {
    "add_bos_token": True,
    "add_eos_token": False,
    "added_tokens_decoder": {
        "0": token("<unk>", True),
        "1": token("<s>", True),
        "2": token("</s>", True),
        str(VOCAB_SIZE): token("<pad>", True),
        str(VOCAB_SIZE + 1): token("</line>", False),
    },
    "bos_token": "<s>",
    "clean_up_tokenization_spaces": False,
    "eos_token": "</s>",
    "legacy": False,
    "model_max_length": 2048,
    "pad_token": "<pad>",
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": "<unk>",
}
special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
for name, obj in [("tokenizer_config.json", config), ("special_tokens_map.json", special)]:
    (HERE / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
