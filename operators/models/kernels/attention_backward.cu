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
// one thread, in a fixed order: the gradients are the same bits on every run. Two versions
// of the last two: on tensor cores (bf16 and f16, head sizes 64, 128 and 256: mma.sync, as
// the forward's attention_mma) and in plain f32 arithmetic (every dtype and head size).
// Launched by src/ops/attention.rs.

#include "common.cuh"
#include "mma.cuh"

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

// ---------------------------------------------------------------------------------------
// Tensor-core backward for bf16/f16 and head sizes 64, 128 and 256: the same arithmetic on
// mma.sync m16n8k16 with f32 accumulators. P and dS are rounded to the element type for
// their products with dout, q and k (as flash-attention-2 does); scores, probabilities,
// their gradients and every sum stay f32. 4 warps a block; the tiles in dynamic shared
// memory (MmaTiles: over 48 KiB at head size 256, where the launch raises the function's
// limit), rows padded by 8 elements (16 bytes: conflict-free fragment loads, 16-byte
// aligned rows for ldmatrix). At head size 256 a thread cannot hold the accumulators of
// both dK and dV (256 floats): they are two launches (PARTS), the dK one recomputing S;
// and the dq kernel reads q's and dout's fragments from shared tiles, not registers.

// The tiles of the tensor-core kernels, in elements; src/ops/attention.rs sizes the launch's
// dynamic shared memory by the same numbers (mma_backward_shared), and each kernel traps
// where it got less (need_shared).
template <int D> struct MmaTiles {
    static constexpr int ST = D + 8;  // a row, padded
    // dk/dv: 64 keys a block (16 a warp), the queries 16 at a time; tiles k, v, q, dout.
    static constexpr int KV_BN = 64, KV_BM = 16;
    static constexpr int KV_ELEMS = (2 * KV_BN + 2 * KV_BM) * ST;
    // dq: 64 queries a block (16 a warp), the keys Q_BN at a time; tiles k, v and, at head
    // size 256, the block's q and dout.
    static constexpr bool Q_IN_SHARED = D > 128;
    static constexpr int Q_BM = 64, Q_BN = D > 128 ? 32 : 64;
    static constexpr int Q_ELEMS = (2 * Q_BN + (Q_IN_SHARED ? 2 * Q_BM : 0)) * ST;
};

// Which gradients a dk/dv launch computes.
constexpr int PART_DV = 1, PART_DK = 2, PART_BOTH = 3;

// A launch with less dynamic shared memory than the kernel's tiles traps instead of
// reading past it.
__device__ __forceinline__ void need_shared(uint32_t bytes) {
    uint32_t have;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < bytes) __trap();
}

// The A operand (16 x 16, k-step t) of rows r0..r0+16 of a row-major shared tile.
template <typename T, int ST>
__device__ __forceinline__ void load_a(uint32_t* a, const T (*tile)[ST], int r0, int t) {
    const int lane = threadIdx.x % 32;
    const T* p0 = &tile[r0 + lane / 4][t * 16 + (lane % 4) * 2];
    const T* p1 = p0 + 8 * ST;
    a[0] = *reinterpret_cast<const uint32_t*>(p0);
    a[1] = *reinterpret_cast<const uint32_t*>(p1);
    a[2] = *reinterpret_cast<const uint32_t*>(p0 + 8);
    a[3] = *reinterpret_cast<const uint32_t*>(p1 + 8);
}

// The B operand (16 x 8, k-step t) whose 8 columns are rows c0..c0+8 of a row-major shared
// tile (the tile holds B transposed: one row per column of B).
template <typename T, int ST>
__device__ __forceinline__ void load_b(uint32_t* b, const T (*tile)[ST], int c0, int t) {
    const int lane = threadIdx.x % 32;
    const T* p = &tile[c0 + lane / 4][t * 16 + (lane % 4) * 2];
    b[0] = *reinterpret_cast<const uint32_t*>(p);
    b[1] = *reinterpret_cast<const uint32_t*>(p + 8);
}

