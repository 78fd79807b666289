// The backward pass of the fused attention (attention.cu), flash-attention-2 style: the
// probabilities are recomputed tile by tile from the forward's log-sum-exp, so the scores
// never reach device memory. Same layouts as the forward: q, dout, dq (b, s, nh, d); k, v,
// dk, dv (b, s, nkv, d); lse and delta (b, nh, s) f32; bounds (b, 2) u32, each row's real
// span. Queries outside their row's span take no part (the forward's output there is not
// read by the model, so its gradient is zero).
//
// With y = softcap * tanh(scale * q.k / softcap) (or scale * q.k without a soft-cap),
// p = exp(y - lse) and delta_i = sum_c dout_ic * out_ic:
//   dv_j = sum_i p_ij dout_i,   dp_ij = dout_i . v_j,   dy_ij = p_ij (dp_ij - delta_i),
//   ds_ij = dy_ij * scale * (1 - (y_ij / softcap)^2),   dk_j = sum_i ds_ij q_i,
//   dq_i = sum_j ds_ij k_j.
// Three kernels: delta per query; dk and dv per key tile (looping over the queries of every
// query head of its KV head that can see it); dq per query tile. Each output is written by
// one thread, in a fixed order: the gradients are the same bits on every run.
// Launched by src/ops/attention.rs.

#include "common.cuh"

__device__ __forceinline__ bool visible(int q, int k, int start, int end, int window) {
    return k <= q && k >= start && k < end && (window <= 0 || q - k < window);
}

// Two consecutive elements as f32.
__device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load2(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}
__device__ __forceinline__ float2 load2(const __half* p) {
    return __half22float2(*reinterpret_cast<const __half2*>(p));
}

// delta_i = dout_i . out_i: one warp per (query, head); zero outside the row's span.
template <typename T>
__device__ void attention_bwd_delta(const T* __restrict__ out, const T* __restrict__ dout,
                                    const uint32_t* __restrict__ bounds, float* __restrict__ delta,
                                    int s, int nh, int d) {
    const int lane = threadIdx.x % 32;
    const int query = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int head = blockIdx.y, row = blockIdx.z;
    if (query >= s) return;
    const int start = bounds[2 * row], end = bounds[2 * row + 1];
    float sum = 0.f;
    if (query >= start && query < end) {
        size_t at = ((size_t)row * s + query) * nh * d + (size_t)head * d;
        for (int c = lane; c < d; c += 32) sum += to_float(dout[at + c]) * to_float(out[at + c]);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffff, sum, off);
    if (lane == 0) delta[((size_t)row * nh + head) * s + query] = sum;
}

// Shared-memory tiles: B rows of up to DM columns (zeros past d), rows DM + 2 elements apart
// so that the lanes of a warp reading one column of different rows hit different banks.
template <typename T, int DM, int B> struct Tiles {
    static constexpr int ST = DM + 2;
    T a[B][ST];  // dkdv: q; dq: k
    T b[B][ST];  // dkdv: dout; dq: v
    T c[B][ST];  // dkdv: k; dq: q
    T e[B][ST];  // dkdv: v; dq: dout
    float p[B][B + 1];
    float ds[B][B + 1];
    float lse[B];
    float delta[B];
};

// Rows first..first+B of a (b, s, heads, d) tensor's head `head` of row `row` into tile,
// zeros for rows at or past `limit` and columns past d.
template <typename T, int DM, int B>
__device__ __forceinline__ void stage(T (*tile)[DM + 2], const T* __restrict__ src, int row, int s,
                                      int heads, int head, int d, int first, int limit) {
    for (int i = threadIdx.x; i < B * DM / 2; i += blockDim.x) {
        int r = i / (DM / 2), c = (i % (DM / 2)) * 2;
        int at = first + r;
        T x0 = from_float<T>(0.f), x1 = from_float<T>(0.f);
        if (at < limit && c < d) {
            const T* p = src + (((size_t)row * s + at) * heads + head) * d + c;
            x0 = p[0];
            x1 = p[1];
        }
        tile[r][c] = x0;
        tile[r][c + 1] = x1;
    }
}

