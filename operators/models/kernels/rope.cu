// Rotary position embedding over (b, s, heads, d) in the non-interleaved (GPT-NeoX) form,
// with cos and sin (s, d / 2): for i < d / 2,
//   y_i = x_i cos - x_{i+d/2} sin,   y_{i+d/2} = x_{i+d/2} cos + x_i sin.
// sign -1 rotates back (sin negated): the backward pass of sign +1. Computed in f32.
// Launched by src/ops/rope.rs.

#include "common.cuh"

template <typename T>
__device__ void rope_thd(const T* __restrict__ x, const T* __restrict__ cos,
                         const T* __restrict__ sin, T* __restrict__ out, int s, int heads, int d,
                         size_t pairs, float sign) {
    const int half = d / 2;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < pairs;
         i += (size_t)gridDim.x * blockDim.x) {
        int c = i % half;
        size_t vec = i / half;  // (row, position, head)
        int pos = (vec / heads) % s;
        float cs = to_float(cos[pos * half + c]), sn = sign * to_float(sin[pos * half + c]);
        size_t at = vec * d + c;
        float a = to_float(x[at]), b = to_float(x[at + half]);
        out[at] = from_float<T>(a * cs - b * sn);
        out[at + half] = from_float<T>(b * cs + a * sn);
    }
}

#define ROPE(NAME, T)                                                                          \
    extern "C" __global__ void NAME(const T* x, const T* cos, const T* sin, T* out, int s,      \
                                    int heads, int d, size_t pairs, float sign) {              \
        rope_thd<T>(x, cos, sin, out, s, heads, d, pairs, sign);                               \
    }
ROPE(rope_thd_f32, float)
ROPE(rope_thd_bf16, __nv_bfloat16)
ROPE(rope_thd_f16, __half)
