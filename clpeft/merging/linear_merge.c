/* One-pass linear merge on the CPU (clpeft/merging/fused_cpu.py builds and calls this file).
 *
 * Task arithmetic and the mean give theta_0 + sum_k c_k (theta_k - theta_0) (Ilharco et al.,
 * ICLR 2023, Section 2). Formed with ATen ops, each cached block of a tensor takes about ten
 * passes (conversions, subtractions, norms, a matrix-vector product, the add); here main memory
 * sees each input entry once and the output once: a chunk of the tensor at a time (512 KiB of
 * each input), the models one after the other over it (one input stream at a time, which the
 * hardware prefetcher follows even through the scattered 4 KiB pages of memory-mapped files;
 * reading all K + 1 streams at once ran up to 2x slower there), the running delta kept in a
 * float32 row, the base copied into another by the first model's pass (in its own dtype: bf16 /
 * fp16 rows are half as many bytes to read again; reading the base from its checkpoint for every
 * model ran bf16 up to 1.8x slower on the file mappings of whole checkpoints whose page cache is
 * in 2 MiB folios, though not on anonymous memory nor on 4 KiB-page files: two streams at equal
 * offsets of physically contiguous pages, likely conflicting in a cache or DRAM bank; two models
 * per pass, tried, was 1.5x slower there and gained nothing in whole merges of anonymous tensors),
 * bf16 / fp16 entries converted in registers, the output written past the caches, the report's
 * statistics taken on the way (its sign conflict on a sample of the chunk, whose lines are asked for
 * before the chunk's passes and read after them).
 *
 * Arithmetic (what keeps the result equal to clpeft's ATen path, blocks.combine_linear, on any
 * machine): every operation is an IEEE float32 operation rounded on its own (compiled with
 * -ffp-contract=off: no fused multiply-adds), in this order
 *     tau_k = float(theta_k) - float(theta_0)
 *     delta = c_1 tau_1; delta = delta + c_k tau_k for k = 2..K
 *     merged = round_to_output(float(theta_0) + delta)
 * bf16 and fp16 entries widen exactly; the output rounds to nearest, ties to even. The sums of
 * squares and the non-zero count are float32 within 16,384 entries and float64 across them
 * (statistics for the report; their last bits depend on the vector width and on FMA). bf16
 * outputs round without NaN masks, and a chunk whose base or delta is not finite is written
 * again with them.
 *
 * Written with GCC / Clang vector extensions (8 float32 lanes), so it compiles for any target
 * those compilers support; F16C converts fp16 where the CPU has it.
 *
 * The same library holds the loops of methods that need whole task vectors (each with the ATen
 * path's bits or exact counts): a task vector and its norm formed in one pass (clpeft_subtract),
 * TIES' trim threshold per tensor (clpeft_kth_largest_magnitude, a bracketed radix selection) and
 * over the whole model (clpeft_count_magnitude_digits, one sweep of it), TIES' election and
 * disjoint merge with the trim fused in (clpeft_ties_elect), the merged tensor rounded to its
 * dtype with the report's sums (clpeft_finish), and the report's sampled sign conflict of a
 * linear merge (clpeft_sign_conflicts; clpeft_linear_merge counts it as it goes).
 */
#include <stdint.h>
#include <string.h>
#if defined(__F16C__) || defined(__FMA__)
#include <immintrin.h>
#endif

#define LANES 8
#define SEGMENT_BYTES (1 << 19) /* of one input per pass over a chunk: a stream long enough for the prefetchers */
#define SUM_BLOCK 16384 /* entries whose statistics add up in float32 (then in float64; a multiple of 2 LANES) */
#define ELECT_CHUNK 2048 /* entries per chunk of the sweeps from the inputs: the float32 row (8 KiB) stays in L1 */

enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1, DTYPE_FLOAT16 = 2 };

#if defined(__F16C__) || defined(__FLT16_MAX__)
#define HAVE_FLOAT16 1
#endif

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

/* ------------------------------------------------------------------ conversions */

/* Bytes per entry of dtype (DTYPE_*). */
static inline int64_t element_size(int dtype) {
    return dtype == DTYPE_FLOAT32 ? 4 : 2;
}

static inline float bits_to_float(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint32_t float_to_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

/* bf16 -> float32 is exact: the 16 bits become the high half of the float32. */
static inline float scalar_load(int dtype, const void *p, int64_t i) {
    if (dtype == DTYPE_FLOAT32) return ((const float *)p)[i];
    if (dtype == DTYPE_BFLOAT16) return bits_to_float((uint32_t)((const uint16_t *)p)[i] << 16);
#if defined(__FLT16_MAX__)
    return (float)((const _Float16 *)p)[i];
#elif defined(__F16C__)
    return _cvtsh_ss(((const uint16_t *)p)[i]);
#else
    return 0.f; /* not reached: clpeft_supports_dtype refuses fp16 */
#endif
}

/* float32 -> bf16, to nearest, ties to even; NaN stays a quiet NaN. */
static inline uint16_t round_to_bfloat16(float value) {
    const uint32_t x = float_to_bits(value);
    if (value != value) return (uint16_t)((x >> 16) | 0x0040u);
    return (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

static inline void scalar_store(int dtype, void *p, int64_t i, float value) {
    if (dtype == DTYPE_FLOAT32) ((float *)p)[i] = value;
    else if (dtype == DTYPE_BFLOAT16) ((uint16_t *)p)[i] = round_to_bfloat16(value);
#if defined(__FLT16_MAX__)
    else ((_Float16 *)p)[i] = (_Float16)value;
#elif defined(__F16C__)
    else ((uint16_t *)p)[i] = _cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT);
#endif
}

/* Sixteen entries as two vectors. bf16 entries go to the lanes in the order in-lane unpacking
 * gives (an AVX2 / NEON zip without a cross-lane shuffle); pair_store puts them back in the
 * same order, and all arithmetic is lane by lane, so the order never shows. */
static inline void pair_load(int dtype, const void *p, int64_t i, f32x8 v[2]) {
    if (dtype == DTYPE_FLOAT32) {
        for (int h = 0; h < 2; h++) memcpy(&v[h], (const float *)p + i + LANES * h, sizeof v[h]);
    } else if (dtype == DTYPE_BFLOAT16) {
        u16x16 half;
        const u16x16 zero = {0};
        memcpy(&half, (const uint16_t *)p + i, sizeof half);
        v[0] = (f32x8)__builtin_shufflevector(zero, half, 0, 16, 1, 17, 2, 18, 3, 19, 8, 24, 9, 25, 10, 26, 11, 27);
        v[1] = (f32x8)__builtin_shufflevector(zero, half, 4, 20, 5, 21, 6, 22, 7, 23, 12, 28, 13, 29, 14, 30, 15, 31);
    } else {
        for (int h = 0; h < 2; h++) {
#if defined(__F16C__)
            v[h] = (f32x8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i + LANES * h)));
#else
            for (int lane = 0; lane < LANES; lane++) v[h][lane] = scalar_load(dtype, p, i + LANES * h + lane);
#endif
        }
    }
}

