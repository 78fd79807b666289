// The gated activation of the MLP. Launched by src/ops/gated.rs.

#include "common.cuh"

// act(gate) * up in one pass, each step rounded to T as PyTorch does it.
// kind 0: silu, 1: gelu (tanh approximation), 2: gelu (erf).
__device__ __forceinline__ float activate(float g, int kind) {
    if (kind == 0) return g / (1.f + __expf(-g));
    if (kind == 1) {
        const float c = 0.7978845608028654f;  // sqrt(2 / pi)
        return 0.5f * g * (1.f + tanhf(c * (g + 0.044715f * g * g * g)));
    }
    return 0.5f * g * (1.f + erff(g * 0.7071067811865476f));
}

template <typename T>
__device__ void gated(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out,
                      size_t n, int kind) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float a = to_float(from_float<T>(activate(to_float(gate[i]), kind)));
        out[i] = from_float<T>(a * to_float(up[i]));
    }
}

#define GATED(NAME, T)                                                                         \
    extern "C" __global__ void NAME(const T* gate, const T* up, T* out, size_t n, int kind) {  \
        gated<T>(gate, up, out, n, kind);                                                      \
    }
GATED(gated_f32, float)
GATED(gated_bf16, __nv_bfloat16)
GATED(gated_f16, __half)
