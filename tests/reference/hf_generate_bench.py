#!/usr/bin/env python3
"""Hugging Face `generate` on a random bitnet_b1_58-large-shaped model: the baseline for bessie-eval's speed.

The model is transformers' LlamaForCausalLM of the -large shape (hidden 1536, intermediate 4096, 24 layers,
16 heads, tied embeddings; the vocabulary of --vocab-size) made BitNet-faithful: q/k/v/gate/up are BitLinear, and o_proj and
down_proj are `Sequential(RMSNorm, BitLinear)`, which is exactly `o_proj(inner_attn_ln(x))` and
`down_proj(ffn_layernorm(x))`. BitLinear quantizes its weight (absmean, ternary) and its input (per-token
absmax, int8) on every call, as 1bitLLM's utils_quant.BitLinear does, so this is what running the
original model through transformers costs. `--quantize-once` stores the ternary weights instead (only the
activations are quantized per call, as Bessie does); `--impl llama` is a plain bf16 Llama of the same shape
(no quantization, no extra norms), a lower bound. Random weights: speed does not depend on their values.
Generation goes through HF's own machinery (left padding with an attention mask, position ids from the
mask, DynamicCache), greedy, stopping a row at EOS; HF has no 🐂 stop without a tokenizer object, which
a random model practically never writes anyway.

The workload is bessie-eval's: the prompts of a dev file rendered with Bessie's chat template, tokenized
with --tokenizer (ids equal Bessie's), in the order bessie-eval takes them (longest first) in static batches
of --batch-size (`generate` has no continuous batching; with random weights no row stops early, so
continuous batching would not change bessie-eval's work either), --max-new-tokens 50. Prints one JSON line.

Exact commands, from the project root on the GPU machine (bessie built with --features cuda, see
../shared/GPU.md; BIN is where its binaries are), both in the same call. The tokenizer shipped in assets/
(1,000 SentencePiece pieces; vocabulary 1,002 with Bessie's added tokens) travels with the checkout, so
nothing else is needed on that machine; `--tokenizer ../shared/tokenizers/llama/tokenizer.model
--vocab-size 32002` (and the same for bessie-init-model) runs the -large vocabulary where that file exists:

    python3 tests/reference/hf_generate_bench.py --write-dev /tmp/bench/dev.jsonl
    $BIN/bessie-init-model --out /tmp/bench/large --shape large --dtype bf16
    $BIN/bessie-eval -m /tmp/bench/large -d /tmp/bench/dev.jsonl -o /tmp/bench/eval.jsonl \\
        --batch-size 32 --max-new-tokens 50 --device cuda
    python3 tests/reference/hf_generate_bench.py --dev /tmp/bench/dev.jsonl --quantize-once

bessie-eval prints examples/s and generated tokens/s under its table; /tmp/bench/eval_summary.json has them
under "speed". Neither side warms up: both times include the first batch.

--write-dev needs only the standard library; the benchmark needs torch, transformers and sentencepiece.
"""
import argparse, json, random, time

SYSTEM = ("You are Bessie, created by Oxen.ai. You are happy to help with writing, analysis, question answering, "
          "math, coding, and all sorts of other tasks. You give concise responses to simple questions or "
          "statements, but provide thorough responses to more complex and open-ended questions. Answer the user's "
          "query as best as you can, and say \"I don't know\" if you don't know the answer.")

WORDS = ("the cow farm grass milk barn field river winter summer farmer calf herd hay fence gate morning evening "
         "village market cart ox valley hill rain sun snow green brown large small old young quiet busy north "
         "south east west bread cheese butter wool sheep horse road bridge mill stone wood water well church "
         "school house garden tree apple corn wheat harvest season year day night people family children").split()

SHAPE = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
             num_key_value_heads=16)


def generation_prompt(prompt):
    """Bessie's chat template up to the answer (src/tokenizer/template.rs)."""
    return f"\n{SYSTEM}\n\nUser:\n{prompt}\n\nBessie:\n"


