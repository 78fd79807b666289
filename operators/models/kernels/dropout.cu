// Inverted dropout with a stateless mask: element i of a call seeded s is kept when a
// SplitMix64 hash of (s, i) maps below 1 - p, so the backward pass (and a recomputed layer)
// draws the same mask from the seed alone, and nothing is stored. Launched by
// src/ops/dropout.rs.

#include "common.cuh"

__device__ __forceinline__ bool kept(unsigned long long seed, size_t i, float p) {
    unsigned long long z = seed + (i + 1) * 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    float u = (float)(z >> 40) * (1.f / 16777216.f);  // uniform in [0, 1), 24 bits
    return u >= p;
}

template <typename T>
__device__ void dropout(const T* __restrict__ x, T* __restrict__ out, size_t n,
                        unsigned long long seed, float p, float scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        out[i] = kept(seed, i, p) ? from_float<T>(to_float(x[i]) * scale) : from_float<T>(0.f);
    }
}

#define DROPOUT(NAME, T)                                                                       \
    extern "C" __global__ void NAME(const T* x, T* out, size_t n, unsigned long long seed,      \
                                    float p, float scale) {                                    \
        dropout<T>(x, out, n, seed, p, scale);                                                 \
    }
DROPOUT(dropout_f32, float)
DROPOUT(dropout_bf16, __nv_bfloat16)
DROPOUT(dropout_f16, __half)
