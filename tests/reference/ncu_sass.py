#!/usr/bin/env python3
"""Where one kernel's time goes, instruction by instruction, from Nsight Compute's source page.

On the GPU machine (see README's Nsight Compute recipe):
    ncu -k regex:'^flash_backward_kv_hopper_96$' -s 30 -c 1 --set full -o kv bessie-train --bench ...
    ncu -i kv.ncu-rep --page source --print-source sass --csv > kv.sass.csv
Here (plain Python, no Nsight needed):
    python3 tests/reference/ncu_sass.py kv.sass.csv [--top 30]

Prints the warp-stall samples by reason, the executed warp instructions by opcode, and the straight-line runs
of instructions (each run executed the same number of times: a basic block or a piece of one) that issue the
most, with their opcode mix: the run that holds the most instructions times executions is where the kernel
spends its issue slots, and the reasons on its top instructions say what its warps wait for.
"""
import argparse
import collections
import csv


def opcode(source):
    words = source.split()
    if not words:
        return ""
    op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return op.split(".")[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", help="ncu --page source --print-source sass --csv output")
    ap.add_argument("--top", type=int, default=20, help="runs and instructions to list")
    args = ap.parse_args()

    with open(args.csv, newline="") as f:
        rows = list(csv.reader(f))
    # The first line names the kernel; the second is the header.
    header_at = next(i for i, r in enumerate(rows) if "Address" in r and "Source" in r)
    header, data = rows[header_at], rows[header_at + 1 :]
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]

    def num(r, name):
        v = r[col[name]].replace(",", "")
        return int(v) if v and v != "-" else 0

    samples = sum(num(r, "Warp Stall Sampling (All Samples)") for r in data)
    by_reason = collections.Counter({s: sum(num(r, s) for r in data) for s in reasons})
    print(f"{' '.join(rows[0])[:100]}\nstall samples: {samples}")
    for s, v in by_reason.most_common():
        if v:
            print(f"  {s:26s}{v:9d} {100 * v / max(samples, 1):5.1f}%")

    executed = collections.Counter()
    sampled = collections.Counter()
    for r in data:
        op = opcode(r[col["Source"]])
        executed[op] += num(r, "Instructions Executed")
        sampled[op] += num(r, "Warp Stall Sampling (All Samples)")
    total = sum(executed.values())
    print(f"executed warp instructions: {total}")
    for op, v in executed.most_common(args.top):
        print(f"  {op:12s}{v:12d} {100 * v / max(total, 1):5.1f}%  samples {sampled[op]}")

    runs = []
    for r in data:
        n = num(r, "Instructions Executed")
        if runs and runs[-1]["n"] == n:
            run = runs[-1]
        else:
            run = {"n": n, "at": r[col["Address"]], "ops": [], "samples": 0}
            runs.append(run)
        run["ops"].append(opcode(r[col["Source"]]))
        run["samples"] += num(r, "Warp Stall Sampling (All Samples)")
    print("runs by instructions issued (address, length, executions, share, samples, opcodes):")
    for run in sorted(runs, key=lambda x: -x["n"] * len(x["ops"]))[: args.top]:
        mix = ", ".join(f"{k}:{v}" for k, v in collections.Counter(run["ops"]).most_common(6))
        share = 100 * run["n"] * len(run["ops"]) / max(total, 1)
        print(f"  {run['at'][-6:]} {len(run['ops']):4d} x {run['n']:8d} {share:5.1f}% {run['samples']:7d}  {mix}")

    print("instructions by stall samples (address, samples, top reasons, instruction):")
    for r in sorted(data, key=lambda r: -num(r, "Warp Stall Sampling (All Samples)"))[: args.top]:
        top = sorted(((num(r, s), s[6:]) for s in reasons), reverse=True)[:2]
        why = ", ".join(f"{s} {v}" for v, s in top if v)
        print(f"  {r[col['Address']][-6:]} {num(r, 'Warp Stall Sampling (All Samples)'):6d}  {why:32s} "
              f"{r[col['Source']].strip()[:60]}")


if __name__ == "__main__":
    main()
