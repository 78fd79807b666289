// AdamW's update of one f32 tensor in three in-place passes (the two moments, then the
// parameter): the arithmetic of torch.optim.AdamW's single-tensor path in its order, each
// operation rounded (the _rn intrinsics are never contracted into fused multiply-adds).
// Launched by src/ops/optim.rs.

#include "common.cuh"

#define GRID_STRIDE(i, n)                                                                      \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                    \
         i += (size_t)gridDim.x * blockDim.x)

// m <- m + (g - m) * (1 - beta1)
extern "C" __global__ void adamw_exp_avg(float* m, const float* g, size_t n, float one_minus_beta1) {
    GRID_STRIDE(i, n) { m[i] = __fadd_rn(m[i], __fmul_rn(__fsub_rn(g[i], m[i]), one_minus_beta1)); }
}

// v <- v * beta2 + g^2 * (1 - beta2)
extern "C" __global__ void adamw_exp_avg_sq(float* v, const float* g, size_t n, float beta2,
                                            float one_minus_beta2) {
    GRID_STRIDE(i, n) {
        v[i] = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(g[i], g[i]), one_minus_beta2));
    }
}

// p <- p * decay - (m / (sqrt(v) / bias_correction2_sqrt + eps)) * step_size
extern "C" __global__ void adamw_param(float* p, const float* m, const float* v, size_t n,
                                       float decay, float bias_correction2_sqrt, float eps,
                                       float step_size) {
    GRID_STRIDE(i, n) {
        float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v[i]), bias_correction2_sqrt), eps);
        p[i] = __fsub_rn(__fmul_rn(p[i], decay), __fmul_rn(__fdiv_rn(m[i], denom), step_size));
    }
}

// The sum of squares of one f32 tensor into sums[slot], by one block of 256 threads in a
// fixed order (the same bits on every run). Launched once per tensor for the gradient norm.
extern "C" __global__ void sum_squares(const float* g, size_t n, float* sums, int slot) {
    __shared__ float partial[256];
    float acc = 0.f;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) acc = fmaf(g[i], g[i], acc);
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int width = blockDim.x / 2; width > 0; width /= 2) {
        if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
        __syncthreads();
    }
    if (threadIdx.x == 0) sums[slot] = partial[0];
}