template <typename T, int DM>
__device__ __forceinline__ float dot(const T* x, const T* y, int d) {
    float acc = 0.f;
#pragma unroll 4
    for (int c = 0; c < d; c += 2) {
        float2 a = load2(x + c), b = load2(y + c);
        acc = fmaf(a.x, b.x, acc);
        acc = fmaf(a.y, b.y, acc);
    }
    return acc;
}

// p and ds of the B x B pairs (queries i0.., keys j0..) of one tile pair, into t.p, t.ds.
// q rows in qt, dout rows in dot_, k rows in kt, v rows in vt; lse and delta in t.
template <typename T, int DM, int B>
__device__ __forceinline__ void pair_tile(Tiles<T, DM, B>& t, T (*qt)[DM + 2], T (*dt)[DM + 2],
                                          T (*kt)[DM + 2], T (*vt)[DM + 2], int i0, int j0,
                                          int qlimit, int start, int end, int window, int d,
                                          float scale, float softcap) {
    for (int e = threadIdx.x; e < B * B; e += blockDim.x) {
        int ii = e / B, jj = e % B;
        int i = i0 + ii, j = j0 + jj;
        float p = 0.f, ds = 0.f;
        if (i < qlimit && i >= start && visible(i, j, start, end, window)) {
            float y = scale * dot<T, DM>(qt[ii], kt[jj], d);
            float slope = scale;
            if (softcap > 0.f) {
                float th = tanhf(y / softcap);
                y = softcap * th;
                slope = scale * (1.f - th * th);
            }
            p = __expf(y - t.lse[ii]);
            float dp = dot<T, DM>(dt[ii], vt[jj], d);
            ds = p * (dp - t.delta[ii]) * slope;
        }
        t.p[ii][jj] = p;
        t.ds[ii][jj] = ds;
    }
}

