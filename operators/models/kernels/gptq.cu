// A GPTQ weight dequantized in one pass (src/ops/gptq.rs):
// w[o, c] = T((code[o, c] - zero[g, o]) * scale[g, o]), g = g_idx[c], in f32, rounded once.

#include "common.cuh"

// codes: out x in (one byte each); params: 2 x groups x out, f32 (scales, then zeros); g_idx: in.
template <typename T>
__device__ void gptq_dequantize(const unsigned char* __restrict__ codes, const float* __restrict__ params,
                                const unsigned int* __restrict__ g_idx, T* __restrict__ w,
                                unsigned int out, unsigned int in, unsigned int groups) {
    const size_t n = (size_t)out * in;
    const float* zeros = params + (size_t)groups * out;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        unsigned int o = i / in, c = i % in;
        unsigned int g = g_idx[c];
        if (g >= groups) {
            w[i] = from_float<T>(0.f);
            continue;
        }
        size_t at = (size_t)g * out + o;
        // Subtract, then multiply, each rounded in f32 as the CPU side does (no FMA).
        float centred = __fsub_rn((float)codes[i], zeros[at]);
        w[i] = from_float<T>(__fmul_rn(centred, params[at]));
    }
}

#define DEQUANTIZE(NAME, T)                                                                     \
    extern "C" __global__ void NAME(const unsigned char* codes, const float* params,            \
                                    const unsigned int* g_idx, T* w, unsigned int out,          \
                                    unsigned int in, unsigned int groups) {                     \
        gptq_dequantize<T>(codes, params, g_idx, w, out, in, groups);                           \
    }
DEQUANTIZE(gptq_dequantize_f32, float)
DEQUANTIZE(gptq_dequantize_bf16, __nv_bfloat16)
DEQUANTIZE(gptq_dequantize_f16, __half)
