/*
 * Native CPU kernels for the negative-binomial likelihood of sparse counts
 * given decoder logits (see dgdcell/nn/native.py, which compiles and loads
 * this file, and dgdcell/nn/likelihoods.py for the model).
 *
 * For cell i, feature j:  log mu_ij = logits_ij - lse_i + log s_i,
 * a_ij = log mu_ij - log r_j, and
 *
 *   log NB_i = -sum_j r_j softplus(a_ij)
 *              + sum_{x_ij > 0} [lgamma(x_ij + r_j) - lgamma(r_j) - x_ij softplus(-a_ij)]
 *              - sum_j lgamma(x_ij + 1)
 *
 * PyTorch evaluates this with about ten passes over the (B, G) arrays, each
 * a separate operation that leaves the cache; here every row is read once
 * forward and once backward while it sits in the L1 cache, and nothing of
 * size (B, G) is stored but the logits' gradient. Rows run in parallel
 * (OpenMP, static schedule: the same thread count gives the same result).
 *
 * exp and log are evaluated with the range reductions and polynomials
 * below (relative error about 1e-7, float32 rounding), which the compiler
 * vectorises; the count terms use per-feature tables for counts up to
 * TABLE_K and Stirling series in float64 above.
 *
 * The non-zeros come in one of two layouts. COO (dgd_nb_forward /
 * dgd_nb_backward): rows[] non-decreasing (the non-zeros of a cell are
 * consecutive) and flat[k] = rows[k] * G + column. CSR rows
 * (dgd_nb_forward_csr / dgd_nb_backward_csr): cell i's non-zeros are
 * positions start[i] .. start[i] + length[i] - 1 of a CSR matrix's int32
 * column indices and float32 values, so a minibatch of any rows of the
 * whole matrix is read in place, without slicing it first. Arrays are
 * C-contiguous. The functions return 0, or -1 when the non-zeros are out of
 * order or out of range (the caller then uses its PyTorch implementation),
 * or -2 when memory runs out.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TABLE_K 16
#define LN2_HI 0.693145751953125f
#define LN2_LO 1.42860676533018708e-06f
#define SQRT2 1.41421356237309505f
/* mu / r = (library * p) / r is evaluated with the library size capped at
 * MAX_LIBRARY and 1 / r at MAX_INV_R, so that it stays finite in float32
 * (p <= 1); real data stay far inside both. */
#define MAX_LIBRARY 1e12f
#define MAX_INV_R 1e25f

static inline float bits_float(int32_t i) { float f; memcpy(&f, &i, sizeof f); return f; }
static inline int32_t float_bits(float f) { int32_t i; memcpy(&i, &f, sizeof i); return i; }

/* exp(x), relative error < 2e-7; arguments are clamped to [-87, 88]. */
static inline float exp_f(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = (x - n * LN2_HI) - n * LN2_LO;                          /* |r| <= ln(2) / 2 */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * bits_float(((int32_t)n + 127) << 23);
}

/* log(m) for m in [sqrt(2) / 2, sqrt(2)]: 2 atanh(s), s = (m - 1) / (m + 1). */
static inline float log_reduced(float m) {
    float f = m - 1.0f;
    float s = f / (2.0f + f);
    float s2 = s * s;
    float q = 1.0f / 9.0f;
    q = q * s2 + 1.0f / 7.0f;
    q = q * s2 + 1.0f / 5.0f;
    q = q * s2 + 1.0f / 3.0f;
    q = q * s2 + 1.0f;
    return 2.0f * s * q;
}

/* x = 2^e m with m in [sqrt(2) / 2, sqrt(2)], for positive normal x; returns m. */
static inline float reduce(float x, float *e) {
    int32_t b = float_bits(x);
    float m = bits_float((b & 0x007fffff) | 0x3f800000); /* [1, 2) */
    int big = m > SQRT2;
    *e = (float)(((b >> 23) & 0xff) - 127 + big);
    return big ? 0.5f * m : m;
}

/* log(x) for positive normal x. */
static inline float log_f(float x) {
    float e;
    float m = reduce(x, &e);
    return e * LN2_HI + (log_reduced(m) + e * LN2_LO);
}

/* log(1 + u) for u >= 0 (finite): log(w) for w = 1 + u rounded, plus the
 * rounding's correction (u - (w - 1)) / w, with 1 / w = 2^-e / m taken to a
 * few per cent (exact at w = 1; the correction is below float32's resolution
 * of w). One division. */
