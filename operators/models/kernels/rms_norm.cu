// RMSNorm with transformers' rounding, and its backward pass for the input (the weight is
// frozen in LoRA training). Launched by src/ops/rms_norm.rs.

#include "common.cuh"

// RMSNorm over the last axis, one block per row, statistics in f32, weight in f32.
// Llama (gemma = 0): T(T(x * r) * w), the rounding of transformers' `w * x.to(dtype)`.
// Gemma (gemma = 1): T(x * r * w) with w = 1 + weight, all in f32, saturating in f16.
// The sum over the block's threads of one value per thread (every thread gets it).
__device__ __forceinline__ float block_sum(float v, float* partial) {
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffff, v, off);
    __syncthreads();  // partial may still be read from a previous call
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        int warps = blockDim.x / 32;
        float u = threadIdx.x < warps ? partial[threadIdx.x] : 0.f;
        for (int off = 16; off > 0; off /= 2) u += __shfl_xor_sync(0xffffffff, u, off);
        if (threadIdx.x == 0) partial[0] = u;
    }
    __syncthreads();
    return partial[0];
}

// The forward kernels read and write a row in chunks of 16 bytes (8 bf16/f16 or 4 f32
// values): thread t takes chunks t, t + blockDim, ..., and sums each chunk's squares in
// column order. A row that is not 16-byte aligned, or whose width is not a whole number of
// chunks, takes the same chunks element by element: the same sums in the same order, so
// both paths give the same bits (and add_rms_norm gives rms_norm's over its sum).
template <typename T>
struct Chunk {
    static constexpr int N = 16 / sizeof(T);
    alignas(16) T v[N];
};

template <typename T>
__device__ __forceinline__ bool whole_chunks(int cols, const void* p, const void* q,
                                             const void* r, const void* s) {
    uintptr_t any = (uintptr_t)p | (uintptr_t)q | (uintptr_t)r | (uintptr_t)s;
    return cols % Chunk<T>::N == 0 && any % 16 == 0;
}

// Chunk `k` of a row: its valid values (n of them, the rest zero).
template <typename T>
__device__ __forceinline__ int load_chunk(const T* row, int k, int cols, bool vec, Chunk<T>& c) {
    constexpr int N = Chunk<T>::N;
    if (vec) {
        *reinterpret_cast<uint4*>(c.v) = *reinterpret_cast<const uint4*>(row + k * N);
        return N;
    }
    int n = min(N, cols - k * N);
#pragma unroll
    for (int j = 0; j < N; ++j) c.v[j] = j < n ? row[k * N + j] : from_float<T>(0.f);
    return n;
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* row, int k, int n, bool vec, const Chunk<T>& c) {
    constexpr int N = Chunk<T>::N;
    if (vec) {
        *reinterpret_cast<uint4*>(row + k * N) = *reinterpret_cast<const uint4*>(c.v);
        return;
    }
#pragma unroll
    for (int j = 0; j < N; ++j)
        if (j < n) row[k * N + j] = c.v[j];
}

template <typename T>
__device__ __forceinline__ int chunks_of(int cols) {
    return (cols + Chunk<T>::N - 1) / Chunk<T>::N;
}

// A row times r, then the weight, rounded as the style asks.
template <typename T>
__device__ __forceinline__ void normalise_row(const T* xr, const float* __restrict__ w, T* orow,
                                              int cols, float r, int gemma, bool vec) {
    constexpr int N = Chunk<T>::N;
    for (int k = threadIdx.x; k < chunks_of<T>(cols); k += blockDim.x) {
        Chunk<T> c;
        int n = load_chunk(xr, k, cols, vec, c);
        alignas(16) float wc[N];
        if (vec) {
#pragma unroll
            for (int q = 0; q < N; q += 4)
                *reinterpret_cast<float4*>(wc + q) = *reinterpret_cast<const float4*>(w + k * N + q);
        } else {
#pragma unroll
            for (int j = 0; j < N; ++j) wc[j] = j < n ? w[k * N + j] : 0.f;
        }
#pragma unroll
        for (int j = 0; j < N; ++j) {
            float v = to_float(c.v[j]) * r;
            c.v[j] = gemma ? from_float_saturating<T>(v * wc[j])
                           : from_float<T>(to_float(from_float<T>(v)) * wc[j]);
        }
        store_chunk(orow, k, n, vec, c);
    }
}

