// AdamW over every trainable tensor of a model in one launch, and their squared sums for the
// gradient norm in another: a step of a model with hundreds of LoRA tensors is two launches,
// not four per tensor. The tensors are reached through a table of device pointers (`table`:
// the parameters, then the first moments, the second moments and the gradients, `count`
// each) and their lengths. The arithmetic is torch.optim.AdamW's single-tensor path in its
// order up to the association of two products (torch forms (1-b2)*g*g and -step*m/denom;
// these form g*g*(1-b2) and m/denom*step, as the CPU path does: last-bit differences), each
// operation rounded (never contracted into fused multiply-adds): the same bits as the three
// passes per tensor this replaced. Launched by
// src/ops/optim.rs.

#include "common.cuh"

// Per element of tensor blockIdx.y:
//   g <- g * grad_scale                                  (clipping: torch's grads.mul_(coef))
//   m <- m + (g - m) * (1 - beta1)
//   v <- v * beta2 + g^2 * (1 - beta2)
//   p <- p * decay - (m / (sqrt(v) / bias_correction2_sqrt + eps)) * step_size
extern "C" __global__ void adamw_multi(const unsigned long long* table,
                                       const unsigned long long* lens, int count,
                                       float grad_scale, float one_minus_beta1, float beta2,
                                       float one_minus_beta2, float decay,
                                       float bias_correction2_sqrt, float eps, float step_size) {
    const int t = blockIdx.y;
    float* p = reinterpret_cast<float*>(table[t]);
    float* m = reinterpret_cast<float*>(table[count + t]);
    float* v = reinterpret_cast<float*>(table[2 * count + t]);
    const float* g = reinterpret_cast<const float*>(table[3 * count + t]);
    const size_t n = lens[t];
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float gi = __fmul_rn(g[i], grad_scale);
        const float mi = __fadd_rn(m[i], __fmul_rn(__fsub_rn(gi, m[i]), one_minus_beta1));
        const float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(gi, gi), one_minus_beta2));
        m[i] = mi;
        v[i] = vi;
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bias_correction2_sqrt), eps);
        p[i] = __fsub_rn(__fmul_rn(p[i], decay), __fmul_rn(__fdiv_rn(mi, denom), step_size));
    }
}

// The sum of squares of tensor blockIdx.x (of a table of device pointers and lengths) into
// sums[blockIdx.x], by one block of 256 threads in a fixed order: the same bits on every run.
extern "C" __global__ void sum_squares_multi(const unsigned long long* table,
                                             const unsigned long long* lens, float* sums) {
    __shared__ float partial[256];
    const float* g = reinterpret_cast<const float*>(table[blockIdx.x]);
    const size_t n = lens[blockIdx.x];
    float acc = 0.f;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) acc = fmaf(g[i], g[i], acc);
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int width = blockDim.x / 2; width > 0; width /= 2) {
        if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
        __syncthreads();
    }
    if (threadIdx.x == 0) sums[blockIdx.x] = partial[0];
}