static inline float log1p_pos(float u) {
    float w = 1.0f + u, e;
    float m = reduce(w, &e);
    float inv_w = bits_float((127 - (int32_t)e) << 23) * (1.5f - 0.5f * m);
    return log_f(w) + (u - (w - 1.0f)) * inv_w;
}

/* log(1 + u) for u in [0, 1], accurate also where 1 + u rounds (Goldberg's
 * log(w) u / (w - 1)); this form vectorises where the gathers of the
 * non-zero loops keep log1p_pos from it. */
static inline float log1p_unit(float u) {
    float w = 1.0f + u;
    int big = w > SQRT2;
    float m = big ? 0.5f * w : w;
    float lw = big ? LN2_HI + (log_reduced(m) + LN2_LO) : log_reduced(m);
    float d = w - 1.0f;
    return d == 0.0f ? u : lw * (u / d);
}

/* softplus(a) = log(1 + exp(a)) = max(a, 0) + log1p(exp(-|a|)). */
static inline float softplus_f(float a) {
    return (a > 0.0f ? a : 0.0f) + log1p_unit(exp_f(-fabsf(a)));
}

/* lgamma(z) and digamma(z) for z >= TABLE_K (Stirling series, float64). */
static double lgamma_big(double z) {
    double iz = 1.0 / z, iz2 = iz * iz;
    double series = iz * (1.0 / 12 - iz2 * (1.0 / 360 - iz2 * (1.0 / 1260 - iz2 / 1680)));
    return (z - 0.5) * log(z) - z + 0.91893853320467274 + series;
}

static double digamma_big(double z) {
    double iz = 1.0 / z, iz2 = iz * iz;
    double series = iz2 * (1.0 / 12 - iz2 * (1.0 / 120 - iz2 * (1.0 / 252 - iz2 / 240)));
    return log(z) - 0.5 * iz - series;
}

/* Non-zeros in row order and inside their rows? */
static int check_order(int64_t B, int64_t G, int64_t nnz, const int64_t *rows, const int64_t *flat) {
    int bad = 0;
    for (int64_t k = 0; k < nnz; k++) {
        int64_t i = rows[k];
        int64_t j = flat[k] - i * G;
        bad |= (i < 0) | (i >= B) | (j < 0) | (j >= G) | (k > 0 && i < rows[k - 1]);
    }
    return bad ? -1 : 0;
}

/* The thread count to use: the caller's (PyTorch's), 1 without OpenMP. */
static int threads(int nthreads) {
#ifdef _OPENMP
    return nthreads > 0 ? nthreads : 1;
#else
    (void)nthreads;
    return 1;
#endif
}

/* First position k with rows[k] >= i (rows non-decreasing). */
static int64_t lower_bound(const int64_t *rows, int64_t nnz, int64_t i) {
    int64_t lo = 0, hi = nnz;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (rows[mid] < i) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* Per-feature tables, (G, TABLE_K + 1): column x holds sum_{k < x} step(r + k)
 * = lgamma(x + r) - lgamma(r) (step = log) or digamma(x + r) - digamma(r)
 * (step = 1 / z). */
static void count_table(int64_t G, const float *r, float *table, int digamma, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t j = 0; j < G; j++) {
        float steps[TABLE_K];
        #pragma omp simd
        for (int k = 0; k < TABLE_K; k++)
            steps[k] = digamma ? 1.0f / (r[j] + (float)k) : log_f(r[j] + (float)k);
        double acc = 0.0;
        float *t = table + j * (TABLE_K + 1);
        t[0] = 0.0f;
        for (int k = 0; k < TABLE_K; k++) {
            acc += steps[k];
            t[k + 1] = (float)acc;
        }
    }
}

/* r and 1 / r, the latter at most MAX_INV_R (see MAX_LIBRARY). */
static void dispersions(int64_t G, const float *log_r, float *r, float *r_inv) {
    for (int64_t j = 0; j < G; j++) {
        r[j] = expf(log_r[j]);
        r_inv[j] = fminf(expf(-log_r[j]), MAX_INV_R);
    }
}

/*
 * Forward: out[i] = log NB_i (nats), lse_out[i] = logsumexp_j logits_ij.
 * logits (B, G); log_lib (B,) log library sizes; log_r (G,); cell i's
 * non-zeros at positions begin[i] .. end[i] - 1 of cols (int32 columns) and
 * values (integer counts); log_fact (B,) = sum_j lgamma(x_ij + 1).
 */
