"""The flash backward's blocks on the card's slots, in two launch orders: a prediction, not a measurement.

Under the causal mask a block's work is the number of 64-row tiles of the other side it meets (key block j
of n meets n - j query tiles, times the group's query heads; query block i meets i + 1 key tiles), plus a
fixed cost a block. The card starts blocks in the order of their linear index on the first free slot (SMs
times blocks an SM). With the grid (tiles, heads) each head's blocks start longest first but the heads one
after another, so the last heads' longest blocks can start last; with (heads, tiles) every head's longest
block starts before any head's next. Greedy list scheduling gives each order's time in tile units:

    python3 tests/reference/flash_block_order.py [fixed cost a block, in tiles; default 1]
"""
import heapq
import sys


def makespan(works, slots):
    free = [0.0] * slots
    for w in works:
        heapq.heappush(free, heapq.heappop(free) + w)
    return max(free)


def orders(lengths, heads, fixed):
    """Works in the order (tiles, heads): a head's blocks, then the next head's; and (heads, tiles)."""
    by_head = [length + fixed for _ in range(heads) for length in lengths]
    by_rank = [length + fixed for length in lengths for _ in range(heads)]
    return by_head, by_rank


def main():
    fixed = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    sms = 132
    # name, sequence, batch, query heads, group, dK/dV blocks an SM, dQ blocks an SM (flash_hopper.cu)
    shapes = [
        ("-large 768 x 8", 768, 8, 16, 1, 2, 3),
        ("-large 2048 x 4", 2048, 4, 16, 1, 2, 3),
        ("2B4T 2048 x 4", 2048, 4, 20, 4, 2, 3),
        ("Falcon3-1B 2048 x 4", 2048, 4, 8, 2, 1, 1),
    ]
    print(f"fixed cost {fixed} tiles a block; time in tiles, (tiles, heads) -> (heads, tiles)")
    for name, t, b, h, group, kv_per_sm, q_per_sm in shapes:
        n = t // 64
        kv = orders([(n - j) * group for j in range(n)], b * h // group, fixed)
        q = orders([n - i for i in range(n)], b * h, fixed)
        kv_times = [makespan(w, sms * kv_per_sm) for w in kv]
        q_times = [makespan(w, sms * q_per_sm) for w in q]
        print(
            f"{name}: dK/dV {kv_times[0]:.1f} -> {kv_times[1]:.1f} ({1 - kv_times[1] / kv_times[0]:.1%} less), "
            f"dQ {q_times[0]:.1f} -> {q_times[1]:.1f} ({1 - q_times[1] / q_times[0]:.1%} less)"
        )


if __name__ == "__main__":
    main()
