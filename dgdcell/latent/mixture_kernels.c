/*
 * Native CPU kernels for the Gaussian-mixture prior of a minibatch of
 * representations (see dgdcell/latent/gmm.py for the model and
 * dgdcell/nn/native.py, which compiles this file together with
 * nb_kernels.c and loads it).
 *
 * For row i of x (B, D) and component k of K with mean m_k (D,), negative
 * log variances nlv_k (1 or D of them; precision P_kl = exp(nlv_kl)) and log
 * weight w_k:
 *
 *   lp_ik = w_k + half_logdet_k + pi_term - 0.5 sum_l P_kl (x_il - m_kl)^2
 *   lse_i = logsumexp_k lp_ik,   r_ik = exp(lp_ik - lse_i)
 *
 * The work per minibatch is tiny (B K D multiply-adds); in PyTorch it is
 * some forty small operations forward and backward, whose fixed cost is
 * what these kernels save. The parameters' priors (a softball on the means,
 * a Gaussian on the negative log variances, a Dirichlet on the weights) are
 * here too, with their gradients.
 *
 * Log weights come in one of three modes: 0, log_w is (K,) log weights
 * shared by all rows; 1, log_w is (B, K), a row each (-inf excludes a
 * component); 2, log_w is (K,) weight logits and the log weights are their
 * log-softmax (the gradient returned is then the logits').
 * Rows run in parallel (OpenMP, static schedule) only for large B K D;
 * sums over rows are accumulated per thread in float64 and added in thread
 * order, so a given thread count always gives the same result.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* below this many multiply-adds (B K D) one thread does the work */
#define PARALLEL_WORK (1 << 18)

static int mixture_threads(int64_t B, int64_t K, int64_t D, int nthreads) {
#ifdef _OPENMP
    if (nthreads < 1 || B * K * D < PARALLEL_WORK) return 1;
    return nthreads;
#else
    (void)B; (void)K; (void)D; (void)nthreads;
    return 1;
#endif
}

static int thread_number(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Log weights of mode 2 (log-softmax of the logits), (K,) into out. */
static void log_softmax_k(int64_t K, const float *logits, double *out) {
    double m = -INFINITY, s = 0.0;
    for (int64_t k = 0; k < K; k++) m = logits[k] > m ? logits[k] : m;
    for (int64_t k = 0; k < K; k++) s += exp((double)logits[k] - m);
    double lse = m + log(s);
    for (int64_t k = 0; k < K; k++) out[k] = (double)logits[k] - lse;
}

/* Precisions (K, D) and per-component constants half_logdet_k + pi_term (+ w_k for modes 0 and 2). */
static void component_terms(int64_t K, int64_t D, const float *nlv, int64_t nlv_dim, const float *log_w, int mode,
                            float pi_term, float *prec, float *base) {
    double lw[K > 0 ? K : 1];
    if (mode == 2) log_softmax_k(K, log_w, lw);
    for (int64_t k = 0; k < K; k++) {
        double half_logdet = 0.0;
        for (int64_t l = 0; l < D; l++) {
            float v = nlv[k * nlv_dim + (nlv_dim == 1 ? 0 : l)];
            prec[k * D + l] = expf(v);
            if (nlv_dim != 1) half_logdet += 0.5 * (double)v;
        }
        if (nlv_dim == 1) half_logdet = 0.5 * (double)D * (double)nlv[k];
        double w = mode == 0 ? (double)log_w[k] : mode == 2 ? lw[k] : 0.0;
        base[k] = (float)(half_logdet + (double)pi_term + w);
    }
}

/*
 * Forward: out[i] = sign * lse_i + add; resp (B, K) gets r_ik.
 * x (B, D); mean (K, D); nlv (K, nlv_dim) with nlv_dim 1 or D; log_w as its
 * mode says. A row whose every component is excluded gets lse -inf and
 * responsibilities 0. Returns 0, or -2 when memory runs out.
 */
int dgd_mixture_forward(int64_t B, int64_t K, int64_t D, const float *x, const float *mean, const float *nlv,
                        int64_t nlv_dim, const float *log_w, int mode, float pi_term, float sign, float add,
                        float *out, float *resp, int nthreads) {
    float *prec = malloc(sizeof(float) * (size_t)(K * D + K + 1));
    if (!prec) return -2;
    float *base = prec + K * D;
    component_terms(K, D, nlv, nlv_dim, log_w, mode, pi_term, prec, base);
    int nt = mixture_threads(B, K, D, nthreads);
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t i = 0; i < B; i++) {
        const float *xi = x + i * D;
        float *ri = resp + i * K;
        float m = -INFINITY;
        for (int64_t k = 0; k < K; k++) {
            const float *mk = mean + k * D, *pk = prec + k * D;
            float maha = 0.0f;
            #pragma omp simd reduction(+ : maha)
            for (int64_t l = 0; l < D; l++) {
                float dl = xi[l] - mk[l];
                maha += dl * dl * pk[l];
            }
            float lp = base[k] - 0.5f * maha + (mode == 1 ? log_w[i * K + k] : 0.0f);
            ri[k] = lp;
            m = lp > m ? lp : m;
        }
        float lse;
        if (m == -INFINITY) {
            lse = -INFINITY;
            for (int64_t k = 0; k < K; k++) ri[k] = 0.0f;
        } else {
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++) s += expf(ri[k] - m);
            lse = m + logf(s);
            for (int64_t k = 0; k < K; k++) ri[k] = expf(ri[k] - lse);
        }
        out[i] = sign * lse + add;
    }
    free(prec);
    return 0;
}