/* Non-temporal stores (x86 with AVX): the line goes to memory without being read first, and
 * without evicting cached inputs. The address must be 32-byte aligned; an sfence after the loop. */
#if defined(__AVX__)
#define HAVE_STREAM 1
#define STREAM_STORE_32(p, v) _mm256_stream_si256((__m256i *)(p), (__m256i)(v))
#define STREAM_STORE_16(p, v) _mm_stream_si128((__m128i *)(p), (v))
#define STREAM_FENCE() _mm_sfence()
#else
#define HAVE_STREAM 0
#define STREAM_STORE_32(p, v) memcpy((p), &(v), 32)
#define STREAM_STORE_16(p, v) memcpy((p), &(v), 16)
#define STREAM_FENCE() ((void)0)
#endif

/* no_nan: the caller has ruled out NaN in v (the bf16 rounding then skips its NaN masks, which
 * would otherwise cost as much as the rounding itself; without them a NaN could round to an
 * infinity or a zero). stream: non-temporal stores (p + i 32-byte aligned). */
static inline void pair_store(int dtype, void *p, int64_t i, const f32x8 v[2], const int no_nan, const int stream) {
    if (dtype == DTYPE_FLOAT32) {
        for (int h = 0; h < 2; h++) {
            if (stream) STREAM_STORE_32((float *)p + i + LANES * h, v[h]);
            else memcpy((float *)p + i + LANES * h, &v[h], sizeof v[h]);
        }
    } else if (dtype == DTYPE_BFLOAT16) {
        u16x16 rounded[2];
        for (int h = 0; h < 2; h++) {
            const u32x8 x = (u32x8)v[h], to_nearest_even = x + 0x7FFFu + ((x >> 16) & 1u);
            if (no_nan) {
                rounded[h] = (u16x16)to_nearest_even;
            } else {
                const u32x8 nan = (u32x8)(v[h] != v[h]);
                rounded[h] = (u16x16)((to_nearest_even & ~nan) | ((x | 0x00400000u) & nan));
            }
        }
        const u16x16 half = __builtin_shufflevector(rounded[0], rounded[1], 1, 3, 5, 7, 17, 19, 21, 23, 9, 11, 13, 15, 25, 27, 29, 31);
        if (stream) STREAM_STORE_32((uint16_t *)p + i, half);
        else memcpy((uint16_t *)p + i, &half, sizeof half);
    } else {
        for (int h = 0; h < 2; h++) {
#if defined(__F16C__)
            const __m128i rounded = _mm256_cvtps_ph((__m256)v[h], _MM_FROUND_TO_NEAREST_INT);
            if (stream) STREAM_STORE_16((uint16_t *)p + i + LANES * h, rounded);
            else _mm_storeu_si128((__m128i *)((uint16_t *)p + i + LANES * h), rounded);
#else
            for (int lane = 0; lane < LANES; lane++) scalar_store(dtype, p, i + LANES * h + lane, v[h][lane]);
#endif
        }
    }
}

/* A hint PREFETCH_BYTES ahead, one page: the hardware prefetcher stops at each 4 KiB page (memory-mapped
 * checkpoints are scattered pages) and this asks for the next page's lines while the current one is
 * read. 4 KiB ahead ran 1.07-1.18x faster than 1 KiB for every dtype (2 and 8 KiB: no better). */
#define PREFETCH_BYTES 4096
static inline void prefetch(int dtype, const void *p, int64_t i) {
    __builtin_prefetch((const char *)p + i * element_size(dtype) + PREFETCH_BYTES, 0, 0);
}

/* a + x * y for the report's statistics: fused where the CPU has FMA (one instruction instead of
 * two in the merge's busiest loop). The merge itself stays unfused. */
static inline f32x8 add_product(f32x8 a, f32x8 x, f32x8 y) {
#if defined(__FMA__)
    return (f32x8)_mm256_fmadd_ps((__m256)x, (__m256)y, (__m256)a);
#else
    return a + x * y;
#endif
}

