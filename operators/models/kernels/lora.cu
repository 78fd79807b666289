// The end of a LoRA projection, as PEFT computes it: out = T(f32(result) + update * scaling),
// one rounding to the model's type (PyTorch promotes the sum to f32 and PEFT casts it back
// once); under autocast, with the update in T: out = T(result + T(update * scaling)). And
// the backward's gradient of the update, f32(grad) * scaling (in f32 or rounded to T).
// Launched by src/ops/lora.rs.

#include "common.cuh"

template <typename T>
__device__ void lora_add(const T* __restrict__ result, const float* __restrict__ update,
                         T* __restrict__ out, size_t n, float scaling) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        out[i] = from_float<T>(__fadd_rn(to_float(result[i]), __fmul_rn(update[i], scaling)));
    }
}

#define LORA_ADD(NAME, T)                                                                      \
    extern "C" __global__ void NAME(const T* result, const float* update, T* out, size_t n,    \
                                    float scaling) {                                           \
        lora_add<T>(result, update, out, n, scaling);                                          \
    }
LORA_ADD(lora_add_f32, float)
LORA_ADD(lora_add_bf16, __nv_bfloat16)
LORA_ADD(lora_add_f16, __half)

// out = f32(x) * scaling: the update's gradient in one pass.
template <typename T>
__device__ void scaled_f32(const T* __restrict__ x, float* __restrict__ out, size_t n, float scaling) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        out[i] = __fmul_rn(to_float(x[i]), scaling);
    }
}

#define SCALED_F32(NAME, T)                                                                    \
    extern "C" __global__ void NAME(const T* x, float* out, size_t n, float scaling) {         \
        scaled_f32<T>(x, out, n, scaling);                                                     \
    }
SCALED_F32(scaled_f32_f32, float)
SCALED_F32(scaled_f32_bf16, __nv_bfloat16)
SCALED_F32(scaled_f32_f16, __half)

// Autocast's order: the scaled update rounded to T, then the sum.
template <typename T>
__device__ void lora_add_rounded(const T* __restrict__ result, const T* __restrict__ update,
                                 T* __restrict__ out, size_t n, float scaling) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float scaled = to_float(from_float<T>(__fmul_rn(to_float(update[i]), scaling)));
        out[i] = from_float<T>(__fadd_rn(to_float(result[i]), scaled));
    }
}

#define LORA_ADD_ROUNDED(NAME, T)                                                              \
    extern "C" __global__ void NAME(const T* result, const T* update, T* out, size_t n,        \
                                    float scaling) {                                           \
        lora_add_rounded<T>(result, update, out, n, scaling);                                  \
    }
LORA_ADD_ROUNDED(lora_add_rounded_bf16, __nv_bfloat16)
LORA_ADD_ROUNDED(lora_add_rounded_f16, __half)

// out = T(f32(x) * scaling): autocast's update gradient.
template <typename T>
__device__ void scaled_same(const T* __restrict__ x, T* __restrict__ out, size_t n, float scaling) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        out[i] = from_float<T>(__fmul_rn(to_float(x[i]), scaling));
    }
}

#define SCALED_SAME(NAME, T)                                                                   \
    extern "C" __global__ void NAME(const T* x, T* out, size_t n, float scaling) {             \
        scaled_same<T>(x, out, n, scaling);                                                    \
    }
SCALED_SAME(scaled_same_bf16, __nv_bfloat16)
SCALED_SAME(scaled_same_f16, __half)