/*
 * Backward of dgd_mixture_forward for the upstream gradient grad (B,)
 * (times sign): with w_ik = sign g_i r_ik and t_ikl = w_ik P_kl (x_il - m_kl),
 * d_x = -sum_k t, d_mean = sum_i t, d_nlv_kl = sum_i w_ik (1 - (x_il - m_kl)^2 P_kl) / 2
 * (summed over l when nlv_dim is 1), d_logw = w (mode 1), its column sums
 * (mode 0) or, for logits (mode 2), those minus softmax(logits) times their sum.
 * Any output may be NULL. When prior_coef is not 0, prior_coef * sum_i g_i
 * times the parameter-prior gradients d_prior_mean (K, D), d_prior_weight
 * (K,) and d_prior_nlv (K, nlv_dim) (each may be NULL) is added to the
 * corresponding outputs (the rows' share of the parameter priors).
 */
int dgd_mixture_backward(int64_t B, int64_t K, int64_t D, const float *x, const float *mean, const float *nlv,
                         int64_t nlv_dim, const float *log_w, int mode, const float *resp, const float *grad,
                         float sign, float *d_x, float *d_mean, float *d_nlv, float *d_logw,
                         float prior_coef, const float *d_prior_mean, const float *d_prior_weight,
                         const float *d_prior_nlv, int nthreads) {
    int nt = mixture_threads(B, K, D, nthreads);
    /* per thread: sums for d_mean (K D), d_nlv (K D) and d_logw (K), and of g (1), in float64 */
    size_t per = (size_t)(2 * K * D + K + 1);
    float *prec = malloc(sizeof(float) * (size_t)(K * D + K + 1));
    double *acc = calloc((size_t)nt * per + 1, sizeof(double));
    if (!prec || !acc) { free(prec); free(acc); return -2; }
    float *base = prec + K * D;
    component_terms(K, D, nlv, nlv_dim, log_w, mode, 0.0f, prec, base); /* only the precisions are used */
    int want_mean = d_mean != NULL, want_nlv = d_nlv != NULL;
    #pragma omp parallel num_threads(nt)
    {
        double *own = acc + (size_t)thread_number() * per;
        double *a_mean = own, *a_nlv = own + K * D, *a_w = own + 2 * K * D, *a_g = own + 2 * K * D + K;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < B; i++) {
            const float *xi = x + i * D;
            float g = sign * grad[i];
            a_g[0] += (double)grad[i];
            float dxi[D > 0 ? D : 1];
            for (int64_t l = 0; l < D; l++) dxi[l] = 0.0f;
            for (int64_t k = 0; k < K; k++) {
                float w = g * resp[i * K + k];
                if (d_logw && mode == 1) d_logw[i * K + k] = w;
                a_w[k] += (double)w;
                if (w == 0.0f) continue;
                const float *mk = mean + k * D, *pk = prec + k * D;
                double *am = a_mean + k * D, *an = a_nlv + k * D;
                for (int64_t l = 0; l < D; l++) {
                    float dl = xi[l] - mk[l];
                    float t = w * pk[l] * dl;
                    dxi[l] -= t;
                    if (want_mean) am[l] += (double)t;
                    if (want_nlv) an[l] += 0.5 * (double)(w - t * dl);
                }
            }
            if (d_x) memcpy(d_x + i * D, dxi, sizeof(float) * (size_t)D);
        }
    }
    /* add the threads' sums in order */
    for (int t = 1; t < nt; t++)
        for (size_t j = 0; j < per; j++) acc[j] += acc[(size_t)t * per + j];
    double gsum = acc[2 * K * D + K], pc = (double)prior_coef * gsum;
    if (d_mean)
        for (int64_t j = 0; j < K * D; j++)
            d_mean[j] = (float)(acc[j] + (prior_coef != 0.0f && d_prior_mean ? pc * d_prior_mean[j] : 0.0));
    if (d_nlv)
        for (int64_t k = 0; k < K; k++)
            for (int64_t l = 0; l < nlv_dim; l++) {
                double s = 0.0;
                if (nlv_dim == 1)
                    for (int64_t q = 0; q < D; q++) s += acc[K * D + k * D + q];
                else
                    s = acc[K * D + k * D + l];
                if (prior_coef != 0.0f && d_prior_nlv) s += pc * d_prior_nlv[k * nlv_dim + l];
                d_nlv[k * nlv_dim + l] = (float)s;
            }
    if (d_logw && mode != 1) {
        const double *aw = acc + 2 * K * D;
        double total = 0.0, lw[K > 0 ? K : 1];
        for (int64_t k = 0; k < K; k++) total += aw[k];
        if (mode == 2) log_softmax_k(K, log_w, lw);
        for (int64_t k = 0; k < K; k++) {
            double v = mode == 2 ? aw[k] - exp(lw[k]) * total : aw[k];
            if (prior_coef != 0.0f && d_prior_weight) v += pc * d_prior_weight[k];
            d_logw[k] = (float)v;
        }
    }
    free(prec);
    free(acc);
    return 0;
}

