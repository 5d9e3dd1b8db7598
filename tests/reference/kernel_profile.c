// A kernel-level profile of any CUDA program without Nsight (the GPU machines have none): CUPTI's activity
// API, loaded by the CUDA driver through CUDA_INJECTION64_PATH, records every kernel, memcpy and memset, and at
// exit prints the time per kernel name and how long the GPU sat idle between them (launch-bound time), with the
// kernels the idle time came before (what the GPU was waiting to be given: after a host sync, the next launch),
// the launch after each memset by size (a library's memset comes right before the kernel it serves), and the
// host's time in each CUDA driver call (where the host spends a launch-bound step: a graph launch, a
// copy that waits).
//
// Build (here, against the CUPTI wheel's headers; `pip download nvidia-cuda-cupti==13.0.*`):
//   gcc -O2 -shared -fPIC -o libkprof.so kernel_profile.c -I$CUPTI/include -L$CUPTI/lib -l:libcupti.so.13
// Run (there, with libcupti.so.13 beside it on LD_LIBRARY_PATH):
//   CUDA_INJECTION64_PATH=./libkprof.so KPROF_SKIP_S=5 KPROF_TOP=40 bessie-train --bench ...
// KPROF_SKIP_S drops what ran in the first seconds after the first kernel (model init, warm-up);
// KPROF_FROM=NAME:N starts the window at the N-th launch of a kernel whose name begins with NAME instead
// (flash_forward:25 skips bessie-prompt's warm-up of a 24-layer model: the prompt's own prefill). Gaps of more
// than 10 ms between kernels (host-side work such as building the model) count as pauses, not as idle time.
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  const char *name;
  unsigned long long start, end;
} Record;

typedef struct {
  Record *at;
  size_t count, capacity;
} Records;

// The device's work (kernels, copies, memsets) and the host's driver calls.
static Records device, host;

static void add(Records *rs, const char *name, unsigned long long start, unsigned long long end) {
  if (rs->count == rs->capacity) {
    rs->capacity = rs->capacity ? 2 * rs->capacity : 1 << 16;
    rs->at = realloc(rs->at, rs->capacity * sizeof(Record));
  }
  rs->at[rs->count++] = (Record){name, start, end};
}

// A memset's name with its size, which tells which buffer it zeroes (the first 64 sizes; the rest as one).
static const char *memset_name(unsigned long long bytes) {
  static struct {
    unsigned long long bytes;
    char name[40];
  } seen[64];
  static int count;
  for (int i = 0; i < count; i++)
    if (seen[i].bytes == bytes) return seen[i].name;
  if (count == 64) return "[memset, other sizes]";
  seen[count].bytes = bytes;
  snprintf(seen[count].name, sizeof seen[count].name, "[memset %llu bytes]", bytes);
  return seen[count++].name;
}

static void CUPTIAPI requested(uint8_t **buffer, size_t *size, size_t *max_records) {
  *size = 16 << 20;
  *buffer = aligned_alloc(8, *size);
  *max_records = 0;
}

static void CUPTIAPI completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size, size_t valid) {
  CUpti_Activity *r = NULL;
  while (cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) {
    if (r->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
      CUpti_ActivityKernel10 *k = (CUpti_ActivityKernel10 *)r;
      add(&device, k->name, k->start, k->end);
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      CUpti_ActivityMemcpy6 *m = (CUpti_ActivityMemcpy6 *)r;
      add(&device,
          m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_HTOD   ? "[memcpy HtoD]"
          : m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOH ? "[memcpy DtoH]"
                                                           : "[memcpy other]",
          m->start, m->end);
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      CUpti_ActivityMemset4 *m = (CUpti_ActivityMemset4 *)r;
      add(&device, memset_name(m->bytes), m->start, m->end);
    } else if (r->kind == CUPTI_ACTIVITY_KIND_DRIVER) {
      CUpti_ActivityAPI *a = (CUpti_ActivityAPI *)r;
      const char *name = "?";
      cuptiGetCallbackName(CUPTI_CB_DOMAIN_DRIVER_API, a->cbid, &name);
      add(&host, name, a->start, a->end);
    }
  }
  free(buffer);
}

typedef struct {
  const char *name;
  size_t calls;
  double ns;
} Total;

// Adds `ns` to the entry of `name` in `totals` (of `*kinds` entries).
static void tally(Total *totals, size_t *kinds, const char *name, double ns) {
  size_t t = 0;
  while (t < *kinds && strcmp(totals[t].name, name)) t++;
  if (t == *kinds) totals[(*kinds)++].name = name;
  totals[t].calls++;
  totals[t].ns += ns;
}

static int by_start(const void *a, const void *b) {
  const Record *x = a, *y = b;
  return x->start < y->start ? -1 : x->start > y->start;
}

static int by_time(const void *a, const void *b) {
  const Total *x = a, *y = b;
  return x->ns < y->ns ? 1 : x->ns > y->ns ? -1 : 0;
}

