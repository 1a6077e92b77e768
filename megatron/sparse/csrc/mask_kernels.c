/*
 * Fused CPU kernels of the 2:4 Gumbel-softmax training mask (float32, contiguous tensors).
 *
 * One pass per call over a layer: draw the counter-based Gumbel noise, softmax the 6 candidate
 * scores of each group of 4 input weights, and apply (forward) or differentiate (backward) the
 * mask, without materialising noise, probabilities or mask. Built and loaded on first use by
 * megatron/sparse/cpu_kernels.py; the PyTorch reference of every formula is in
 * megatron/sparse/mask.py and megatron/sparse/sampling.py, and the tests compare the two.
 *
 * Layouts: logits [rows][groups][6], weight and its gradients [rows][groups * 4].
 * Candidates (kept positions): 01, 02, 03, 12, 13, 23 (i.e. 1100 1010 1001 0110 0101 0011).
 * Noise of logit (row, group, k): uniform from hash(idx) with
 *   idx = ((row_ids[row] * total_groups + group_offset + group) * 6 + k) mod 2^32,
 * so every tensor-parallel shard draws exactly the noise of the unsharded layer.
 */
#include <math.h>
#include <stdint.h>

#define LANES 16 /* groups per vector block */
/* Softmax exponents are clamped here: exp(-80) = 2e-35 is 0 to float32 next to the largest term
 * (exp(0) = 1), and the vector expf leaves its fast path, one lane at a time, for arguments that
 * underflow (common with kappa / tau in the hundreds): kernels 1.5-1.8x faster at tau 4,
 * kappa 100. */
#define EXP_MIN -80.f

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

typedef struct {
    int64_t rows, groups, group_offset, total_groups;
    uint32_t seed;
    float a; /* kappa / tau */
    float b; /* 1 / tau */
    int noise, hard, threads;
} mask_params;

/* Candidate probabilities p[k][i] of the n <= LANES groups at l (layout [n][6]). */
static inline __attribute__((always_inline)) void block_probs(
    const float *restrict l, int n, uint32_t base, const mask_params *prm, float p[6][LANES]) {
    float mx[LANES], inv[LANES];
    for (int k = 0; k < 6; ++k)
        for (int i = 0; i < LANES; ++i) p[k][i] = i < n ? prm->a * l[i * 6 + k] : 0.f;
    if (prm->noise) {
        const uint32_t seed = prm->seed;
        const float b = prm->b;
        for (int k = 0; k < 6; ++k) {
#pragma omp simd
            for (int i = 0; i < LANES; ++i) {
                uint32_t h = mix32(mix32((base + (uint32_t)(i * 6 + k)) ^ seed) + seed);
                float u = ((float)(h >> 9) + 0.5f) * (1.0f / 8388608.0f);
                p[k][i] -= b * logf(fmaxf(-logf(u), 1e-10f)); /* GUMBEL_EPS */
            }
        }
    }
#pragma omp simd
    for (int i = 0; i < LANES; ++i) {
        float m = p[0][i];
        for (int k = 1; k < 6; ++k) m = fmaxf(m, p[k][i]);
        mx[i] = m;
        inv[i] = 0.f;
    }
    for (int k = 0; k < 6; ++k) {
#pragma omp simd
        for (int i = 0; i < LANES; ++i) {
            p[k][i] = expf(fmaxf(p[k][i] - mx[i], EXP_MIN));
            inv[i] += p[k][i];
        }
    }
#pragma omp simd
    for (int i = 0; i < LANES; ++i) inv[i] = 1.f / inv[i];
    for (int k = 0; k < 6; ++k) {
#pragma omp simd
        for (int i = 0; i < LANES; ++i) p[k][i] *= inv[i];
    }
}

/* The masks m[j][i] of a block: soft (the summed probabilities of the candidates keeping
 * position j) or hard (the most probable candidate, first on ties). */
static inline __attribute__((always_inline)) void block_mask(float p[6][LANES], int hard,
                                                             float m[4][LANES]) {
    if (hard) {
#pragma omp simd
        for (int i = 0; i < LANES; ++i) {
            int best = 0;
            float top = p[0][i];
            for (int k = 1; k < 6; ++k)
                if (p[k][i] > top) {
                    top = p[k][i];
                    best = k;
                }
            m[0][i] = (float)(best <= 2);
            m[1][i] = (float)(best == 0 || best == 3 || best == 4);
            m[2][i] = (float)(best == 1 || best == 3 || best == 5);
            m[3][i] = (float)(best == 2 || best == 4 || best == 5);
        }
        return;
    }
#pragma omp simd
    for (int i = 0; i < LANES; ++i) {
        m[0][i] = p[0][i] + p[1][i] + p[2][i];
        m[1][i] = p[0][i] + p[3][i] + p[4][i];
        m[2][i] = p[1][i] + p[3][i] + p[5][i];
        m[3][i] = p[2][i] + p[4][i] + p[5][i];
    }
}

static inline uint32_t row_base(const int32_t *row_ids, int64_t r, const mask_params *prm) {
    return (uint32_t)(((int64_t)row_ids[r] * prm->total_groups + prm->group_offset) * 6);
}