static int nb_forward_rows(int64_t B, int64_t G, const float *logits, const float *log_lib, const float *log_r,
                           const int64_t *begin, const int64_t *end, const int32_t *cols, const float *values,
                           const float *log_fact, float *out, float *lse_out, int nthreads) {
    int nt = threads(nthreads);
    float *r = malloc(sizeof(float) * (2 * G + 1));
    float *table = malloc(sizeof(float) * G * (TABLE_K + 1) + 1);
    float *scratch = malloc(sizeof(float) * (size_t)nt * (size_t)G + 1);
    if (!r || !table || !scratch) { free(r); free(table); free(scratch); return -2; }
    float *r_inv = r + G;
    dispersions(G, log_r, r, r_inv);
    count_table(G, r, table, 0, nt);
    #pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        float *e = scratch + (size_t)omp_get_thread_num() * (size_t)G;
#else
        float *e = scratch;
#endif
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < B; i++) {
            const float *x = logits + i * G;
            float m = -INFINITY;
            #pragma omp simd reduction(max : m)
            for (int64_t j = 0; j < G; j++) m = x[j] > m ? x[j] : m;
            float s = 0.0f;
            #pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < G; j++) {
                e[j] = exp_f(x[j] - m);
                s += e[j];
            }
            float lse = m + logf(s);
            float c = log_lib[i] - lse;
            float scale = fminf(expf(log_lib[i]), MAX_LIBRARY) / s; /* mu_j = e_j * scale, s >= 1 */
            float dense = 0.0f;
            #pragma omp simd reduction(+ : dense)
            for (int64_t j = 0; j < G; j++) {
                float u = e[j] * scale * r_inv[j]; /* mu / r = exp(a) */
                dense += r[j] * log1p_pos(u);
            }
            /* the non-zeros of the row: softplus(-a) and table entries, vectorised ... */
            int64_t k0 = begin[i], k1 = end[i];
            float terms = 0.0f;
            #pragma omp simd reduction(+ : terms)
            for (int64_t k = k0; k < k1; k++) {
                int64_t j = cols[k];
                float v = values[k];
                float a = x[j] + c - log_r[j];
                int xi = (int)(v < (float)TABLE_K ? v : (float)TABLE_K);
                terms += table[j * (TABLE_K + 1) + xi] - v * softplus_f(-a);
            }
            /* ... and the lgamma differences beyond the table */
            double big = 0.0;
            for (int64_t k = k0; k < k1; k++) {
                if (values[k] > (float)TABLE_K) {
                    double rj = (double)r[cols[k]];
                    big += lgamma_big((double)values[k] + rj) - lgamma_big((double)TABLE_K + rj);
                }
            }
            out[i] = (float)((double)terms + big - (double)dense - (double)log_fact[i]);
            lse_out[i] = lse;
        }
    }
    free(r);
    free(table);
    free(scratch);
    return 0;
}

/*
 * Backward of nb_forward_rows for the upstream gradient grad (B,):
 * d_logits (B, G), d_lib (B,) (gradient for log library sizes) and d_log_r
 * (G,); each may be NULL when not wanted. lse (B,) from the forward pass.
 *
 * d/d log mu_ij = g_i (x_ij - (x_ij + r_j) sigmoid(a_ij)); the logits'
 * gradient is its log-softmax backward (minus p_ij times its row sum);
 * d/d log r_j = -sum_i d/d log mu_ij - r_j sum_i g_i softplus(a_ij)
 *               + r_j sum_{x_ij > 0} g_i (digamma(x_ij + r_j) - digamma(r_j)).
 */