/*
 * Log density of a mixture's parameters under their priors, with gradients
 * (each gradient pointer may be NULL):
 *   sum_k [ball_norm - softplus(s (|m_k| / R - 1))]             (softball, radius R, sharpness s)
 * + dir_norm + (alpha - 1) sum_k log_softmax(weight)_k           (symmetric Dirichlet)
 * + sum_{k,l} [gauss_norm - ((nlv_kl - mu) / sd)^2 / 2]          (when nlv_dim > 0)
 * Gradients: -sigmoid(u_k) s / R m_k / |m_k| (0 at m_k = 0), (alpha - 1)(1 - K p_k), -(nlv - mu) / sd^2.
 */
double dgd_parameter_prior(int64_t K, int64_t D, const float *mean, const float *weight, const float *nlv,
                           int64_t nlv_dim, double radius, double sharpness, double ball_norm, double alpha,
                           double dir_norm, double mu, double sd, double gauss_norm, float *d_mean,
                           float *d_weight, float *d_nlv) {
    double lp = 0.0;
    for (int64_t k = 0; k < K; k++) {
        double r2 = 0.0;
        for (int64_t l = 0; l < D; l++) r2 += (double)mean[k * D + l] * (double)mean[k * D + l];
        double r = sqrt(r2), u = sharpness * (r / radius - 1.0);
        lp += ball_norm - (u > 0 ? u + log1p(exp(-u)) : log1p(exp(u)));
        if (d_mean) {
            double scale = r > 0 ? -sharpness / radius / (1.0 + exp(-u)) / r : 0.0;
            for (int64_t l = 0; l < D; l++) d_mean[k * D + l] = (float)(scale * (double)mean[k * D + l]);
        }
    }
    double lw[K > 0 ? K : 1], sum_lw = 0.0;
    log_softmax_k(K, weight, lw);
    for (int64_t k = 0; k < K; k++) sum_lw += lw[k];
    lp += dir_norm + (alpha - 1.0) * sum_lw;
    if (d_weight)
        for (int64_t k = 0; k < K; k++) d_weight[k] = (float)((alpha - 1.0) * (1.0 - (double)K * exp(lw[k])));
    for (int64_t j = 0; j < K * nlv_dim; j++) {
        double z = ((double)nlv[j] - mu) / sd;
        lp += gauss_norm - 0.5 * z * z;
        if (d_nlv) d_nlv[j] = (float)(-z / sd);
    }
    return lp;
}