/* Load n groups of 4 values (layout [n][4]) as v[j][i], zero-padded to LANES. */
static inline __attribute__((always_inline)) void load4(const float *src, int n, float v[4][LANES]) {
    for (int i = 0; i < LANES; ++i)
        for (int j = 0; j < 4; ++j) v[j][i] = i < n ? src[i * 4 + j] : 0.f;
}

/* out = weight * mask; row_sums[r] = sum over row r of out^2 (in double; skipped if NULL). */
void msk_forward(const float *logits, const float *weight, float *out, double *row_sums,
                 const int32_t *row_ids, const mask_params *prm) {
    const int64_t groups = prm->groups;
#pragma omp parallel for num_threads(prm->threads) schedule(static)
    for (int64_t r = 0; r < prm->rows; ++r) {
        const uint32_t base = row_base(row_ids, r, prm);
        double total = 0.0;
        for (int64_t g0 = 0; g0 < groups; g0 += LANES) {
            const int n = groups - g0 < LANES ? (int)(groups - g0) : LANES;
            const int64_t at = r * groups + g0;
            float p[6][LANES], m[4][LANES], w[4][LANES], block = 0.f;
            block_probs(logits + at * 6, n, base + (uint32_t)(g0 * 6), prm, p);
            block_mask(p, prm->hard, m);
            load4(weight + at * 4, n, w);
            for (int j = 0; j < 4; ++j) {
#pragma omp simd reduction(+ : block)
                for (int i = 0; i < LANES; ++i) {
                    w[j][i] *= m[j][i];
                    block += w[j][i] * w[j][i];
                }
            }
            float *o = out + at * 4;
            for (int i = 0; i < n; ++i)
                for (int j = 0; j < 4; ++j) o[i * 4 + j] = w[j][i];
            total += block;
        }
        if (row_sums) row_sums[r] = total;
    }
}

/*
 * Gradients through out = weight * mask (grad_out may be NULL) plus reg_scale * weight^2 * mask
 * (the derivative of reg_scale / 2 * ||weight * mask||^2):
 *   grad_mask = grad_out * weight + reg_scale * weight^2 * mask
 *   grad_logits[k] = a * p[k] * (G[k] - sum_c p[c] G[c]),  G[k] = sum of grad_mask over the
 *                    positions candidate k keeps (the soft mask's gradient, also when hard)
 *   grad_weight = grad_out * mask (only when grad_weight is not NULL).
 */
void msk_backward(const float *logits, const float *weight, const float *grad_out,
                  float *grad_logits, float *grad_weight, float reg_scale, const int32_t *row_ids,
                  const mask_params *prm) {
    const int64_t groups = prm->groups;
    const float a = prm->a;
    const int need_mask = reg_scale != 0.f || grad_weight != 0;
#pragma omp parallel for num_threads(prm->threads) schedule(static)
    for (int64_t r = 0; r < prm->rows; ++r) {
        const uint32_t base = row_base(row_ids, r, prm);
        for (int64_t g0 = 0; g0 < groups; g0 += LANES) {
            const int n = groups - g0 < LANES ? (int)(groups - g0) : LANES;
            const int64_t at = r * groups + g0;
            float p[6][LANES], m[4][LANES], w[4][LANES], q[4][LANES], gl[6][LANES];
            block_probs(logits + at * 6, n, base + (uint32_t)(g0 * 6), prm, p);
            load4(weight + at * 4, n, w);
            if (grad_out) {
                load4(grad_out + at * 4, n, q);
            } else {
                for (int j = 0; j < 4; ++j)
                    for (int i = 0; i < LANES; ++i) q[j][i] = 0.f;
            }
            if (need_mask) block_mask(p, prm->hard, m);
            if (grad_weight)
                for (int i = 0; i < n; ++i)
                    for (int j = 0; j < 4; ++j) grad_weight[(at + i) * 4 + j] = q[j][i] * m[j][i];
            for (int j = 0; j < 4; ++j) {
#pragma omp simd
                for (int i = 0; i < LANES; ++i) {
                    q[j][i] *= w[j][i];
                    if (reg_scale != 0.f) q[j][i] += reg_scale * w[j][i] * w[j][i] * m[j][i];
                }
            }
#pragma omp simd
            for (int i = 0; i < LANES; ++i) {
                const float gc[6] = {q[0][i] + q[1][i], q[0][i] + q[2][i], q[0][i] + q[3][i],
                                     q[1][i] + q[2][i], q[1][i] + q[3][i], q[2][i] + q[3][i]};
                float dot = 0.f;
                for (int k = 0; k < 6; ++k) dot += p[k][i] * gc[k];
                for (int k = 0; k < 6; ++k) gl[k][i] = a * p[k][i] * (gc[k] - dot);
            }
            float *dst = grad_logits + at * 6;
            for (int i = 0; i < n; ++i)
                for (int k = 0; k < 6; ++k) dst[i * 6 + k] = gl[k][i];
        }
    }
}