static inline float horizontal_sum(f32x8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* ------------------------------------------------------------------ the merge */

/* Model theta_k over entries [start, start + m) of a chunk (m <= SUM_BLOCK): its task vector's sum
 * of squares (into *acc) and delta, started when FIRST and continued from d otherwise. The FIRST
 * pass reads the base, copies it into the row b (float32 stays float32, bf16 / fp16 stay 16-bit:
 * half the bytes to read again, widened in registers) and adds its sum of squares to sums; the
 * others read b. When LAST, the merged values go to out (NO_NAN and stream: pair_store's) and the
 * delta's and non-zero sums to sums. DTYPE, FIRST, LAST and NO_NAN are constants in each inlined
 * copy. */
static inline __attribute__((always_inline)) void
merge_model(const int DTYPE, const int FIRST, const int LAST, const int NO_NAN, int stream, int64_t start, int64_t m,
            const void *base, void *restrict b, const void *theta_k, float c, float *restrict d, void *out,
            float *restrict acc, float *restrict sums) {
    f32x8 task_sq[2] = {{0}}, base_sq[2] = {{0}}, delta_sq[2] = {{0}};
    i32x8 nonzero[2] = {{0}};
    const int64_t size = element_size(DTYPE);
    int64_t i = 0;
    for (; i + 2 * LANES <= m; i += 2 * LANES) {
        const int64_t at = start + i;
        f32x8 theta0[2], theta[2], merged[2];
        prefetch(DTYPE, theta_k, at);
        if (FIRST) {
            prefetch(DTYPE, base, at);
            memcpy((char *)b + i * size, (const char *)base + at * size, 2 * LANES * size);
        }
        pair_load(DTYPE, b, i, theta0);
        if (FIRST)
            for (int h = 0; h < 2; h++) base_sq[h] = add_product(base_sq[h], theta0[h], theta0[h]);
        pair_load(DTYPE, theta_k, at, theta);
        for (int h = 0; h < 2; h++) {
            f32x8 *row = (f32x8 *)(d + i + LANES * h);
            const f32x8 t = theta[h] - theta0[h];
            task_sq[h] = add_product(task_sq[h], t, t);
            const f32x8 delta = FIRST ? c * t : *row + c * t;
            if (LAST) {
                delta_sq[h] = add_product(delta_sq[h], delta, delta);
                nonzero[h] -= (i32x8)(delta != 0.f);
                merged[h] = theta0[h] + delta;
            } else {
                *row = delta;
            }
        }
        if (LAST) pair_store(DTYPE, out, at, merged, NO_NAN, stream);
    }
    float tail[4] = {0.f, 0.f, 0.f, 0.f}; /* task, base, delta, non-zero */
    for (; i < m; i++) { /* the tensor's last entries (fewer than 2 LANES): the same operations */
        const int64_t at = start + i;
        if (FIRST) memcpy((char *)b + i * size, (const char *)base + at * size, size);
        const float theta0 = scalar_load(DTYPE, b, i);
        const float t = scalar_load(DTYPE, theta_k, at) - theta0;
        const float delta = FIRST ? c * t : d[i] + c * t;
        tail[0] += t * t;
        if (FIRST) tail[1] += theta0 * theta0;
        if (LAST) {
            tail[2] += delta * delta;
            tail[3] += delta != 0.f;
            scalar_store(DTYPE, out, at, theta0 + delta);
        } else {
            d[i] = delta;
        }
    }
    *acc += horizontal_sum(task_sq[0] + task_sq[1]) + tail[0];
    if (FIRST) sums[0] += horizontal_sum(base_sq[0] + base_sq[1]) + tail[1];
    if (LAST) {
        sums[1] += horizontal_sum(delta_sq[0] + delta_sq[1]) + tail[2];
        for (int lane = 0; lane < LANES; lane++) sums[2] += (float)(nonzero[0][lane] + nonzero[1][lane]);
        sums[2] += tail[3];
    }
}

#define MODEL_FUNCTION(NAME, DTYPE)                                                                                      \
    static void NAME(int first, int last, int no_nan, int stream, int64_t start, int64_t m, const void *base, void *b,     \
                     const void *theta_k, float c, float *d, void *out, float *acc, float *sums) {                        \
        if (first && last && no_nan) merge_model(DTYPE, 1, 1, 1, stream, start, m, base, b, theta_k, c, d, out, acc, sums); \
        else if (first && last) merge_model(DTYPE, 1, 1, 0, stream, start, m, base, b, theta_k, c, d, out, acc, sums);      \
        else if (first) merge_model(DTYPE, 1, 0, 1, stream, start, m, base, b, theta_k, c, d, out, acc, sums);              \
        else if (last && no_nan) merge_model(DTYPE, 0, 1, 1, stream, start, m, base, b, theta_k, c, d, out, acc, sums);     \
        else if (last) merge_model(DTYPE, 0, 1, 0, stream, start, m, base, b, theta_k, c, d, out, acc, sums);               \
        else merge_model(DTYPE, 0, 0, 1, stream, start, m, base, b, theta_k, c, d, out, acc, sums);                         \
    }

MODEL_FUNCTION(model_float32, DTYPE_FLOAT32)
MODEL_FUNCTION(model_bfloat16, DTYPE_BFLOAT16)
#if HAVE_FLOAT16
MODEL_FUNCTION(model_float16, DTYPE_FLOAT16)
#endif

/* MODEL_FUNCTION's copy for dtype (compiled in: clpeft_supports_dtype). */
static void merge_block(int dtype, int first, int last, int no_nan, int stream, int64_t start, int64_t m, const void *base, void *b,
                        const void *theta_k, float c, float *d, void *out, float *acc, float *sums) {
    if (dtype == DTYPE_FLOAT32) model_float32(first, last, no_nan, stream, start, m, base, b, theta_k, c, d, out, acc, sums);
    else if (dtype == DTYPE_BFLOAT16) model_bfloat16(first, last, no_nan, stream, start, m, base, b, theta_k, c, d, out, acc, sums);
#if HAVE_FLOAT16
    else model_float16(first, last, no_nan, stream, start, m, base, b, theta_k, c, d, out, acc, sums);
#endif
}

/* Model theta_k over entries [start, start + m) of a chunk, SUM_BLOCK entries per merge_model (its
 * float32 statistics then added in float64: model_sum and chunk_sums). b and d: the chunk's rows. */
static void merge_chunk(int dtype, int first, int last, int no_nan, int stream, int64_t start, int64_t m, const void *base, void *b,
                        const void *theta_k, float c, float *d, void *out, double *model_sum, double chunk_sums[3]) {
    for (int64_t i = 0; i < m; i += SUM_BLOCK) {
        float acc = 0.f, sums[3] = {0.f, 0.f, 0.f};
        merge_block(dtype, first, last, no_nan, stream, start + i, m - i < SUM_BLOCK ? m - i : SUM_BLOCK, base, (char *)b + i * element_size(dtype),
                    theta_k, c, d + i, out, &acc, sums);
        *model_sum += acc;
        for (int j = 0; j < 3; j++) chunk_sums[j] += sums[j];
    }
}

/* Whether dtype (DTYPE_*) is compiled in. */
int clpeft_supports_dtype(int dtype) {
#if HAVE_FLOAT16
    return dtype == DTYPE_FLOAT32 || dtype == DTYPE_BFLOAT16 || dtype == DTYPE_FLOAT16;
#else
    return dtype == DTYPE_FLOAT32 || dtype == DTYPE_BFLOAT16;
#endif
}

/* The report's sign conflict over entries [first, stop): how many have a positive and a negative task-vector
 * entry theta_k - theta_0 and no NaN among them (ATen's amax and amin propagate it); sixteen at a time in
 * vectors (the lane order of pair_load does not matter to a count), the last few one by one. */
static inline __attribute__((always_inline)) int64_t
conflicts_in(const int DTYPE, int k, const void *base, const void *const *sources, int64_t first, int64_t stop) {
    i32x8 counted = {0};
    int64_t i = first, conflicts = 0;
    for (; i + 2 * LANES <= stop; i += 2 * LANES) {
        f32x8 theta0[2], theta[2];
        i32x8 positive[2] = {{0}}, negative[2] = {{0}}, nan[2] = {{0}};
        pair_load(DTYPE, base, i, theta0);
        for (int j = 0; j < k; j++) {
            pair_load(DTYPE, sources[j], i, theta);
            for (int h = 0; h < 2; h++) {
                const f32x8 t = theta[h] - theta0[h];
                positive[h] |= (i32x8)(t > 0.f);
                negative[h] |= (i32x8)(t < 0.f);
                nan[h] |= (i32x8)(t != t);
            }
        }
        for (int h = 0; h < 2; h++) counted -= positive[h] & negative[h] & ~nan[h];
    }
    for (; i < stop; i++) {
        const float theta0 = scalar_load(DTYPE, base, i);
        int positive = 0, negative = 0, nan = 0;
        for (int j = 0; j < k; j++) {
            const float t = scalar_load(DTYPE, sources[j], i) - theta0;
            positive |= t > 0.f;
            negative |= t < 0.f;
            nan |= t != t;
        }
        conflicts += positive & negative & !nan;
    }
    for (int lane = 0; lane < LANES; lane++) conflicts += counted[lane];
    return conflicts;
}

static int64_t conflicts_between(int dtype, int k, const void *base, const void *const *sources, int64_t first, int64_t stop) {
    if (dtype == DTYPE_FLOAT32) return conflicts_in(DTYPE_FLOAT32, k, base, sources, first, stop);
    if (dtype == DTYPE_BFLOAT16) return conflicts_in(DTYPE_BFLOAT16, k, base, sources, first, stop);
#if HAVE_FLOAT16
    return conflicts_in(DTYPE_FLOAT16, k, base, sources, first, stop);
#else
    return 0; /* not reached: clpeft_supports_dtype refuses fp16 */
#endif
}

/* The sign conflicts of the sampled runs that start in the chunk [start, start + m) just merged, their
 * lines asked for before its passes (prefetch_chunk_sample; a pass of its own would wait for memory at
 * every run). The sample
 * (report.sample_runs): count runs of run entries, one every step runs of the whole tensor, whose
 * entry origin is this call's entry 0; every entry when count is 0. */
static int64_t chunk_conflicts(int dtype, int k, const void *base, const void *const *sources, int64_t start, int64_t m,
                               int64_t origin, int64_t run, int64_t count, int64_t step) {
    if (!count) return conflicts_between(dtype, k, base, sources, start, start + m);
    const int64_t spacing = step * run, stop = origin + start + m;
    int64_t conflicts = 0;
    for (int64_t r = (origin + start + spacing - 1) / spacing; r < count && r * spacing < stop; r++)
        conflicts += conflicts_between(dtype, k, base, sources, r * spacing - origin, r * spacing - origin + run);
    return conflicts;
}

/* Asks for every cache line that chunk_conflicts will read (the same arguments), into L2, before the
 * chunk's passes: the misses then overlap the passes instead of stalling the count after them (most
 * sampled lines are gone from the caches by then). Nothing when every entry is sampled. */
static void prefetch_chunk_sample(int dtype, int k, const void *base, const void *const *sources, int64_t start, int64_t m,
                                  int64_t origin, int64_t run, int64_t count, int64_t step) {
    if (!count) return;
    const int64_t spacing = step * run, stop = origin + start + m, size = element_size(dtype);
    for (int64_t r = (origin + start + spacing - 1) / spacing; r < count && r * spacing < stop; r++)
        for (int64_t byte = 0; byte < run * size; byte += 64) {
            const int64_t at = (r * spacing - origin) * size + byte;
            __builtin_prefetch((const char *)base + at, 0, 2);
            for (int j = 0; j < k; j++) __builtin_prefetch((const char *)sources[j] + at, 0, 2);
        }
}

/* float32 entries of scratch clpeft_linear_merge needs: a chunk's delta row (one float32 per entry) and its
 * base row (SEGMENT_BYTES), for bf16 / fp16, whose chunks have the most entries (SEGMENT_BYTES / 2). */
int64_t clpeft_linear_merge_scratch(void) {
    return SEGMENT_BYTES / 2 + SEGMENT_BYTES / 4;
}

/* out = base + sum_k coefficients[k] (sources[k] - base) over n entries, all of one dtype.
 * sums (3 + k float64, added to): [sum theta_0^2, sum tau_m^2, count(tau_m != 0),
 * sum tau_1^2, ..., sum tau_k^2]; conflicts (added to): the sign conflicts of the sample
 * (origin, run, count, step: chunk_conflicts) among these n entries. scratch: clpeft_linear_merge_scratch()
 * float32 entries, 32-byte aligned (the caller's, reused across calls). A chunk holds SEGMENT_BYTES of
 * each input: short segments restart the prefetchers too often (512 KiB segments ran 1.2-1.4x faster
 * than 64 KiB ones that kept the delta row in L2). An output of a chunk or more on a 32-byte boundary is
 * written with non-temporal stores (never read for ownership, nor kept in cache). Returns 0, or 1 for a dtype
 * not compiled in. */
int clpeft_linear_merge(int dtype, int64_t n, int k, const void *base, const void *const *sources,
                        const float *coefficients, void *out, double *sums, int64_t origin, int64_t run,
                        int64_t count, int64_t step, int64_t *conflicts, float *scratch) {
    if (!clpeft_supports_dtype(dtype) || k < 1) return 1;
    const int64_t chunk = SEGMENT_BYTES / element_size(dtype);
    float *d = scratch; /* the running delta of a chunk */
    void *b = scratch + chunk; /* the chunk's base, in its dtype, read once per chunk */
    const int stream = HAVE_STREAM && (uintptr_t)out % 32 == 0 && n >= chunk; /* a small output stays in cache for its reader */
    for (int64_t start = 0; start < n; start += chunk) {
        const int64_t m = n - start < chunk ? n - start : chunk;
        double chunk_sums[3] = {0.0, 0.0, 0.0};
        prefetch_chunk_sample(dtype, k, base, sources, start, m, origin, run, count, step);
        for (int j = 0; j < k; j++)
            merge_chunk(dtype, j == 0, j == k - 1, 1, stream, start, m, base, b, sources[j], coefficients[j], d, out, &sums[3 + j], chunk_sums);
        /* A NaN among the merged values needs a NaN in the base or the delta, hence a sum of squares
         * that is not finite: such a chunk's output is written again with the NaN masks. */
        if (dtype == DTYPE_BFLOAT16 && !(__builtin_isfinite(chunk_sums[0]) && __builtin_isfinite(chunk_sums[1]))) {
            double unused_sum = 0.0, unused_sums[3] = {0.0, 0.0, 0.0};
            merge_chunk(dtype, k == 1, 1, 0, stream, start, m, base, b, sources[k - 1], coefficients[k - 1], d, out, &unused_sum, unused_sums);
        }
        for (int j = 0; j < 3; j++) sums[j] += chunk_sums[j];
        *conflicts += chunk_conflicts(dtype, k, base, sources, start, m, origin, run, count, step);
    }
    if (stream) STREAM_FENCE();
    return 0;
}

/* The report's sign conflict from a sample of the task vectors theta_k - theta_0 over n entries
 * (report.sample_runs' layout: count runs of run entries, one every step runs; every entry when
 * count is 0): how many sampled entries have a positive and a negative task-vector entry, in the
 * float32 of ATen's report.sign_conflict. An entry with a NaN among its differences does not count
 * (ATen's amax and amin propagate it). Returns -1 for a dtype this build lacks. */
int64_t clpeft_sign_conflicts(int dtype, int64_t n, int k, const void *base, const void *const *sources, int64_t run,
                              int64_t count, int64_t step) {
    if (!clpeft_supports_dtype(dtype)) return -1;
    return chunk_conflicts(dtype, k, base, sources, 0, n, 0, run, count, step);
}

/* ------------------------------------------------------------------ task vectors */

/* Sixteen float32 entries in natural order <-> the lane order pair_load gives bf16 entries
 * (0-3, 8-11 | 4-7, 12-15): swapping the middle quarters, its own inverse. */
static inline void swap_middle_quarters(f32x8 v[2]) {
    const f32x8 lo = __builtin_shufflevector(v[0], v[1], 0, 1, 2, 3, 8, 9, 10, 11);
    const f32x8 hi = __builtin_shufflevector(v[0], v[1], 4, 5, 6, 7, 12, 13, 14, 15);
    v[0] = lo;
    v[1] = hi;
}

/* out = float(source) - base over n entries (source in dtype, base and out float32): a task
 * vector formed in one pass, the conversion exact and the subtraction rounded once, as ATen's
 * copy_ then sub_ (blocks.subtract_rows). When squares is given, the task vector's sum of squares
 * is added to it (float32 within a SUM_BLOCK, float64 across: the report's norm). Returns -1 for a
 * dtype this build lacks. */
int clpeft_subtract(int dtype, int64_t n, const void *source, const float *base, float *out, double *squares) {
    if (!clpeft_supports_dtype(dtype)) return -1;
    for (int64_t start = 0; start < n; start += SUM_BLOCK) {
        const int64_t stop = n - start < SUM_BLOCK ? n : start + SUM_BLOCK;
        f32x8 square[2] = {{0}};
        float tail = 0.f;
        int64_t i = start;
        for (; i + 2 * LANES <= stop; i += 2 * LANES) {
            f32x8 x[2], b[2];
            pair_load(dtype, source, i, x);
            pair_load(DTYPE_FLOAT32, base, i, b);
            if (dtype == DTYPE_BFLOAT16) swap_middle_quarters(b); /* into x's unpacking order */
            f32x8 d[2] = {x[0] - b[0], x[1] - b[1]};
            square[0] += d[0] * d[0];
            square[1] += d[1] * d[1];
            if (dtype == DTYPE_BFLOAT16) swap_middle_quarters(d); /* and back */
            pair_store(DTYPE_FLOAT32, out, i, d, 0, 0);
        }
        for (; i < stop; i++) {
            out[i] = scalar_load(dtype, source, i) - base[i];
            tail += out[i] * out[i];
        }
        if (squares) *squares += horizontal_sum(square[0] + square[1]) + tail;
    }
    return 0;
}

/* ------------------------------------------------------------------ the merged tensor */

/* Entries [start, stop) of clpeft_finish for one DTYPE (a constant in each inlined copy). */
static inline __attribute__((always_inline)) void
finish_range(const int DTYPE, int64_t start, int64_t stop, const float *base, const float *delta, void *out, double *sums) {
    f32x8 base_sq[2] = {{0}}, delta_sq[2] = {{0}};
    i32x8 nonzero[2] = {{0}};
    float tail[3] = {0.f, 0.f, 0.f};
    int64_t i = start;
    for (; i + 2 * LANES <= stop; i += 2 * LANES) {
        f32x8 theta0[2], d[2], merged[2];
        pair_load(DTYPE_FLOAT32, base, i, theta0);
        pair_load(DTYPE_FLOAT32, delta, i, d);
        for (int h = 0; h < 2; h++) {
            base_sq[h] += theta0[h] * theta0[h];
            delta_sq[h] += d[h] * d[h];
            nonzero[h] -= (i32x8)(d[h] != 0.f);
            merged[h] = theta0[h] + d[h];
        }
        if (DTYPE == DTYPE_BFLOAT16) swap_middle_quarters(merged); /* into the order pair_store takes */
        pair_store(DTYPE, out, i, merged, 0, 0);
    }
    for (; i < stop; i++) {
        tail[0] += base[i] * base[i];
        tail[1] += delta[i] * delta[i];
        tail[2] += delta[i] != 0.f;
        scalar_store(DTYPE, out, i, base[i] + delta[i]);
    }
    sums[0] += horizontal_sum(base_sq[0] + base_sq[1]) + tail[0];
    sums[1] += horizontal_sum(delta_sq[0] + delta_sq[1]) + tail[1];
    for (int lane = 0; lane < LANES; lane++) sums[2] += nonzero[0][lane] + nonzero[1][lane];
    sums[2] += tail[2];
}

/* out = round_to_output(base + delta) over n entries (base and delta float32, out in dtype): the
 * last step of every merge that forms a whole delta (the engine's tau_m), one float32 add rounded
 * as ATen's add then copy_ round it. sums (3 float64, added to): [sum theta_0^2, sum delta^2,
 * count(delta != 0)] (NaN counts as non-zero, as torch.count_nonzero), float32 within a SUM_BLOCK.
 * Returns -1 for a dtype this build lacks. */
int clpeft_finish(int dtype, int64_t n, const float *base, const float *delta, void *out, double *sums) {
    if (!clpeft_supports_dtype(dtype)) return -1;
    for (int64_t start = 0; start < n; start += SUM_BLOCK) {
        const int64_t stop = n - start < SUM_BLOCK ? n : start + SUM_BLOCK;
        if (dtype == DTYPE_FLOAT32) finish_range(DTYPE_FLOAT32, start, stop, base, delta, out, sums);
        else if (dtype == DTYPE_BFLOAT16) finish_range(DTYPE_BFLOAT16, start, stop, base, delta, out, sums);
#if HAVE_FLOAT16
        else finish_range(DTYPE_FLOAT16, start, stop, base, delta, out, sums);
#endif
    }
    return 0;
}

/* ------------------------------------------------------------------ TIES' cut-off */

/* One sweep of a radix selection on magnitudes (TIES' trim over the whole model,
 * clpeft/merging/methods/model_trim.py, and clpeft_kth_largest_magnitude below): among the
 * float32 magnitudes |values[i]| whose bits above bit shift + 16 equal prefix, count each 16-bit
 * digit (bits shift .. shift + 15) into counts[digit]; the others are not counted. shift is 16
 * (the first sweep: every entry, prefix 0) or 0. Integer counts, so the same as any order of
 * counting. */
void clpeft_count_magnitude_digits(const float *values, int64_t n, int shift, uint32_t prefix, int64_t *counts) {
    const uint32_t *bits = (const uint32_t *)values;
    if (shift == 16) {
        for (int64_t i = 0; i < n; i++) counts[(bits[i] & 0x7FFFFFFFu) >> 16]++;
        return;
    }
    const u32x8 wanted = (u32x8){0} + prefix; /* few entries share the prefix: test eight at a time */
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        u32x8 keys;
        memcpy(&keys, bits + i, sizeof keys);
        keys &= 0x7FFFFFFFu;
        const u32x8 hit = (u32x8)((keys >> 16) == wanted);
        uint64_t any[4];
        memcpy(any, &hit, sizeof any);
        if ((any[0] | any[1] | any[2] | any[3]) == 0) continue;
        for (int lane = 0; lane < LANES; lane++)
            if (hit[lane]) counts[keys[lane] & 0xFFFFu]++;
    }
    for (; i < n; i++) {
        const uint32_t key = bits[i] & 0x7FFFFFFFu;
        if ((key >> 16) == prefix) counts[key & 0xFFFFu]++;
    }
}

