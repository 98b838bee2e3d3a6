/*
 * One Adam step over a list of float32 tensors, in one call (see
 * dgdcell/train/adam.py, and dgdcell/nn/native.py, which compiles this file
 * with the other kernels). The arithmetic is that of PyTorch's fused CPU
 * Adam (torch.optim.Adam(fused=True), no weight decay, no amsgrad):
 *
 *   m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2
 *   p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
 *
 * with t the tensor's own step count (incremented here). A tensor whose
 * gradient pointer is NULL is skipped (no gradient: no step), as PyTorch does.
 * Large tensors are split over the threads (static schedule); each element's
 * update is independent, so the result does not depend on the thread count.
 */
#include <math.h>
#include <stdint.h>

#define ADAM_PARALLEL 65536

void dgd_adam_step(int64_t n, float *const *params, const float *const *grads, float *const *exp_avg,
                   float *const *exp_avg_sq, const int64_t *sizes, const float *lrs, int64_t *steps, double beta1,
                   double beta2, double eps, int nthreads) {
    for (int64_t t = 0; t < n; t++) {
        if (!grads[t]) continue;
        int64_t step = ++steps[t];
        double bias1 = 1.0 - pow(beta1, (double)step), bias2 = 1.0 - pow(beta2, (double)step);
        float step_size = (float)((double)lrs[t] / bias1), bias2_sqrt = (float)sqrt(bias2);
        float b1 = (float)beta1, b2 = (float)beta2, e = (float)eps;
        float *p = params[t], *m = exp_avg[t], *v = exp_avg_sq[t];
        const float *g = grads[t];
        int64_t size = sizes[t];
        int nt = size >= ADAM_PARALLEL && nthreads > 1 ? nthreads : 1;
        (void)nt; /* unused without OpenMP threads */
        #pragma omp parallel for simd schedule(static) num_threads(nt)
        for (int64_t j = 0; j < size; j++) {
            float gj = g[j];
            float mj = m[j] * b1 + gj * (1.0f - b1);
            float vj = v[j] * b2 + gj * gj * (1.0f - b2);
            m[j] = mj;
            v[j] = vj;
            p[j] -= step_size * mj / (sqrtf(vj) / bias2_sqrt + e);
        }
    }
}
