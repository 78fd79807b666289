// RMSNorm with transformers' rounding. Launched by src/ops/rms_norm.rs.

#include "common.cuh"

// RMSNorm over the last axis, one block per row, statistics in f32, weight in f32.
// Llama (gemma = 0): T(T(x * r) * w), the rounding of transformers' `w * x.to(dtype)`.
// Gemma (gemma = 1): T(x * r * w) with w = 1 + weight, all in f32.
template <typename T>
__device__ void rms_norm(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ out,
                         int cols, float eps, int gemma) {
    __shared__ float partial[32];
    const T* xr = x + (size_t)blockIdx.x * cols;
    T* orow = out + (size_t)blockIdx.x * cols;
    float sum = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = to_float(xr[c]);
        sum += v * v;
    }
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffff, sum, off);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
    __syncthreads();
    if (threadIdx.x < 32) {
        int warps = blockDim.x / 32;
        float v = threadIdx.x < warps ? partial[threadIdx.x] : 0.f;
        for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffff, v, off);
        if (threadIdx.x == 0) partial[0] = v;
    }
    __syncthreads();
    float r = rsqrtf(partial[0] / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = to_float(xr[c]) * r;
        orow[c] = gemma ? from_float<T>(v * w[c]) : from_float<T>(to_float(from_float<T>(v)) * w[c]);
    }
}

#define RMS(NAME, T)                                                                          \
    extern "C" __global__ void NAME(const T* x, const float* w, T* out, int cols, float eps,  \
                                    int gemma) {                                              \
        rms_norm<T>(x, w, out, cols, eps, gemma);                                             \
    }
RMS(rms_norm_f32, float)
RMS(rms_norm_bf16, __nv_bfloat16)
RMS(rms_norm_f16, __half)