/* visit(row, m, context) over the task vector float(source) - base (source in dtype, base
 * float32), formed ELECT_CHUNK entries at a time in a cached row instead of in memory
 * (clpeft_subtract's values): one read of each input, nothing written. The sweeps of the
 * model-scope trim run on it. Returns -1 for a dtype this build lacks. */
static int each_difference_chunk(int dtype, int64_t n, const void *source, const float *base,
                                 void (*visit)(const float *row, int64_t m, void *context), void *context) {
    if (!clpeft_supports_dtype(dtype)) return -1;
    float row[ELECT_CHUNK] __attribute__((aligned(32)));
    const int64_t size = element_size(dtype);
    for (int64_t start = 0; start < n; start += ELECT_CHUNK) {
        const int64_t m = n - start < ELECT_CHUNK ? n - start : ELECT_CHUNK;
        clpeft_subtract(dtype, m, (const char *)source + start * size, base + start, row, NULL);
        visit(row, m, context);
    }
    return 0;
}

struct digit_count {
    int shift;
    uint32_t prefix;
    int64_t *counts;
};

static void count_digits_of(const float *row, int64_t m, void *context) {
    const struct digit_count *c = context;
    clpeft_count_magnitude_digits(row, m, c->shift, c->prefix, c->counts);
}