static int nb_backward_rows(int64_t B, int64_t G, const float *logits, const float *log_lib, const float *lse,
                            const float *log_r, const int64_t *begin, const int64_t *end, const int32_t *cols,
                            const float *values, const float *grad, float *d_logits, float *d_lib, float *d_log_r,
                            int nthreads) {
    int nt = threads(nthreads);
    int want_r = d_log_r != NULL;
    float *r = malloc(sizeof(float) * (2 * G + 1));
    float *table = want_r ? malloc(sizeof(float) * G * (TABLE_K + 1) + 1) : NULL;
    /* per thread: two row buffers and, for d_log_r, three column sums (G each) */
    size_t per = (size_t)G * (want_r ? 5 : 2);
    float *scratch = calloc((size_t)nt * per + 1, sizeof(float));
    if (!r || !scratch || (want_r && !table)) { free(r); free(table); free(scratch); return -2; }
    float *r_inv = r + G;
    dispersions(G, log_r, r, r_inv);
    if (want_r) count_table(G, r, table, 1, nt);
    #pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        float *own = scratch + (size_t)omp_get_thread_num() * per;
#else
        float *own = scratch;
#endif
        float *p = own, *row_buf = own + G;
        float *col_mu = own + 2 * G, *col_sp = own + 3 * G, *col_dig = own + 4 * G;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < B; i++) {
            const float *x = logits + i * G;
            float *dx = d_logits ? d_logits + i * G : row_buf;
            float g = grad[i];
            float l = lse[i];
            float lib = fminf(expf(log_lib[i]), MAX_LIBRARY);
            float row = 0.0f;
            #pragma omp simd reduction(+ : row)
            for (int64_t j = 0; j < G; j++) {
                p[j] = exp_f(x[j] - l);
                float mu = p[j] * lib;
                float d = -g * r[j] * mu / (mu + r[j]); /* -g r sigmoid(a) */
                dx[j] = d;
                row += d;
            }
            if (want_r) { /* column sums of that part and of g softplus(a), softplus(a) = log(1 + mu / r) */
                #pragma omp simd
                for (int64_t j = 0; j < G; j++) {
                    col_mu[j] += dx[j];
                    col_sp[j] += g * log1p_pos(p[j] * lib * r_inv[j]);
                }
            }
            float c = log_lib[i] - l;
            int64_t k0 = begin[i], k1 = end[i];
            /* the non-zeros' part, g x sigmoid(-a); a row's columns are distinct */
            #pragma omp simd reduction(+ : row)
            for (int64_t k = k0; k < k1; k++) {
                int64_t j = cols[k];
                float a = x[j] + c - log_r[j];
                float u = exp_f(-fabsf(a));
                float inv = 1.0f / (1.0f + u);
                float d = g * values[k] * (a > 0.0f ? u * inv : inv);
                dx[j] += d;
                row += d;
                if (want_r) col_mu[j] += d;
            }
            if (want_r) {
                #pragma omp simd
                for (int64_t k = k0; k < k1; k++) {
                    int64_t j = cols[k];
                    float v = values[k];
                    int xi = (int)(v < (float)TABLE_K ? v : (float)TABLE_K);
                    col_dig[j] += g * table[j * (TABLE_K + 1) + xi];
                }
                for (int64_t k = k0; k < k1; k++) {
                    if (values[k] > (float)TABLE_K) {
                        int64_t j = cols[k];
                        double rj = (double)r[j];
                        col_dig[j] += g * (float)(digamma_big((double)values[k] + rj) - digamma_big((double)TABLE_K + rj));
                    }
                }
            }
            if (d_logits) {
                #pragma omp simd
                for (int64_t j = 0; j < G; j++) dx[j] -= p[j] * row;
            }
            if (d_lib) d_lib[i] = row;
        }
    }
    if (want_r) {
        for (int64_t j = 0; j < G; j++) {
            double mu = 0.0, sp = 0.0, dig = 0.0;
            for (int t = 0; t < nt; t++) {
                const float *own = scratch + (size_t)t * per;
                mu += own[2 * G + j];
                sp += own[3 * G + j];
                dig += own[4 * G + j];
            }
            d_log_r[j] = (float)(-mu - (double)r[j] * sp + (double)r[j] * dig);
        }
    }
    free(r);
    free(table);
    free(scratch);
    return 0;
}

/* COO non-zeros -> row spans (begin (B,), end (B,)) and int32 columns, in one
 * allocation; NULL (and *code -1 or -2) when out of order or out of memory. */
static int64_t *coo_spans(int64_t B, int64_t G, int64_t nnz, const int64_t *rows, const int64_t *flat,
                          int32_t **cols_out, int *code) {
    *code = check_order(B, G, nnz, rows, flat);
    if (*code) return NULL;
    int64_t *span = malloc(sizeof(int64_t) * (size_t)(2 * B + 1) + sizeof(int32_t) * (size_t)(nnz + 1));
    if (!span) { *code = -2; return NULL; }
    int32_t *cols = (int32_t *)(span + 2 * B + 1);
    for (int64_t i = 0; i < B; i++) span[i] = lower_bound(rows, nnz, i);
    for (int64_t i = 0; i < B; i++) span[B + i] = i + 1 < B ? span[i + 1] : nnz;
    for (int64_t k = 0; k < nnz; k++) cols[k] = (int32_t)(flat[k] - rows[k] * G);
    *cols_out = cols;
    return span;
}

