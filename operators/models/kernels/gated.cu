// The gated activation of the MLP and its backward pass. Launched by src/ops/gated.rs.

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

// The derivative of the activation at g, as PyTorch's silu_backward and gelu_backward
// compute it (in f32).
__device__ __forceinline__ float activate_slope(float g, int kind) {
    if (kind == 0) {
        float sig = 1.f / (1.f + __expf(-g));
        return sig * (1.f + g * (1.f - sig));
    }
    if (kind == 1) {
        const float beta = 0.7978845608028654f, kappa = 0.044715f;
        float th = tanhf(beta * (g + kappa * g * g * g));
        return 0.5f * (1.f + th) + 0.5f * g * (1.f - th * th) * beta * (1.f + 3.f * kappa * g * g);
    }
    const float alpha = 0.3989422804014327f;  // 1 / sqrt(2 pi)
    return 0.5f * (1.f + erff(g * 0.7071067811865476f)) + g * __expf(-0.5f * g * g) * alpha;
}

// The backward of out = round(round(act(gate)) * up) in one pass, rounded where PyTorch's
// autograd rounds: d_up = round(grad * round(act(gate))), d_act = round(grad * up),
// d_gate = round(d_act * act'(gate)). d_gate goes to out[0, n), d_up to out[n, 2n).
template <typename T>
__device__ void gated_backward(const T* __restrict__ gate, const T* __restrict__ up,
                               const T* __restrict__ grad, T* __restrict__ out, size_t n,
                               int kind) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float g = to_float(gate[i]), dy = to_float(grad[i]);
        float a = to_float(from_float<T>(activate(g, kind)));
        float da = to_float(from_float<T>(dy * to_float(up[i])));
        out[i] = from_float<T>(da * activate_slope(g, kind));
        out[n + i] = from_float<T>(dy * a);
    }
}

#define GATED_BACKWARD(NAME, T)                                                                \
    extern "C" __global__ void NAME(const T* gate, const T* up, const T* grad, T* out, size_t n, \
                                    int kind) {                                                \
        gated_backward<T>(gate, up, grad, out, n, kind);                                       \
    }
GATED_BACKWARD(gated_backward_f32, float)
GATED_BACKWARD(gated_backward_bf16, __nv_bfloat16)
GATED_BACKWARD(gated_backward_f16, __half)