/* clpeft_count_magnitude_digits of the task vector float(source) - base, never formed (each_difference_chunk):
 * the same counts as forming it first. Returns -1 for a dtype this build lacks. */
int clpeft_count_difference_digits(int dtype, int64_t n, const void *source, const float *base, int shift, uint32_t prefix, int64_t *counts) {
    struct digit_count context = {shift, prefix, counts};
    return each_difference_chunk(dtype, n, source, base, count_digits_of, &context);
}

/* The k-th largest |values[i]| (1 <= k <= n), exactly: a magnitude's bits (sign cleared) order
 * like the magnitudes, so a radix selection on the high 15 bits, then on the low 16 bits inside
 * the chosen bucket, finds the k-th largest bit pattern in two read-only passes. counts: 2^15 +
 * 2^16 int64 of scratch. */
static float radix_kth_largest_magnitude(const float *values, int64_t n, int64_t k, int64_t *counts) {
    int64_t *high = counts, *low = counts + (1 << 15);
    memset(counts, 0, ((1 << 15) + (1 << 16)) * sizeof *counts);
    clpeft_count_magnitude_digits(values, n, 16, 0, high);
    int64_t above = 0; /* entries in higher buckets */
    int bucket = (1 << 15) - 1;
    while (above + high[bucket] < k) above += high[bucket--];
    clpeft_count_magnitude_digits(values, n, 0, (uint32_t)bucket, low);
    int offset = (1 << 16) - 1;
    while (above + low[offset] < k) above += low[offset--];
    return bits_to_float(((uint32_t)bucket << 16) | (uint32_t)offset);
}