// Rows first..first+R of a (b, s, heads, D) tensor's head `head` of row `row` into a shared
// tile in 16-byte chunks, zeros for rows before `lower` or at or past `limit` (padding
// positions never reach a product, even as 0 x their values).
template <typename T, int D, int R, int ST>
__device__ __forceinline__ void stage_rows(T (*tile)[ST], const T* __restrict__ src, int row, int s,
                                           int heads, int head, int first, int lower, int limit) {
    constexpr int CHUNKS = R * D / 8;
    for (int i = threadIdx.x; i < CHUNKS; i += blockDim.x) {
        int r = i / (D / 8), c = (i % (D / 8)) * 8;
        int at = first + r;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (at >= lower && at < limit) val = *reinterpret_cast<const uint4*>(src + (((size_t)row * s + at) * heads + head) * D + c);
        *reinterpret_cast<uint4*>(&tile[r][c]) = val;
    }
}

// p and ds of one score y (before scaling) and its dp, for a pair that is seen; lse and
// delta of the pair's query.
__device__ __forceinline__ void prob_and_grad(float y, float dp, float lse, float delta, float scale,
                                              float softcap, float& p, float& ds) {
    y *= scale;
    float slope = scale;
    if (softcap > 0.f) {
        float th = tanhf(y / softcap);
        y = softcap * th;
        slope = scale * (1.f - th * th);
    }
    p = __expf(y - lse);
    ds = p * (dp - delta) * slope;
}

