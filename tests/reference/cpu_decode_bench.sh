#!/usr/bin/env bash
# CPU decoding of one model in four engines on the same cores, alternating, ROUNDS rounds: Bessie's packed
# checkpoint (bessie-prompt), llama.cpp TQ2_0 (llama-cpp-python), bitnet.cpp I2_S and TQ2_0 (its llama-cli).
# The same text in all (Bessie's chat template with its default system prompt around PROMPT, BOS added),
# NEW greedy tokens without stopping at EOS, THREADS threads. Prints one line per run: engine, prompt and
# decode tokens/s as each engine reports them.
#
#   PACKED=dir TQ2=model.gguf I2S=model.gguf BITNET_CLI=.../llama-cli PY_LLAMA=python-with-llama_cpp \
#     tests/reference/cpu_decode_bench.sh path/to/bessie-prompt
set -u
BP=${1:?bessie-prompt binary}
ROUNDS=${ROUNDS:-3} THREADS=${THREADS:-2} NEW=${NEW:-64} PROMPT=${PROMPT:-"What is the capital of France?"}
SYSTEM="You are Bessie, created by Oxen.ai. You are happy to help with writing, analysis, question answering, math, coding, and all sorts of other tasks. You give concise responses to simple questions or statements, but provide thorough responses to more complex and open-ended questions. Answer the user's query as best as you can, and say \"I don't know\" if you don't know the answer."
# (The x keeps the final newline, which command substitution would strip.)
TEXT=$(printf '\n%s\n\nUser:\n%s\n\nBessie:\nx' "$SYSTEM" "$PROMPT"); TEXT=${TEXT%x}
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$ROUNDS"); do
  out=$(RAYON_NUM_THREADS=$THREADS "$BP" -m "$PACKED" --prompt "$PROMPT" --max-new-tokens "$NEW" --device cpu 2>&1 | tail -1)
  echo "bessie packed: $out"
  TEXT="$TEXT" "$PY_LLAMA" - "$TQ2" "$NEW" "$THREADS" <<'PY'
import os, sys, time
from llama_cpp import Llama
model, new, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=model, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
ids = llm.tokenize(os.environ["TEXT"].encode(), add_bos=True, special=False)
t0 = time.perf_counter(); llm.eval(ids); t1 = time.perf_counter()
for _ in range(new):
    llm.eval([llm.sample(top_k=1, temp=0.0)])
t2 = time.perf_counter()
print(f"llama.cpp TQ2_0: {len(ids)} prompt tokens at {len(ids)/(t1-t0):.1f} tok/s, {new} new tokens at {new/(t2-t1):.1f} tok/s")
PY
  for gguf in "$I2S" "$TQ2"; do
    log=$("$BITNET_CLI" -m "$gguf" -p "$TEXT" -n "$NEW" -t "$THREADS" --temp 0 --ignore-eos -c 1024 --no-escape \
      --no-display-prompt --no-warmup --simple-io 2>&1 >/dev/null </dev/null)
    echo "bitnet.cpp $(basename "$gguf"): $(echo "$log" | grep -oE '(prompt eval|  eval) time = .*tokens per second' | sed -E 's/.*\/ +([0-9]+) (tokens|runs).*, +([0-9.]+) tokens per second/\1 at \3 tok\/s/' | paste -sd ';')"
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