#define BRACKET_SAMPLE 16384 /* the fewest entries sampled to bracket the k-th largest magnitude */
#define SAMPLE_RUN 16 /* consecutive entries per sampled run (a strided entry each was a TLB miss each) */
#define BRACKET_BLOCK (1 << 24) /* entries whose count above the bracket is kept in int32 lanes */

/* Over n float32 values, by magnitude bit patterns (sign cleared): into tally, how many lie above
 * upper, at upper and at lower; the magnitudes strictly between lower and upper copied into band
 * while they fit in capacity. Returns how many lie strictly between (more than capacity: band
 * holds only some). Ties at the bracket's ends are counted, not copied: half-precision task
 * vectors take few distinct values, and the k-th largest is often one of many equal ones. */
static int64_t band_magnitudes(const float *values, int64_t n, uint32_t lower, uint32_t upper, float *band, int64_t capacity, int64_t tally[3]) {
    const uint32_t *bits = (const uint32_t *)values;
    const i32x8 low = (i32x8){0} + (int32_t)lower, high = (i32x8){0} + (int32_t)upper; /* < 2^31: signed compares */
    int64_t found = 0, i = 0;
    tally[0] = tally[1] = tally[2] = 0;
    while (i + LANES <= n) {
        const int64_t stop = n - i < BRACKET_BLOCK ? n : i + BRACKET_BLOCK;
        i32x8 over = {0}, at_upper = {0}, at_lower = {0};
        for (; i + LANES <= stop; i += LANES) {
            i32x8 keys;
            memcpy(&keys, bits + i, sizeof keys);
            keys &= 0x7FFFFFFF;
            const i32x8 inside = (keys > low) & (keys < high);
            over -= keys > high;
            at_upper -= keys == high;
            at_lower -= keys == low;
            uint64_t any[4];
            memcpy(any, &inside, sizeof any);
            if ((any[0] | any[1] | any[2] | any[3]) == 0) continue; /* most vectors: none strictly inside */
            if (found + LANES > capacity) { /* too many to keep: count them (the caller falls back) */
                for (int lane = 0; lane < LANES; lane++) found -= inside[lane];
                continue;
            }
            for (int lane = 0; lane < LANES; lane++) { /* written always, kept when inside: no branch to miss */
                band[found] = bits_to_float((uint32_t)keys[lane]);
                found -= inside[lane];
            }
        }
        for (int lane = 0; lane < LANES; lane++) {
            tally[0] += over[lane];
            tally[1] += at_upper[lane];
            tally[2] += at_lower[lane];
        }
    }
    for (; i < n; i++) {
        const uint32_t key = bits[i] & 0x7FFFFFFFu;
        tally[0] += key > upper;
        tally[1] += key == upper;
        tally[2] += key == lower;
        if (key > lower && key < upper) {
            if (found < capacity) band[found] = bits_to_float(key);
            found++;
        }
    }
    return found;
}