// dk, dv of keys j0..j0+B of one KV head: blockIdx.x key tile, blockIdx.y KV head, blockIdx.z
// row; 256 threads. Thread (warp w, lane l) owns keys j0 + w + 8n and columns l + 32m.
template <typename T, int DM, int B>
__device__ void attention_bwd_dkdv(const T* __restrict__ q, const T* __restrict__ k,
                                   const T* __restrict__ v, const T* __restrict__ dout,
                                   const float* __restrict__ lse, const float* __restrict__ delta,
                                   const uint32_t* __restrict__ bounds, T* __restrict__ dk,
                                   T* __restrict__ dv, int s, int nh, int nkv, int d, float scale,
                                   float softcap, int window) {
    constexpr int NJ = B / 8, NC = DM / 32;
    __shared__ __align__(16) Tiles<T, DM, B> t;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int j0 = blockIdx.x * B, kvh = blockIdx.y, row = blockIdx.z;
    const int start = bounds[2 * row], end = bounds[2 * row + 1];
    const int group = nh / nkv;
    float acc_k[NJ][NC], acc_v[NJ][NC];
#pragma unroll
    for (int n = 0; n < NJ; n++)
#pragma unroll
        for (int m = 0; m < NC; m++) acc_k[n][m] = acc_v[n][m] = 0.f;

    if (j0 < end && j0 + B > start) {
        stage<T, DM, B>(t.c, k, row, s, nkv, kvh, d, j0, end);
        stage<T, DM, B>(t.e, v, row, s, nkv, kvh, d, j0, end);
        // Queries that see some key of the tile: [max(j0, start), qhi).
        const int qlo = max(j0, start);
        int qhi = end;
        if (window > 0) qhi = min(qhi, j0 + B - 1 + window);
        for (int h = 0; h < group; h++) {
            const int head = kvh * group + h;
            const float* lse_h = lse + ((size_t)row * nh + head) * s;
            const float* delta_h = delta + ((size_t)row * nh + head) * s;
            for (int i0 = qlo; i0 < qhi; i0 += B) {
                __syncthreads();  // the previous query tile is no longer read
                stage<T, DM, B>(t.a, q, row, s, nh, head, d, i0, qhi);
                stage<T, DM, B>(t.b, dout, row, s, nh, head, d, i0, qhi);
                for (int r = threadIdx.x; r < B; r += blockDim.x) {
                    bool real = i0 + r < qhi;
                    t.lse[r] = real ? lse_h[i0 + r] : 0.f;
                    t.delta[r] = real ? delta_h[i0 + r] : 0.f;
                }
                __syncthreads();
                pair_tile<T, DM, B>(t, t.a, t.b, t.c, t.e, i0, j0, qhi, start, end, window, d, scale,
                                    softcap);
                __syncthreads();
                for (int ii = 0; ii < B; ii++) {
                    float dov[NC], qv[NC];
#pragma unroll
                    for (int m = 0; m < NC; m++) {
                        dov[m] = to_float(t.b[ii][lane + 32 * m]);
                        qv[m] = to_float(t.a[ii][lane + 32 * m]);
                    }
#pragma unroll
                    for (int n = 0; n < NJ; n++) {
                        float p = t.p[ii][warp + 8 * n], ds = t.ds[ii][warp + 8 * n];
#pragma unroll
                        for (int m = 0; m < NC; m++) {
                            acc_v[n][m] = fmaf(p, dov[m], acc_v[n][m]);
                            acc_k[n][m] = fmaf(ds, qv[m], acc_k[n][m]);
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int n = 0; n < NJ; n++) {
        int j = j0 + warp + 8 * n;
        if (j >= s) continue;
        size_t at = ((size_t)row * s + j) * nkv * d + (size_t)kvh * d;
#pragma unroll
        for (int m = 0; m < NC; m++) {
            int c = lane + 32 * m;
            if (c < d) {
                dk[at + c] = from_float<T>(acc_k[n][m]);
                dv[at + c] = from_float<T>(acc_v[n][m]);
            }
        }
    }
}

// dq of queries i0..i0+B of one head: blockIdx.x query tile, blockIdx.y head, blockIdx.z
// row; 256 threads. Thread (warp w, lane l) owns queries i0 + w + 8n and columns l + 32m.
template <typename T, int DM, int B>
__device__ void attention_bwd_dq(const T* __restrict__ q, const T* __restrict__ k,
                                 const T* __restrict__ v, const T* __restrict__ dout,
                                 const float* __restrict__ lse, const float* __restrict__ delta,
                                 const uint32_t* __restrict__ bounds, T* __restrict__ dq, int s,
                                 int nh, int nkv, int d, float scale, float softcap, int window) {
    constexpr int NI = B / 8, NC = DM / 32;
    __shared__ __align__(16) Tiles<T, DM, B> t;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int i0 = blockIdx.x * B, head = blockIdx.y, row = blockIdx.z;
    const int kvh = head / (nh / nkv);
    const int start = bounds[2 * row], end = bounds[2 * row + 1];
    float acc[NI][NC];
#pragma unroll
    for (int n = 0; n < NI; n++)
#pragma unroll
        for (int m = 0; m < NC; m++) acc[n][m] = 0.f;

    if (i0 < end && i0 + B > start) {
        const int qhi = min(end, i0 + B);
        stage<T, DM, B>(t.c, q, row, s, nh, head, d, i0, qhi);
        stage<T, DM, B>(t.e, dout, row, s, nh, head, d, i0, qhi);
        const float* lse_h = lse + ((size_t)row * nh + head) * s;
        const float* delta_h = delta + ((size_t)row * nh + head) * s;
        for (int r = threadIdx.x; r < B; r += blockDim.x) {
            bool real = i0 + r < qhi && i0 + r >= start;
            t.lse[r] = real ? lse_h[i0 + r] : 0.f;
            t.delta[r] = real ? delta_h[i0 + r] : 0.f;
        }
        // Keys the tile's queries see: [klo, qhi).
        int klo = start;
        if (window > 0) klo = max(klo, i0 - window + 1);
        for (int j0 = klo; j0 < qhi; j0 += B) {
            __syncthreads();  // the previous key tile is no longer read
            stage<T, DM, B>(t.a, k, row, s, nkv, kvh, d, j0, end);
            stage<T, DM, B>(t.b, v, row, s, nkv, kvh, d, j0, end);
            __syncthreads();
            pair_tile<T, DM, B>(t, t.c, t.e, t.a, t.b, i0, j0, qhi, start, end, window, d, scale,
                                softcap);
            __syncthreads();
            for (int jj = 0; jj < B; jj++) {
                float kv[NC];
#pragma unroll
                for (int m = 0; m < NC; m++) kv[m] = to_float(t.a[jj][lane + 32 * m]);
#pragma unroll
                for (int n = 0; n < NI; n++) {
                    float ds = t.ds[warp + 8 * n][jj];
#pragma unroll
                    for (int m = 0; m < NC; m++) acc[n][m] = fmaf(ds, kv[m], acc[n][m]);
                }
            }
        }
    }
#pragma unroll
    for (int n = 0; n < NI; n++) {
        int i = i0 + warp + 8 * n;
        if (i >= s) continue;
        size_t at = ((size_t)row * s + i) * nh * d + (size_t)head * d;
#pragma unroll
        for (int m = 0; m < NC; m++) {
            int c = lane + 32 * m;
            if (c < d) dq[at + c] = from_float<T>(acc[n][m]);
        }
    }
}

#define DELTA(NAME, T)                                                                         \
    extern "C" __global__ void NAME(const T* out, const T* dout, const uint32_t* bounds,        \
                                    float* delta, int s, int nh, int d) {                      \
        attention_bwd_delta<T>(out, dout, bounds, delta, s, nh, d);                            \
    }
DELTA(attention_bwd_delta_f32, float)
DELTA(attention_bwd_delta_bf16, __nv_bfloat16)
DELTA(attention_bwd_delta_f16, __half)

// Tile sizes: B queries x B keys, as large as 48 KiB of static shared memory allows.
#define GRADS(SUFFIX, T, DM, B)                                                                \
    extern "C" __global__ void __launch_bounds__(256) attention_bwd_dkdv_##SUFFIX(              \
        const T* q, const T* k, const T* v, const T* dout, const float* lse,                    \
        const float* delta, const uint32_t* bounds, T* dk, T* dv, int s, int nh, int nkv, int d, \
        float scale, float softcap, int window) {                                              \
        attention_bwd_dkdv<T, DM, B>(q, k, v, dout, lse, delta, bounds, dk, dv, s, nh, nkv, d,  \
                                     scale, softcap, window);                                  \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) attention_bwd_dq_##SUFFIX(                \
        const T* q, const T* k, const T* v, const T* dout, const float* lse,                    \
        const float* delta, const uint32_t* bounds, T* dq, int s, int nh, int nkv, int d,       \
        float scale, float softcap, int window) {                                              \
        attention_bwd_dq<T, DM, B>(q, k, v, dout, lse, delta, bounds, dq, s, nh, nkv, d, scale, \
                                   softcap, window);                                           \
    }
GRADS(f32_d64, float, 64, 32)
GRADS(f32_d128, float, 128, 16)
GRADS(f32_d256, float, 256, 8)
GRADS(bf16_d64, __nv_bfloat16, 64, 32)
GRADS(bf16_d128, __nv_bfloat16, 128, 32)
GRADS(bf16_d256, __nv_bfloat16, 256, 16)
GRADS(f16_d64, __half, 64, 32)
GRADS(f16_d128, __half, 128, 32)
GRADS(f16_d256, __half, 256, 16)
