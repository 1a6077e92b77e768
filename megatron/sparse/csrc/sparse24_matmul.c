/*
 * 2:4-sparse weight x dense activation matmul on the CPU: y[b, r] = sum_k x[b, k] * W[r, k] (+
 * bias[r]) for a weight stored compressed (megatron/sparse/inference/format.py):
 *
 *   values [rows][in / 2]          the two kept weights of each group of 4 input columns, in
 *                                  column order (float32 or bfloat16)
 *   meta   [rows][ceil(in / 8)]    uint8, one nibble per group (group 2j in the low nibble of
 *                                  byte j, group 2j + 1 in the high one); nibble = i0 | i1 << 2,
 *                                  i0 < i1 the kept positions within the group
 *
 * so the 32 bits at meta byte 4c hold the 16 two-bit positions of values 16c .. 16c + 15 in order
 * (value v at bits 2 (v - 16c)). With AVX-512, one 16-value chunk of a row spans 32 input columns:
 * its positions become a vpermt2ps index (base 4 * (v / 2) | position) that gathers the matching
 * activations out of two registers, then one FMA. Row blocks of ROWS_PER_BLOCK rows and batch
 * tiles of up to BATCH_TILE activation rows share every loaded weight and activation register; a
 * weight row block stays in L1 while the batch tiles pass over it. Accumulation is float32, x and
 * y are float32 [batch][in] and [batch][rows] (contiguous). Threads split the row blocks.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define ROWS_PER_BLOCK 4
#define BATCH_TILE 4

typedef struct {
    int64_t rows, in, batch;
    int threads;
} s24_params;

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline int position(const uint8_t *meta, int64_t value) {
    int64_t group = value >> 1;
    return (meta[group >> 1] >> (4 * (group & 1) + 2 * (value & 1))) & 3;
}

/* Scalar reference of one output (and the tail of a row past the last whole chunk). */
static inline float dot_tail(const void *values, int bf16, const uint8_t *meta, const float *x,
                             int64_t start, int64_t stop) {
    float acc = 0.f;
    for (int64_t v = start; v < stop; ++v) {
        float w = bf16 ? bf16_to_float(((const uint16_t *)values)[v]) : ((const float *)values)[v];
        acc += w * x[4 * (v >> 1) + position(meta, v)];
    }
    return acc;
}

#ifdef __AVX512F__
static inline __m512 load_values(const void *values, int bf16, int64_t v) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)values + v));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)values + v);
}

static inline __m512i chunk_index(const uint8_t *meta, int64_t chunk, __m512i shifts,
                                  __m512i base) {
    uint32_t bits;
    memcpy(&bits, meta + 4 * chunk, 4);
    __m512i pos = _mm512_srlv_epi32(_mm512_set1_epi32((int)bits), shifts);
    /* base | (pos & 3): ternary logic 0xF8 = A | (B & C) */
    return _mm512_ternarylogic_epi32(base, pos, _mm512_set1_epi32(3), 0xF8);
}

/* nr rows x nb batch rows of y; nr <= ROWS_PER_BLOCK, nb <= BATCH_TILE (constants at the call
 * sites, so the loops unroll and the accumulators stay in registers). */
static inline __attribute__((always_inline)) void block(
    const void *values, int bf16, const uint8_t *meta, const float *x, float *y,
    const float *bias, const s24_params *p, int64_t r0, int64_t b0, const int nr, const int nb) {
    const int64_t half = p->in / 2, mstride = (p->in / 4 + 1) / 2, chunks = p->in / 32;
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                             28, 30);
    const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28,
                                           28);
    __m512 acc[ROWS_PER_BLOCK][BATCH_TILE];