template <typename T>
__device__ void rms_norm(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ out,
                         int cols, float eps, int gemma) {
    __shared__ float partial[32];
    const T* xr = x + (size_t)blockIdx.x * cols;
    T* orow = out + (size_t)blockIdx.x * cols;
    const bool vec = whole_chunks<T>(cols, x, out, w, w);
    float sum = 0.f;
    for (int k = threadIdx.x; k < chunks_of<T>(cols); k += blockDim.x) {
        Chunk<T> c;
        load_chunk(xr, k, cols, vec, c);
#pragma unroll
        for (int j = 0; j < Chunk<T>::N; ++j) {
            float v = to_float(c.v[j]);
            sum += v * v;
        }
    }
    float r = rsqrtf(block_sum(sum, partial) / cols + eps);
    normalise_row(xr, w, orow, cols, r, gemma, vec);
}

// The residual add and the RMSNorm after it, one block per row: s = T(a + b) (in f32,
// saturating in f16, as the composed add of src/layers/rms_norm.rs), written out, then
// rms_norm's arithmetic on the rounded s, which each thread reads back from its own
// writes (the same chunks, the same block size: the same sums as rms_norm over s).
// `both` is (2, rows, cols): s, then the normalised rows.
template <typename T>
__device__ void add_rms_norm(const T* __restrict__ a, const T* __restrict__ b,
                             const float* __restrict__ w, T* both, int cols, float eps,
                             int gemma) {
    __shared__ float partial[32];
    const size_t at = (size_t)blockIdx.x * cols;
    T* s = both;
    T* out = both + (size_t)gridDim.x * cols;
    const bool vec = whole_chunks<T>(cols, a, b, both, w);
    float sum = 0.f;
    for (int k = threadIdx.x; k < chunks_of<T>(cols); k += blockDim.x) {
        Chunk<T> ca, cb;
        int n = load_chunk(a + at, k, cols, vec, ca);
        load_chunk(b + at, k, cols, vec, cb);
#pragma unroll
        for (int j = 0; j < Chunk<T>::N; ++j) {
            T v = from_float_saturating<T>(to_float(ca.v[j]) + to_float(cb.v[j]));
            ca.v[j] = v;
            float f = to_float(v);
            sum += f * f;
        }
        store_chunk(s + at, k, n, vec, ca);
    }
    float r = rsqrtf(block_sum(sum, partial) / cols + eps);
    normalise_row(s + at, w, out + at, cols, r, gemma, vec);
}

#define ADD_RMS(NAME, T)                                                                      \
    extern "C" __global__ void NAME(const T* a, const T* b, const float* w, T* both, int cols, \
                                    float eps, int gemma) {                                    \
        add_rms_norm<T>(a, b, w, both, cols, eps, gemma);                                      \
    }
ADD_RMS(add_rms_norm_f32, float)
ADD_RMS(add_rms_norm_bf16, __nv_bfloat16)
ADD_RMS(add_rms_norm_f16, __half)

#define RMS(NAME, T)                                                                          \
    extern "C" __global__ void NAME(const T* x, const float* w, T* out, int cols, float eps,  \
                                    int gemma) {                                              \
        rms_norm<T>(x, w, out, cols, eps, gemma);                                             \
    }
// dx of y = x * r * w, r = (mean(x^2) + eps)^-1/2, per row:
// dx = r * (w dy) - x * r^3 * sum(w dy x) / cols, in f32.
template <typename T>
__device__ void rms_norm_backward(const T* __restrict__ x, const T* __restrict__ dy,
                                  const float* __restrict__ w, T* __restrict__ dx, int cols,
                                  float eps) {
    __shared__ float partial[32];
    const size_t at = (size_t)blockIdx.x * cols;
    float squares = 0.f, dot = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = to_float(x[at + c]);
        squares += v * v;
        dot += w[c] * to_float(dy[at + c]) * v;
    }
    squares = block_sum(squares, partial);
    dot = block_sum(dot, partial);
    float r = rsqrtf(squares / cols + eps);
    float k = r * r * r * dot / cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        dx[at + c] = from_float<T>(r * w[c] * to_float(dy[at + c]) - to_float(x[at + c]) * k);
    }
}

#define RMS_BACKWARD(NAME, T)                                                                 \
    extern "C" __global__ void NAME(const T* x, const T* dy, const float* w, T* dx, int cols, \
                                    float eps) {                                              \
        rms_norm_backward<T>(x, dy, w, dx, cols, eps);                                        \
    }
RMS_BACKWARD(rms_norm_backward_f32, float)
RMS_BACKWARD(rms_norm_backward_bf16, __nv_bfloat16)
RMS_BACKWARD(rms_norm_backward_f16, __half)

RMS(rms_norm_f32, float)
RMS(rms_norm_bf16, __nv_bfloat16)
RMS(rms_norm_f16, __half)