/* band_magnitudes over a whole model, one tensor at a time (the whole-model trim's bracket,
 * clpeft/merging/methods/model_trim.py): the counts are added to tally[0..2] and the magnitudes
 * strictly inside the bracket appended to band from band[*found], while they fit in capacity;
 * *found counts them all. clpeft_band_magnitudes takes formed values; clpeft_band_differences the
 * task vector float(source) - base, never formed (each_difference_chunk; -1 for a dtype this build
 * lacks). */
void clpeft_band_magnitudes(const float *values, int64_t n, uint32_t lower, uint32_t upper, float *band, int64_t capacity, int64_t *found,
                            int64_t *tally) {
    int64_t counted[3];
    const int64_t room = capacity > *found ? capacity - *found : 0;
    *found += band_magnitudes(values, n, lower, upper, band + (room ? *found : 0), room, counted);
    for (int j = 0; j < 3; j++) tally[j] += counted[j];
}

struct band_sweep {
    uint32_t lower, upper;
    float *band;
    int64_t capacity, *found, *tally;
};

static void band_of(const float *row, int64_t m, void *context) {
    const struct band_sweep *b = context;
    clpeft_band_magnitudes(row, m, b->lower, b->upper, b->band, b->capacity, b->found, b->tally);
}

int clpeft_band_differences(int dtype, int64_t n, const void *source, const float *base, uint32_t lower, uint32_t upper, float *band,
                            int64_t capacity, int64_t *found, int64_t *tally) {
    struct band_sweep context = {lower, upper, band, capacity, found, tally};
    return each_difference_chunk(dtype, n, source, base, band_of, &context);
}

/* The k-th largest |values[i]| (1 <= k <= n) of finite float32 values, exactly (TIES' trim
 * threshold, Yadav et al., NeurIPS 2023, Algorithm 1, "Trim"). A large tensor is first bracketed
 * (Floyd and Rivest's selection, CACM 1975): a sample of n / 512 magnitudes (16,384 to 2^20, in evenly
 * spaced runs of 16) gives
 * bounds six standard deviations either side of the answer's expected rank, one read-only pass
 * counts the magnitudes above the bracket and at its ends and copies those inside it into band,
 * and the answer is an end of the bracket or the radix selection's on the band alone; when the answer falls outside the bracket (or the band
 * exceeds capacity) the radix selection runs on the whole tensor: the same value either way, the
 * sample changes only the time. counts: 2^15 + 2^16 int64 of scratch, band:
 * capacity float32 (at least the sample's size for the bracket to be tried); both owned by the
 * caller (reused: fresh pages for every call cost more than the counting). Returns -1 (as a
 * float) if k is out of range. */