#pragma GCC unroll 4
    for (int i = 0; i < nr; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < nb; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
        __m512i idx[ROWS_PER_BLOCK];
        __m512 w[ROWS_PER_BLOCK];
#pragma GCC unroll 4
        for (int i = 0; i < nr; ++i) {
            idx[i] = chunk_index(meta + (r0 + i) * mstride, c, shifts, base);
            w[i] = load_values(values, bf16, (r0 + i) * half + 16 * c);
        }
#pragma GCC unroll 4
        for (int j = 0; j < nb; ++j) {
            const float *xr = x + (b0 + j) * p->in + 32 * c;
            __m512 lo = _mm512_loadu_ps(xr), hi = _mm512_loadu_ps(xr + 16);
#pragma GCC unroll 4
            for (int i = 0; i < nr; ++i)
                acc[i][j] = _mm512_fmadd_ps(w[i], _mm512_permutex2var_ps(lo, idx[i], hi),
                                            acc[i][j]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < nr; ++i) {
        const int64_t r = r0 + i;
        const void *row_values = bf16 ? (const void *)((const uint16_t *)values + r * half)
                                      : (const void *)((const float *)values + r * half);
#pragma GCC unroll 4
        for (int j = 0; j < nb; ++j) {
            float s = _mm512_reduce_add_ps(acc[i][j]) +
                      dot_tail(row_values, bf16, meta + r * mstride, x + (b0 + j) * p->in,
                               16 * chunks, half);
            y[(b0 + j) * p->rows + r] = s + (bias ? bias[r] : 0.f);
        }
    }
}

static inline __attribute__((always_inline)) void row_block(
    const void *values, int bf16, const uint8_t *meta, const float *x, float *y, const float *bias,
    const s24_params *p, int64_t r0) {
    const int full = r0 + ROWS_PER_BLOCK <= p->rows;
    int64_t b0 = 0;
    for (; b0 + BATCH_TILE <= p->batch; b0 += BATCH_TILE) {
        if (full)
            block(values, bf16, meta, x, y, bias, p, r0, b0, ROWS_PER_BLOCK, BATCH_TILE);
        else
            for (int64_t r = r0; r < p->rows; ++r)
                block(values, bf16, meta, x, y, bias, p, r, b0, 1, BATCH_TILE);
    }
    /* the last partial tile in one pass: each loaded weight still serves all its batch rows */
    switch (p->batch - b0) {
#define S24_TAIL(nb)                                                                            \
    case nb:                                                                                   \
        if (full)                                                                              \
            block(values, bf16, meta, x, y, bias, p, r0, b0, ROWS_PER_BLOCK, nb);              \
        else                                                                                   \
            for (int64_t r = r0; r < p->rows; ++r)                                             \
                block(values, bf16, meta, x, y, bias, p, r, b0, 1, nb);                        \
        break;
        S24_TAIL(1)
        S24_TAIL(2)
        S24_TAIL(3)
#undef S24_TAIL
    default:
        break;
    }
}
#else
static inline __attribute__((always_inline)) void row_block(
    const void *values, int bf16, const uint8_t *meta, const float *x, float *y, const float *bias,
    const s24_params *p, int64_t r0) {
    const int64_t half = p->in / 2, mstride = (p->in / 4 + 1) / 2;
    int64_t stop = r0 + ROWS_PER_BLOCK < p->rows ? r0 + ROWS_PER_BLOCK : p->rows;
    for (int64_t r = r0; r < stop; ++r) {
        const void *row_values = bf16 ? (const void *)((const uint16_t *)values + r * half)
                                      : (const void *)((const float *)values + r * half);
        for (int64_t b = 0; b < p->batch; ++b)
            y[b * p->rows + r] = dot_tail(row_values, bf16, meta + r * mstride, x + b * p->in, 0,
                                          half) + (bias ? bias[r] : 0.f);
    }
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
/* bf16 weights x bf16 activations: a 32-value chunk (64 input columns, 8 meta bytes) gathers its
 * activations with one vpermt2w and multiplies-adds pairs with one vdpbf16ps, whose float32 lane g
 * sums the two products of group g (products of bf16 numbers are exact in float32). */
static const uint16_t DP_SELECT[32] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                       2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
static const uint16_t DP_SHIFT[32] = {0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14,
                                      0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14};
static const uint16_t DP_BASE[32] = {0,  0,  4,  4,  8,  8,  12, 12, 16, 16, 20,
                                     20, 24, 24, 28, 28, 32, 32, 36, 36, 40, 40,
                                     44, 44, 48, 48, 52, 52, 56, 56, 60, 60};

static inline float dot_tail_bf16x(const uint16_t *values, const uint8_t *meta, const uint16_t *x,
                                   int64_t start, int64_t stop) {
    float acc = 0.f;
    for (int64_t v = start; v < stop; ++v)
        acc += bf16_to_float(values[v]) * bf16_to_float(x[4 * (v >> 1) + position(meta, v)]);
    return acc;
}

static inline __attribute__((always_inline)) void block_dp(
    const uint16_t *values, const uint8_t *meta, const uint16_t *x, float *y, const float *bias,
    const s24_params *p, int64_t r0, int64_t b0, const int nr, const int nb) {
    const int64_t half = p->in / 2, mstride = (p->in / 4 + 1) / 2, chunks = p->in / 64;
    const __m512i select = _mm512_loadu_si512(DP_SELECT), shifts = _mm512_loadu_si512(DP_SHIFT),
                  base = _mm512_loadu_si512(DP_BASE), three = _mm512_set1_epi16(3);
    __m512 acc[ROWS_PER_BLOCK][BATCH_TILE];
#pragma GCC unroll 4
    for (int i = 0; i < nr; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < nb; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
        __m512i idx[ROWS_PER_BLOCK], w[ROWS_PER_BLOCK];
#pragma GCC unroll 4
        for (int i = 0; i < nr; ++i) {
            int64_t bits;
            memcpy(&bits, meta + (r0 + i) * mstride + 8 * c, 8);
            __m512i words = _mm512_permutexvar_epi16(select, _mm512_set1_epi64(bits));
            idx[i] = _mm512_ternarylogic_epi32(base, _mm512_srlv_epi16(words, shifts), three,
                                               0xF8);
            w[i] = _mm512_loadu_si512(values + (r0 + i) * half + 32 * c);
        }
#pragma GCC unroll 4
        for (int j = 0; j < nb; ++j) {
            const uint16_t *xr = x + (b0 + j) * p->in + 64 * c;
            __m512i lo = _mm512_loadu_si512(xr), hi = _mm512_loadu_si512(xr + 32);
#pragma GCC unroll 4
            for (int i = 0; i < nr; ++i)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)w[i],
                                             (__m512bh)_mm512_permutex2var_epi16(lo, idx[i], hi));
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < nr; ++i) {
        const int64_t r = r0 + i;
#pragma GCC unroll 4
        for (int j = 0; j < nb; ++j) {
            float s = _mm512_reduce_add_ps(acc[i][j]) +
                      dot_tail_bf16x(values + r * half, meta + r * mstride, x + (b0 + j) * p->in,
                                     32 * chunks, half);
            y[(b0 + j) * p->rows + r] = s + (bias ? bias[r] : 0.f);
        }
    }
}

static inline __attribute__((always_inline)) void row_block_dp(
    const uint16_t *values, const uint8_t *meta, const uint16_t *x, float *y, const float *bias,
    const s24_params *p, int64_t r0) {
    const int full = r0 + ROWS_PER_BLOCK <= p->rows;
    int64_t b0 = 0;
#define S24_DP(nb)                                                                              \
    if (full)                                                                                  \
        block_dp(values, meta, x, y, bias, p, r0, b0, ROWS_PER_BLOCK, nb);                     \
    else                                                                                       \
        for (int64_t r = r0; r < p->rows; ++r) block_dp(values, meta, x, y, bias, p, r, b0, 1, nb);
    for (; b0 + BATCH_TILE <= p->batch; b0 += BATCH_TILE) {
        S24_DP(BATCH_TILE)
    }
    switch (p->batch - b0) {
    case 1:
        S24_DP(1) break;
    case 2:
        S24_DP(2) break;
    case 3:
        S24_DP(3) break;
    default:
        break;
    }
#undef S24_DP
}

/* x bf16 [batch][in]; only built where the CPU has AVX512_BF16 (s24_has_bf16_dot() says). */
void s24_matmul_bf16x(const uint16_t *values, const uint8_t *meta, const uint16_t *x, float *y,
                      const float *bias, const s24_params *p) {
    const int64_t blocks = (p->rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
#pragma omp parallel for num_threads(p->threads) schedule(static)
    for (int64_t k = 0; k < blocks; ++k)
        row_block_dp(values, meta, x, y, bias, p, k * ROWS_PER_BLOCK);
}

int s24_has_bf16_dot(void) { return 1; }
#else
void s24_matmul_bf16x(const uint16_t *values, const uint8_t *meta, const uint16_t *x, float *y,
                      const float *bias, const s24_params *p) {
    (void)values, (void)meta, (void)x, (void)y, (void)bias, (void)p;
}

int s24_has_bf16_dot(void) { return 0; }
#endif

/* One entry point per weight dtype, so the dtype is a constant inside each parallel region. */
#define S24_ENTRY(name, vtype, is_bf16)                                                         \
    void name(const vtype *values, const uint8_t *meta, const float *x, float *y,              \
              const float *bias, const s24_params *p) {                                        \
        const int64_t blocks = (p->rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;                \
        _Pragma("omp parallel for num_threads(p->threads) schedule(static)")                  \
        for (int64_t k = 0; k < blocks; ++k)                                                   \
            row_block(values, is_bf16, meta, x, y, bias, p, k * ROWS_PER_BLOCK);               \
    }

S24_ENTRY(s24_matmul_f32, float, 0)
S24_ENTRY(s24_matmul_bf16, uint16_t, 1)

int s24_simd_width(void) {
#ifdef __AVX512F__
    return 16;
#else
    return 1;
#endif
}
