"""transformers' RoPE inverse frequencies for configs Bessie reads in both forms (top-level rope_theta /
rope_scaling, and transformers 5's rope_parameters), written to tests/fixtures/rope_parameters.json.

Run: python3 tests/reference/rope_parameters.py (transformers 5 and torch)."""
import json
from pathlib import Path

import transformers
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from fixture_json import write

# Llama-3.2-1B's RoPE (llama3 scaling), in the Hub's form and in rope_parameters form; head_dim 64.
LLAMA32 = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072)
SCALING = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
           "original_max_position_embeddings": 8192, "rope_type": "llama3"}
CASES = {
    "llama3_top_level": dict(LLAMA32, rope_theta=500000.0, rope_scaling=SCALING),
    "llama3_rope_parameters": dict(LLAMA32, rope_parameters=dict(SCALING, rope_theta=500000.0)),
    "default_rope_parameters": dict(LLAMA32, rope_parameters={"rope_type": "default", "rope_theta": 1000042.0}),
}


def main():
    out = []
    for name, fields in CASES.items():
        cfg = LlamaConfig(**fields)
        inv = LlamaRotaryEmbedding(cfg).inv_freq
        out.append({"name": name, "config": fields, "inv_freq": [float(x) for x in inv]})
    write(Path(__file__).parent.parent / "fixtures" / "rope_parameters.json",
          {"transformers": transformers.__version__}, {"cases": out})


if __name__ == "__main__":
    main()
