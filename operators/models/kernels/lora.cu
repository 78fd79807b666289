// The end of a LoRA projection, as PEFT computes it: out = T(f32(result) + update * scaling),
// one rounding to the model's type (PyTorch promotes the sum to f32 and PEFT casts it back
// once). Launched by src/ops/lora.rs.

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
