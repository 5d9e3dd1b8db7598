// Checks common.cuh's round_for_clamp against roundf on every f32 bit pattern, under both clamps the kernels
// put after it (int8 codes: [-128, 127]; ternary weights: [-1, 1]), and that pack_code's add gives each int8
// code's byte. The host's float arithmetic is IEEE round-to-nearest as __fadd_rn and __fsub_rn are.
//   gcc -O2 -ffp-contract=off -o round_for_clamp tests/reference/round_for_clamp.c -lm && ./round_for_clamp
// (about 40 s a clamp on one core; exits 1 on any difference).
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static float round_for_clamp(float x) {
    volatile float magic = 12582912.f;  // volatile: no folding of (x + m) - m
    float r = copysignf((x + magic) - magic, x);
    return fabsf(x - r) == 0.5f ? x + copysignf(0.5f, x) : r;
}

static uint32_t bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

int main(void) {
    const float ranges[2][2] = {{-128.f, 127.f}, {-1.f, 1.f}};
    int failed = 0;
    for (int k = 0; k < 2; k++) {
        float lo = ranges[k][0], hi = ranges[k][1];
        uint64_t differ = 0;
        for (uint64_t i = 0; i < (1ull << 32); i++) {
            uint32_t u = (uint32_t)i;
            float x;
            memcpy(&x, &u, 4);
            float ours = fminf(fmaxf(round_for_clamp(x), lo), hi), want = fminf(fmaxf(roundf(x), lo), hi);
            if (bits(ours) != bits(want)) {
                if (differ++ < 5) printf("x = %a: %a, roundf %a\n", x, ours, want);
            }
        }
        printf("clamp [%g, %g]: %llu of 2^32 differ\n", lo, hi, (unsigned long long)differ);
        failed |= differ != 0;
    }
    for (int q = -128; q <= 127; q++) {
        uint32_t b = bits((float)q + 12582912.f) & 0xffu;
        if (b != ((uint32_t)q & 0xffu)) {
            printf("pack_code's byte of %d: %u\n", q, b);
            failed = 1;
        }
    }
    return failed;
}