def write_dev(path, n, seed):
    """SQuAD-like lines: a context of 50 to 100 words and a question, about 200 tokens under the template."""
    rng = random.Random(seed)
    sentence = lambda k: " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."
    with open(path, "w") as f:
        for i in range(n):
            words = rng.randint(50, 100)
            context = " ".join(sentence(10) for _ in range(words // 10))
            answer = rng.choice(WORDS)
            line = dict(prompt=f"Context: {context}\n\nQuestion: Where is the {answer}?",
                        response=answer if i % 3 else "Not in context.",
                        answers=[answer] if i % 3 else [], source="synthetic", id=f"bench-{i}")
            f.write(json.dumps(line) + "\n")


def build_model(impl, quantize_once, vocab_size):
    import torch, torch.nn as nn, torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def act_quant(x):
        s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        return (x * s).round().clamp(-128, 127) / s

    def weight_quant(w):
        s = 1.0 / w.abs().mean().clamp(min=1e-5)
        return (w * s).round().clamp(-1, 1) / s

    class BitLinear(nn.Linear):
        def forward(self, x):
            w = self.weight if quantize_once else weight_quant(self.weight)
            return F.linear(act_quant(x), w)

    def bit(linear, norm_dim=None):
        b = BitLinear(linear.in_features, linear.out_features, bias=False, device=linear.weight.device,
                      dtype=linear.weight.dtype)
        with torch.no_grad():
            b.weight.copy_(weight_quant(linear.weight.float()).to(linear.weight.dtype) if quantize_once else linear.weight)
        if norm_dim is None:
            return b
        return nn.Sequential(LlamaRMSNorm(norm_dim, eps=1e-5).to(linear.weight.device, linear.weight.dtype), b)

    cfg = LlamaConfig(**SHAPE, vocab_size=vocab_size, max_position_embeddings=2048, rope_theta=10000.0,
                      rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=vocab_size - 2, attention_bias=False, mlp_bias=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if impl == "bitnet":
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            a.q_proj, a.k_proj, a.v_proj = bit(a.q_proj), bit(a.k_proj), bit(a.v_proj)
            a.o_proj = bit(a.o_proj, SHAPE["hidden_size"])
            m.gate_proj, m.up_proj = bit(m.gate_proj), bit(m.up_proj)
            m.down_proj = bit(m.down_proj, SHAPE["intermediate_size"])
    return model.eval()


def bench(a):
    import sentencepiece, torch, transformers
    sp = sentencepiece.SentencePieceProcessor(model_file=a.tokenizer)
    with open(a.dev) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()][: a.examples]
    ids = [[1] + sp.encode(generation_prompt(p)) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # stable, longest first, as bessie-eval
    model = build_model(a.impl, a.quantize_once, a.vocab_size)
    # Bessie's pad is the first token added after the SentencePiece pieces.
    pad, eos = a.vocab_size - 2, 2
    generated = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(order), a.batch_size):
            batch = [ids[i] for i in order[start : start + a.batch_size]]
            width = max(map(len, batch))
            x = torch.tensor([[pad] * (width - len(r)) + r for r in batch], device="cuda")
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch], device="cuda")
            out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=a.max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)
            for row in out[:, width:].tolist():
                generated += row.index(eos) + 1 if eos in row else len(row)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    print(json.dumps(dict(impl=a.impl, quantize_once=a.quantize_once, examples=len(ids), batch_size=a.batch_size,
                          max_new_tokens=a.max_new_tokens, prompt_tokens_mean=round(sum(map(len, ids)) / len(ids), 1),
                          generated_tokens=generated, seconds=round(secs, 2),
                          examples_per_s=round(len(ids) / secs, 2), generated_tokens_per_s=round(generated / secs, 1),
                          gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                          transformers=transformers.__version__)), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write-dev", metavar="PATH", help="write the synthetic dev file and exit")
    ap.add_argument("--dev", metavar="PATH", help="benchmark HF generate on this dev file's prompts")
    ap.add_argument("--tokenizer", default="assets/tokenizer/tokenizer.model",
                    help="SentencePiece model (default: %(default)s, Bessie's shipped one)")
    ap.add_argument("--vocab-size", type=int, default=1002,
                    help="the model's vocabulary: the tokenizer's pieces and Bessie's 2 added tokens (default: "
                         "%(default)s, for the shipped tokenizer; 32002 for LLaMA's)")
    ap.add_argument("--examples", type=int, default=512, help="prompts to write or to run (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=50)
    ap.add_argument("--impl", choices=["bitnet", "llama"], default="bitnet",
                    help="BitNet-faithful Llama (default) or plain bf16 Llama of the same shape")
    ap.add_argument("--quantize-once", action="store_true", help="ternary weights computed once, not per call")
    a = ap.parse_args()
    if a.write_dev:
        write_dev(a.write_dev, a.examples, a.seed)
    elif a.dev:
        bench(a)
    else:
        ap.error("pass --write-dev PATH or --dev PATH")


if __name__ == "__main__":
    main()