static void report(void) {
  cuptiActivityFlushAll(1);
  Record *records = device.at;
  size_t count = device.count;
  if (!count) return;
  qsort(records, count, sizeof(Record), by_start);
  const char *skip = getenv("KPROF_SKIP_S"), *top = getenv("KPROF_TOP");
  unsigned long long from = records[0].start + (unsigned long long)((skip ? atof(skip) : 0) * 1e9);
  const char *from_kernel = getenv("KPROF_FROM"), *colon = from_kernel ? strchr(from_kernel, ':') : NULL;
  if (colon) {
    size_t len = colon - from_kernel, nth = atoi(colon + 1), seen = 0;
    for (size_t i = 0; i < count; i++)
      if (!strncmp(records[i].name, from_kernel, len) && ++seen == nth) {
        from = records[i].start;
        break;
      }
  }
  size_t first = 0;
  while (first < count && records[first].start < from) first++;
  if (first == count) return;
  // Busy time is the union of the intervals (streams overlap), idle the rest of the window.
  unsigned long long busy = 0, paused = 0, cur_start = records[first].start, cur_end = records[first].end,
                     last_end = 0;
  Total *totals = calloc(count - first, sizeof(Total)), *waits = calloc(count - first, sizeof(Total));
  size_t kinds = 0, wait_kinds = 0;
  for (size_t i = first; i < count; i++) {
    Record *r = &records[i];
    if (r->start > cur_end) {
      busy += cur_end - cur_start;
      if (r->start - cur_end > 10000000ull) paused += r->start - cur_end;
      else tally(waits, &wait_kinds, r->name, r->start - cur_end);
      cur_start = r->start;
    }
    if (r->end > cur_end) cur_end = r->end;
    if (r->end > last_end) last_end = r->end;
    tally(totals, &kinds, r->name, r->end - r->start);
  }
  busy += cur_end - cur_start;
  double span = last_end - records[first].start - paused, sum = 0;
  for (size_t t = 0; t < kinds; t++) sum += totals[t].ns;
  qsort(totals, kinds, sizeof(Total), by_time);
  fprintf(stderr,
          "kprof: window %.1f ms (pauses of over 10 ms taken out: %.1f ms), GPU busy %.1f ms (%.1f%%), idle %.1f ms, "
          "%zu launches, kernel time %.1f ms\n",
          span / 1e6, paused / 1e6, busy / 1e6, 100.0 * busy / span, (span - busy) / 1e6, count - first, sum / 1e6);
  fprintf(stderr, "kprof: %8s %10s %9s %6s  %s\n", "calls", "total ms", "avg us", "%", "kernel");
  size_t n = top ? (size_t)atoi(top) : 30;
  for (size_t t = 0; t < kinds && t < n; t++)
    fprintf(stderr, "kprof: %8zu %10.2f %9.2f %6.2f  %.150s\n", totals[t].calls, totals[t].ns / 1e6,
            totals[t].ns / 1e3 / totals[t].calls, 100.0 * totals[t].ns / sum, totals[t].name);
  qsort(waits, wait_kinds, sizeof(Total), by_time);
  fprintf(stderr, "kprof: idle before: %8s %10s %9s  %s\n", "gaps", "total ms", "avg us", "kernel");
  for (size_t t = 0; t < wait_kinds && t < n / 2; t++)
    fprintf(stderr, "kprof: idle before: %8zu %10.2f %9.2f  %.150s\n", waits[t].calls, waits[t].ns / 1e6,
            waits[t].ns / 1e3 / waits[t].calls, waits[t].name);
  // What runs right after each memset (the launch that asked for it is its neighbour on the stream).
  Total *after = calloc(count - first, sizeof(Total));
  size_t after_kinds = 0;
  for (size_t i = first; i + 1 < count; i++) {
    if (strncmp(records[i].name, "[memset", 7)) continue;
    char *pair = malloc(256);
    snprintf(pair, 256, "%s -> %.200s", records[i].name, records[i + 1].name);
    size_t before = after_kinds;
    tally(after, &after_kinds, pair, records[i].end - records[i].start);
    if (after_kinds == before) free(pair);
  }
  qsort(after, after_kinds, sizeof(Total), by_time);
  for (size_t t = 0; t < after_kinds && t < n / 2; t++)
    fprintf(stderr, "kprof: memset then: %8zu  %.230s\n", after[t].calls, after[t].name);
  // The host's driver calls in the same window.
  Total *calls = calloc(host.count + 1, sizeof(Total));
  size_t call_kinds = 0;
  for (size_t i = 0; i < host.count; i++)
    if (host.at[i].start >= from) tally(calls, &call_kinds, host.at[i].name, host.at[i].end - host.at[i].start);
  qsort(calls, call_kinds, sizeof(Total), by_time);
  fprintf(stderr, "kprof: host call: %8s %10s %9s  %s\n", "calls", "total ms", "avg us", "driver function");
  for (size_t t = 0; t < call_kinds && t < n / 2; t++)
    fprintf(stderr, "kprof: host call: %8zu %10.2f %9.2f  %s\n", calls[t].calls, calls[t].ns / 1e6,
            calls[t].ns / 1e3 / calls[t].calls, calls[t].name);
}

int InitializeInjection(void) {
  cuptiActivityRegisterCallbacks(requested, completed);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER);
  atexit(report);
  return 1;
}