// dk, dv of 64 keys of one KV head: blockIdx.x key tile, blockIdx.y KV head, blockIdx.z row.
// Warp w owns keys j0 + 16w..+16 (K and V tiles staged once); the queries that see them,
// of every query head of the group, come through shared memory 16 at a time: S^T = K Q^T
// and dP^T = V dO^T (16 keys x 16 queries), then dV += P^T dO and dK += dS^T Q. PARTS says
// which of dK and dV this launch computes and writes (the dV-only launch needs no V and
// no dP).
template <typename T, int D, int PARTS>
__device__ void attention_bwd_dkdv_mma(const T* __restrict__ q, const T* __restrict__ k,
                                       const T* __restrict__ v, const T* __restrict__ dout,
                                       const float* __restrict__ lse, const float* __restrict__ delta,
                                       const uint32_t* __restrict__ bounds, T* __restrict__ dk,
                                       T* __restrict__ dv, int s, int nh, int nkv, float scale,
                                       float softcap, int window) {
    using Tiles = MmaTiles<D>;
    constexpr int BN = Tiles::KV_BN, BM = Tiles::KV_BM, ST = Tiles::ST, KSTEPS = D / 16, OT = D / 8;
    constexpr bool DV = (PARTS & PART_DV) != 0, DK = (PARTS & PART_DK) != 0;
    need_shared(Tiles::KV_ELEMS * sizeof(T));
    extern __shared__ __align__(16) unsigned char smem[];
    T(*ks)[ST] = reinterpret_cast<T(*)[ST]>(smem);
    T(*vs)[ST] = ks + BN;
    T(*qs)[ST] = vs + BN;
    T(*dos)[ST] = qs + BM;
    __shared__ float lse_s[BM], delta_s[BM];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int j0 = blockIdx.x * BN, kvh = blockIdx.y, row = blockIdx.z;
    const int start = bounds[2 * row], end = bounds[2 * row + 1];
    const int group = nh / nkv;
    const int kr0 = warp * 16;                              // the warp's keys in the tile
    const int key0 = j0 + kr0 + lane / 4, key1 = key0 + 8;  // the thread's accumulator rows
    float acc_k[DK ? OT : 1][4], acc_v[DV ? OT : 1][4];
#pragma unroll
    for (int j = 0; j < OT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            if constexpr (DK) acc_k[j][e] = 0.f;
            if constexpr (DV) acc_v[j][e] = 0.f;
        }

    if (j0 < end && j0 + BN > start) {
        stage_rows<T, D, BN, ST>(ks, k, row, s, nkv, kvh, j0, start, end);
        if constexpr (DK) stage_rows<T, D, BN, ST>(vs, v, row, s, nkv, kvh, j0, start, end);
        // Queries that see some key of the tile: [max(j0, start), qhi).
        const int qlo = max(j0, start);
        int qhi = end;
        if (window > 0) qhi = min(qhi, j0 + BN - 1 + window);
        for (int h = 0; h < group; h++) {
            const int head = kvh * group + h;
            const float* lse_h = lse + ((size_t)row * nh + head) * s;
            const float* delta_h = delta + ((size_t)row * nh + head) * s;
            for (int i0 = qlo; i0 < qhi; i0 += BM) {
                __syncthreads();  // the previous query tile is no longer read
                stage_rows<T, D, BM, ST>(qs, q, row, s, nh, head, i0, qlo, qhi);
                stage_rows<T, D, BM, ST>(dos, dout, row, s, nh, head, i0, qlo, qhi);
                for (int r = threadIdx.x; r < BM; r += blockDim.x) {
                    bool real = i0 + r < qhi;
                    lse_s[r] = real ? lse_h[i0 + r] : 0.f;
                    delta_s[r] = real ? delta_h[i0 + r] : 0.f;
                }
                __syncthreads();
                float st[2][4], dpt[2][4];
#pragma unroll
                for (int n = 0; n < 2; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) st[n][e] = dpt[n][e] = 0.f;
#pragma unroll
                for (int t = 0; t < KSTEPS; t++) {
                    uint32_t ka[4], va[4];
                    load_a<T, ST>(ka, ks, kr0, t);
                    if constexpr (DK) load_a<T, ST>(va, vs, kr0, t);
#pragma unroll
                    for (int n = 0; n < 2; n++) {
                        uint32_t qb[2], db[2];
                        load_b<T, ST>(qb, qs, n * 8, t);
                        Mma<T>::run(st[n], ka, qb);
                        if constexpr (DK) {
                            load_b<T, ST>(db, dos, n * 8, t);
                            Mma<T>::run(dpt[n], va, db);
                        }
                    }
                }
                // P^T into st, dS^T into dpt; zero for the pairs not seen.
#pragma unroll
                for (int n = 0; n < 2; n++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int key = e < 2 ? key0 : key1;
                        const int qi = n * 8 + (lane % 4) * 2 + (e % 2);
                        const int query = i0 + qi;
                        float p = 0.f, ds = 0.f;
                        if (query < qhi && visible(query, key, start, end, window))
                            prob_and_grad(st[n][e], dpt[n][e], lse_s[qi], delta_s[qi], scale, softcap, p, ds);
                        st[n][e] = p;
                        dpt[n][e] = ds;
                    }
                }
                // The accumulators' layout is the A operand's (16 keys x 16 queries).
                uint32_t pa[4] = {Mma<T>::pack(st[0][0], st[0][1]), Mma<T>::pack(st[0][2], st[0][3]),
                                  Mma<T>::pack(st[1][0], st[1][1]), Mma<T>::pack(st[1][2], st[1][3])};
                uint32_t sa[4] = {Mma<T>::pack(dpt[0][0], dpt[0][1]), Mma<T>::pack(dpt[0][2], dpt[0][3]),
                                  Mma<T>::pack(dpt[1][0], dpt[1][1]), Mma<T>::pack(dpt[1][2], dpt[1][3])};
#pragma unroll
                for (int j = 0; j < OT; j++) {
                    uint32_t b[2];
                    if constexpr (DV) {
                        ldmatrix_x2_trans(b, &dos[lane % 16][j * 8]);
                        Mma<T>::run(acc_v[j], pa, b);
                    }
                    if constexpr (DK) {
                        ldmatrix_x2_trans(b, &qs[lane % 16][j * 8]);
                        Mma<T>::run(acc_k[j], sa, b);
                    }
                }
            }
        }
    }
    const size_t kv_stride = (size_t)nkv * D;