/* CSR row spans -> their ends (B,); NULL (and *code -1 or -2) when a span
 * leaves the n_total entries or (with check_columns) a column lies outside [0, G). */
static int64_t *csr_ends(int64_t B, int64_t G, const int64_t *start, const int64_t *length, int64_t n_total,
                         const int32_t *indices, int check_columns, int *code, int nthreads) {
    int64_t *end = malloc(sizeof(int64_t) * (size_t)(B + 1));
    if (!end) { *code = -2; return NULL; }
    int bad = 0;
    int nt = threads(nthreads);
    #pragma omp parallel for schedule(static) reduction(| : bad) num_threads(nt)
    for (int64_t i = 0; i < B; i++) {
        int64_t a = start[i], n = length[i];
        end[i] = a + n;
        if (a < 0 || n < 0 || a > n_total - n) { bad = 1; continue; }
        if (!check_columns) continue;
        int row_bad = 0;
        #pragma omp simd reduction(| : row_bad)
        for (int64_t k = a; k < a + n; k++) row_bad |= (indices[k] < 0) | (indices[k] >= G);
        bad |= row_bad;
    }
    if (bad) { free(end); *code = -1; return NULL; }
    *code = 0;
    return end;
}

/* Forward with COO non-zeros (see the top of the file). */
int dgd_nb_forward(int64_t B, int64_t G, const float *logits, const float *log_lib, const float *log_r,
                   int64_t nnz, const int64_t *rows, const int64_t *flat, const float *values,
                   const float *log_fact, float *out, float *lse_out, int nthreads) {
    int32_t *cols;
    int code;
    int64_t *span = coo_spans(B, G, nnz, rows, flat, &cols, &code);
    if (!span) return code;
    code = nb_forward_rows(B, G, logits, log_lib, log_r, span, span + B, cols, values, log_fact, out, lse_out,
                           nthreads);
    free(span);
    return code;
}

/* Backward with COO non-zeros. */
int dgd_nb_backward(int64_t B, int64_t G, const float *logits, const float *log_lib, const float *lse,
                    const float *log_r, int64_t nnz, const int64_t *rows, const int64_t *flat,
                    const float *values, const float *grad, float *d_logits, float *d_lib, float *d_log_r,
                    int nthreads) {
    int32_t *cols;
    int code;
    int64_t *span = coo_spans(B, G, nnz, rows, flat, &cols, &code);
    if (!span) return code;
    code = nb_backward_rows(B, G, logits, log_lib, lse, log_r, span, span + B, cols, values, grad, d_logits,
                            d_lib, d_log_r, nthreads);
    free(span);
    return code;
}

/* Forward with CSR rows: cell i's non-zeros at positions start[i] ..
 * start[i] + length[i] - 1 of indices / values (n_total entries each). */
int dgd_nb_forward_csr(int64_t B, int64_t G, const float *logits, const float *log_lib, const float *log_r,
                       const int64_t *start, const int64_t *length, int64_t n_total, const int32_t *indices,
                       const float *values, const float *log_fact, float *out, float *lse_out, int nthreads) {
    int code;
    int64_t *end = csr_ends(B, G, start, length, n_total, indices, 1, &code, nthreads);
    if (!end) return code;
    code = nb_forward_rows(B, G, logits, log_lib, log_r, start, end, indices, values, log_fact, out, lse_out,
                           nthreads);
    free(end);
    return code;
}

/* Backward with CSR rows; check_columns 0 skips the column check (the
 * forward pass of the same arrays has done it). */
int dgd_nb_backward_csr(int64_t B, int64_t G, const float *logits, const float *log_lib, const float *lse,
                        const float *log_r, const int64_t *start, const int64_t *length, int64_t n_total,
                        const int32_t *indices, const float *values, const float *grad, float *d_logits,
                        float *d_lib, float *d_log_r, int check_columns, int nthreads) {
    int code;
    int64_t *end = csr_ends(B, G, start, length, n_total, indices, check_columns, &code, nthreads);
    if (!end) return code;
    code = nb_backward_rows(B, G, logits, log_lib, lse, log_r, start, end, indices, values, grad, d_logits, d_lib,
                            d_log_r, nthreads);
    free(end);
    return code;
}
