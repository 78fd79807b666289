// What every arenaflow kernel shares: f32 <-> element-type conversions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
// Rounded to T, saturating at f16's largest finite value (65504) rather than overflowing to
// infinity: Gemma-2's f16 forward (src/ops/mod.rs, F16_MAX).
template <typename T> __device__ __forceinline__ T from_float_saturating(float x) { return from_float<T>(x); }
template <> __device__ __forceinline__ __half from_float_saturating<__half>(float x) {
    // fmaxf/fminf would turn a NaN into a bound: keep it NaN, as the CPU's clamp does.
    return isnan(x) ? __float2half(x) : __float2half(fminf(fmaxf(x, -65504.f), 65504.f));
}