#pragma unroll
    for (int j = 0; j < OT; j++) {
        const int c = j * 8 + (lane % 4) * 2;
        if (key0 < s) {
            size_t at = ((size_t)row * s + key0) * kv_stride + (size_t)kvh * D + c;
            if constexpr (DK) *reinterpret_cast<uint32_t*>(dk + at) = Mma<T>::pack(acc_k[j][0], acc_k[j][1]);
            if constexpr (DV) *reinterpret_cast<uint32_t*>(dv + at) = Mma<T>::pack(acc_v[j][0], acc_v[j][1]);
        }
        if (key1 < s) {
            size_t at = ((size_t)row * s + key1) * kv_stride + (size_t)kvh * D + c;
            if constexpr (DK) *reinterpret_cast<uint32_t*>(dk + at) = Mma<T>::pack(acc_k[j][2], acc_k[j][3]);
            if constexpr (DV) *reinterpret_cast<uint32_t*>(dv + at) = Mma<T>::pack(acc_v[j][2], acc_v[j][3]);
        }
    }
}

// dq of 64 queries of one head: blockIdx.x query tile (heaviest first), blockIdx.y head,
// blockIdx.z row. Warp w owns queries m0 + 16w..+16, their q and dout as A operands in
// registers (at head size 256: in shared tiles, loaded a k-step at a time); the keys they
// see come through shared memory Q_BN at a time: S = Q K^T and dP = dO V^T 16 keys at a
// time, then dQ += dS K.
template <typename T, int D>
__device__ void attention_bwd_dq_mma(const T* __restrict__ q, const T* __restrict__ k,
                                     const T* __restrict__ v, const T* __restrict__ dout,
                                     const float* __restrict__ lse, const float* __restrict__ delta,
                                     const uint32_t* __restrict__ bounds, T* __restrict__ dq, int s,
                                     int nh, int nkv, float scale, float softcap, int window) {
    using Tiles = MmaTiles<D>;
    constexpr int BM = Tiles::Q_BM, BN = Tiles::Q_BN, ST = Tiles::ST, KSTEPS = D / 16, OT = D / 8;
    constexpr bool QS = Tiles::Q_IN_SHARED;
    need_shared(Tiles::Q_ELEMS * sizeof(T));
    extern __shared__ __align__(16) unsigned char smem[];
    T(*ks)[ST] = reinterpret_cast<T(*)[ST]>(smem);
    T(*vs)[ST] = ks + BN;
    T(*qs)[ST] = vs + BN;   // QS: the block's q rows
    T(*dos)[ST] = qs + BM;  // QS: its dout rows
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int qblock = gridDim.x - 1 - blockIdx.x;
    const int head = blockIdx.y, row = blockIdx.z;
    const int kvh = head / (nh / nkv);
    const int start = bounds[2 * row], end = bounds[2 * row + 1];
    const int m0 = qblock * BM;
    const int qrow0 = m0 + warp * 16 + lane / 4, qrow1 = qrow0 + 8;
    const size_t q_stride = (size_t)nh * D;
    float acc[OT][4];
#pragma unroll
    for (int j = 0; j < OT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

    if (m0 < end && m0 + BM > start) {
        uint32_t qa[QS ? 1 : KSTEPS][4], da[QS ? 1 : KSTEPS][4];  // !QS
        if constexpr (QS) {
            // Read by every warp after the key loop's first barrier.
            stage_rows<T, D, BM, ST>(qs, q, row, s, nh, head, m0, start, end);
            stage_rows<T, D, BM, ST>(dos, dout, row, s, nh, head, m0, start, end);
        } else {
            const size_t r0 = ((size_t)row * s + min(qrow0, s - 1)) * q_stride + (size_t)head * D;
            const size_t r1 = ((size_t)row * s + min(qrow1, s - 1)) * q_stride + (size_t)head * D;
            const int c = (lane % 4) * 2;
#pragma unroll
            for (int t = 0; t < KSTEPS; t++) {
                qa[t][0] = *reinterpret_cast<const uint32_t*>(q + r0 + t * 16 + c);
                qa[t][1] = *reinterpret_cast<const uint32_t*>(q + r1 + t * 16 + c);
                qa[t][2] = *reinterpret_cast<const uint32_t*>(q + r0 + t * 16 + c + 8);
                qa[t][3] = *reinterpret_cast<const uint32_t*>(q + r1 + t * 16 + c + 8);
                da[t][0] = *reinterpret_cast<const uint32_t*>(dout + r0 + t * 16 + c);
                da[t][1] = *reinterpret_cast<const uint32_t*>(dout + r1 + t * 16 + c);
                da[t][2] = *reinterpret_cast<const uint32_t*>(dout + r0 + t * 16 + c + 8);
                da[t][3] = *reinterpret_cast<const uint32_t*>(dout + r1 + t * 16 + c + 8);
            }
        }
        const bool real0 = qrow0 >= start && qrow0 < end, real1 = qrow1 >= start && qrow1 < end;
        const float* lse_h = lse + ((size_t)row * nh + head) * s;
        const float* delta_h = delta + ((size_t)row * nh + head) * s;
        const float lse0 = real0 ? lse_h[qrow0] : 0.f, lse1 = real1 ? lse_h[qrow1] : 0.f;
        const float delta0 = real0 ? delta_h[qrow0] : 0.f, delta1 = real1 ? delta_h[qrow1] : 0.f;
        // Keys the block's queries see: [lo, hi), lo rounded down to a tile.
        int lo = start;
        if (window > 0 && m0 - window + 1 > lo) lo = m0 - window + 1;
        const int hi = min(end, m0 + BM);
        lo = (lo / BN) * BN;
        for (int n0 = lo; n0 < hi; n0 += BN) {
            __syncthreads();  // the previous key tile is no longer read
            stage_rows<T, D, BN, ST>(ks, k, row, s, nkv, kvh, n0, start, end);
            stage_rows<T, D, BN, ST>(vs, v, row, s, nkv, kvh, n0, start, end);
            __syncthreads();
#pragma unroll
            for (int c = 0; c < BN / 16; c++) {
                float sc[2][4], dp[2][4];
#pragma unroll
                for (int n = 0; n < 2; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) sc[n][e] = dp[n][e] = 0.f;
#pragma unroll
                for (int t = 0; t < KSTEPS; t++) {
                    uint32_t qf[4], df[4];
                    if constexpr (QS) {
                        load_a<T, ST>(qf, qs, warp * 16, t);
                        load_a<T, ST>(df, dos, warp * 16, t);
                    } else {
#pragma unroll
                        for (int e = 0; e < 4; e++) qf[e] = qa[t][e], df[e] = da[t][e];
                    }
#pragma unroll
                    for (int n = 0; n < 2; n++) {
                        uint32_t kb[2], vb[2];
                        load_b<T, ST>(kb, ks, c * 16 + n * 8, t);
                        load_b<T, ST>(vb, vs, c * 16 + n * 8, t);
                        Mma<T>::run(sc[n], qf, kb);
                        Mma<T>::run(dp[n], df, vb);
                    }
                }
                // dS into sc; zero for the pairs not seen.
#pragma unroll
                for (int n = 0; n < 2; n++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const bool hi_row = e >= 2;
                        const int query = hi_row ? qrow1 : qrow0;
                        const int key = n0 + c * 16 + n * 8 + (lane % 4) * 2 + (e % 2);
                        float p = 0.f, ds = 0.f;
                        if ((hi_row ? real1 : real0) && visible(query, key, start, end, window))
                            prob_and_grad(sc[n][e], dp[n][e], hi_row ? lse1 : lse0,
                                          hi_row ? delta1 : delta0, scale, softcap, p, ds);
                        sc[n][e] = ds;
                    }
                }
                uint32_t sa[4] = {Mma<T>::pack(sc[0][0], sc[0][1]), Mma<T>::pack(sc[0][2], sc[0][3]),
                                  Mma<T>::pack(sc[1][0], sc[1][1]), Mma<T>::pack(sc[1][2], sc[1][3])};
#pragma unroll
                for (int j = 0; j < OT; j++) {
                    uint32_t b[2];
                    ldmatrix_x2_trans(b, &ks[c * 16 + lane % 16][j * 8]);
                    Mma<T>::run(acc[j], sa, b);
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < OT; j++) {
        const int c = j * 8 + (lane % 4) * 2;
        if (qrow0 < s)
            *reinterpret_cast<uint32_t*>(dq + ((size_t)row * s + qrow0) * q_stride + (size_t)head * D + c) =
                Mma<T>::pack(acc[j][0], acc[j][1]);
        if (qrow1 < s)
            *reinterpret_cast<uint32_t*>(dq + ((size_t)row * s + qrow1) * q_stride + (size_t)head * D + c) =
                Mma<T>::pack(acc[j][2], acc[j][3]);
    }
}

#define KV_MMA(NAME, SUFFIX, T, D, PARTS)                                                      \
    extern "C" __global__ void __launch_bounds__(128) attention_bwd_##NAME##_mma_##SUFFIX(      \
        const T* q, const T* k, const T* v, const T* dout, const float* lse,                    \
        const float* delta, const uint32_t* bounds, T* dk, T* dv, int s, int nh, int nkv,       \
        float scale, float softcap, int window) {                                              \
        attention_bwd_dkdv_mma<T, D, PARTS>(q, k, v, dout, lse, delta, bounds, dk, dv, s, nh,   \
                                            nkv, scale, softcap, window);                      \
    }
#define Q_MMA(SUFFIX, T, D)                                                                    \
    extern "C" __global__ void __launch_bounds__(128) attention_bwd_dq_mma_##SUFFIX(            \
        const T* q, const T* k, const T* v, const T* dout, const float* lse,                    \
        const float* delta, const uint32_t* bounds, T* dq, int s, int nh, int nkv, float scale, \
        float softcap, int window) {                                                           \
        attention_bwd_dq_mma<T, D>(q, k, v, dout, lse, delta, bounds, dq, s, nh, nkv, scale,    \
                                   softcap, window);                                           \
    }
// Head sizes 64 and 128: dk and dv in one launch (attention_bwd_dkdv_mma_*); 256: two
// (attention_bwd_dv_mma_*, then attention_bwd_dk_mma_*).
#define GRADS_MMA(SUFFIX, T, D)         \
    KV_MMA(dkdv, SUFFIX, T, D, PART_BOTH) \
    Q_MMA(SUFFIX, T, D)
#define GRADS_MMA_SPLIT(SUFFIX, T, D)   \
    KV_MMA(dv, SUFFIX, T, D, PART_DV)   \
    KV_MMA(dk, SUFFIX, T, D, PART_DK)   \
    Q_MMA(SUFFIX, T, D)
GRADS_MMA(bf16_d64, __nv_bfloat16, 64)
GRADS_MMA(bf16_d128, __nv_bfloat16, 128)
GRADS_MMA_SPLIT(bf16_d256, __nv_bfloat16, 256)
GRADS_MMA(f16_d64, __half, 64)
GRADS_MMA(f16_d128, __half, 128)
GRADS_MMA_SPLIT(f16_d256, __half, 256)