float clpeft_kth_largest_magnitude(const float *values, int64_t n, int64_t k, int64_t *counts, float *band, int64_t capacity) {
    if (k < 1 || k > n) return -1.f;
    int64_t m = n / 512; /* a larger sample for a larger tensor: the band is ~12 sqrt(q (1 - q) / m) of it */
    m = m < BRACKET_SAMPLE ? BRACKET_SAMPLE : m > (1 << 20) ? (1 << 20) : m;
    if (n < 32 * BRACKET_SAMPLE || capacity < m) return radix_kth_largest_magnitude(values, n, k, counts);
    const int64_t stride = n / (m / SAMPLE_RUN) / SAMPLE_RUN * SAMPLE_RUN; /* runs of SAMPLE_RUN entries: one cache line each */
    for (int64_t j = 0; j < m; j++) band[j] = bits_to_float(float_to_bits(values[j / SAMPLE_RUN * stride + j % SAMPLE_RUN]) & 0x7FFFFFFFu);
    /* the bracket of sparsify.bracket_ranks (its Python twin, for the ATen and whole-model selections) */
    const double expected = (double)k * m / n, margin = 6.0 * __builtin_sqrt(expected * (1.0 - (double)k / n)) + 2.0;
    const int64_t upper_rank = (int64_t)(expected - margin), lower_rank = (int64_t)(expected + margin); /* 0-based */
    const uint32_t upper = upper_rank >= 0 ? float_to_bits(radix_kth_largest_magnitude(band, m, upper_rank + 1, counts)) : 0x7FFFFFFFu;
    const uint32_t lower = lower_rank < m ? float_to_bits(radix_kth_largest_magnitude(band, m, lower_rank + 1, counts)) : 0u;
    int64_t tally[3]; /* above upper, at upper, at lower */
    const int64_t found = band_magnitudes(values, n, lower, upper, band, capacity, tally);
    int64_t rank = k - tally[0]; /* the answer's rank from the top of the bracket */
    if (rank >= 1) {
        if (rank <= tally[1]) return bits_to_float(upper);
        rank -= tally[1];
        if (rank <= found && found <= capacity) return radix_kth_largest_magnitude(band, found, rank, counts);
        rank -= found;
        if (lower != upper && rank <= tally[2]) return bits_to_float(lower);
    }
    return radix_kth_largest_magnitude(values, n, k, counts); /* outside the bracket: select over all */
}

/* ------------------------------------------------------------------ TIES' election */


/* Eight entries of a row from entry i of m (lanes past m read as 0). */
static inline f32x8 row_load(const float *row, int64_t i, int64_t m) {
    f32x8 v = {0};
    memcpy(&v, row + i, (size_t)(i + LANES <= m ? LANES : m - i) * sizeof(float));
    return v;
}

/* The entries TIES' trim keeps: those with |x| > lambda, as torch.hardshrink(x, lambda) (zeros
 * become +0, NaN stays); lambda < 0 keeps every entry as it is. */
static inline f32x8 trimmed(f32x8 x, float lambda) {
    if (lambda < 0.f) return x;
    const f32x8 magnitude = (f32x8)((u32x8)x & 0x7FFFFFFFu);
    return (f32x8)((i32x8)x & ~(i32x8)(magnitude <= lambda));
}

/* The sign TIES elects from a column total: +1 where total >= 0 (zero mass included), else -1. */
static inline f32x8 elected_sign(f32x8 total) {
    const i32x8 positive = (i32x8)(total >= 0.f);
    return (f32x8)((positive & (i32x8)((f32x8){0} + 1.f)) | (~positive & (i32x8)((f32x8){0} - 1.f)));
}

/* Eight columns (entries i .. i + 7 of every row, those at or past m read as 0) of the election,
 * the merged values, the division by the count included when mean is set. */
static inline __attribute__((always_inline)) f32x8 elect_columns(int k, const float *const *rows, int64_t i, int64_t m, const float *lambdas,
                                  const float *coefficients, int mean) {
    const f32x8 one = (f32x8){0} + 1.f;
    f32x8 total = trimmed(row_load(rows[0], i, m), lambdas ? lambdas[0] : -1.f);
    for (int t = 1; t < k; t++) total = total + trimmed(row_load(rows[t], i, m), lambdas ? lambdas[t] : -1.f);
    const f32x8 s = elected_sign(total);
    f32x8 merged = {0}, counted = {0};
    for (int t = 0; t < k; t++) { /* the rows are in L1: read again rather than kept */
        f32x8 a = trimmed(row_load(rows[t], i, m), lambdas ? lambdas[t] : -1.f) * s;
        a = (f32x8)((i32x8)a & ~(i32x8)(a < 0.f));
        const f32x8 value = coefficients[t] * a;
        merged = t == 0 ? value : merged + value;
        counted = counted + (f32x8)((i32x8)(a > 0.f) & (i32x8)one);
    }
    merged = merged * s;
    return mean ? merged / (counted + (f32x8)((i32x8)(counted == 0.f) & (i32x8)one)) : merged;
}

/* TIES' election and disjoint merge of K float32 rows of n entries (Yadav et al., NeurIPS 2023,
 * Algorithm 1, "Elect" and "Disjoint Merge"; clpeft/merging/methods/generalized.py), with the
 * trim of each row fused in when lambdas is given (row t keeps |x| > lambdas[t]). Per entry, as
 * generalized._elect, every operation a float32 operation rounded on its own:
 *     total = x_1 + x_2 + ... + x_K (in order);  s = total >= 0 ? 1 : -1
 *     a_k = max(s x_k, 0) (torch.clamp: -0 and NaN stay);  m = c_1 a_1 + c_2 a_2 + ... (in order)
 *     out = m s, divided by max(#{k : a_k > 0}, 1) when mean is set.
 * Eight columns at a time with every row's entries in registers (the K + 1 streams read once
 * each); out may be rows[0] (each column is written after it is read). */
void clpeft_ties_elect(int64_t n, int k, const float *const *rows, const float *lambdas, const float *coefficients, int mean, float *out) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const f32x8 merged = elect_columns(k, rows, i, i + LANES, lambdas, coefficients, mean); /* whole loads */
        memcpy(out + i, &merged, sizeof merged);
    }
    if (i < n) {
        const f32x8 merged = elect_columns(k, rows, i, n, lambdas, coefficients, mean);
        memcpy(out + i, &merged, (size_t)(n - i) * sizeof(float));
    }
}
