// Fused attention: scores, soft-cap, causal + padding + sliding-window mask, online
// softmax and times V in one pass; the scores never reach device memory.
//
// Layouts: q (b, s, nh, d), k and v (b, s, nkv, d), out (b, s, nh, d), all contiguous, so
// that no transposes are needed around attention. bounds (b, 2) u32: the first and
// one-past-last real position of each row (padding is on the left or on the right, so the
// real tokens are contiguous). lse (b, nh, s) f32: each real query's log-sum-exp of its
// scores, which the backward pass (attention_backward.cu) recomputes the softmax from.
// Launched by src/ops/attention.rs.

#include "common.cuh"
#include "mma.cuh"

// Score of one query-key pair after scaling and the optional soft-cap; -inf when masked.
__device__ __forceinline__ float finish_score(float s, float scale, float softcap, bool valid) {
    s *= scale;
    if (softcap > 0.f) s = softcap * tanhf(s / softcap);
    return valid ? s : -INFINITY;
}

__device__ __forceinline__ bool key_visible(int q, int k, int start, int end, int window) {
    return k <= q && k >= start && k < end && (window <= 0 || q - k < window);
}

// ---------------------------------------------------------------------------------------
// Reference-grade attention for any dtype and head size up to 256: one warp per query,
// keys in order, online softmax in f32. Used for f32 models and head sizes the tensor-core
// kernel does not take.
template <typename T>
__device__ void attention_simple(const T* __restrict__ q, const T* __restrict__ k,
                                 const T* __restrict__ v, const uint32_t* __restrict__ bounds,
                                 T* __restrict__ out, float* __restrict__ lse, int b, int s,
                                 int nh, int nkv, int d, float scale, float softcap,
                                 int window) {
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int query = blockIdx.x * (blockDim.x / 32) + warp;
    const int head = blockIdx.y;
    const int row = blockIdx.z;
    if (query >= s) return;
    const int group = nh / nkv;
    const int kvh = head / group;
    const int start = bounds[2 * row], end = bounds[2 * row + 1];
    const T* qp = q + ((size_t)(row * s + query) * nh + head) * d;
    T* op = out + ((size_t)(row * s + query) * nh + head) * d;
    float qv[8], acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int c = lane + 32 * i;
        qv[i] = c < d ? to_float(qp[c]) : 0.f;
        acc[i] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    if (query >= start && query < end) {
        int first = start;
        if (window > 0 && query - window + 1 > first) first = query - window + 1;
        for (int key = first; key <= query; key++) {
            const T* kp = k + ((size_t)(row * s + key) * nkv + kvh) * d;
            const T* vp = v + ((size_t)(row * s + key) * nkv + kvh) * d;
            float part = 0.f;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                int c = lane + 32 * i;
                if (c < d) part += qv[i] * to_float(kp[c]);
            }
#pragma unroll
            for (int off = 16; off > 0; off /= 2) part += __shfl_xor_sync(0xffffffff, part, off);
            float score = finish_score(part, scale, softcap, true);
            float m_new = fmaxf(m, score);
            float alpha = __expf(m - m_new);
            float p = __expf(score - m_new);
            l = l * alpha + p;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                int c = lane + 32 * i;
                acc[i] = acc[i] * alpha + (c < d ? p * to_float(vp[c]) : 0.f);
            }
            m = m_new;
        }
    }
    float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int c = lane + 32 * i;
        if (c < d) op[c] = from_float<T>(acc[i] * inv);
    }
    if (lane == 0 && l > 0.f) lse[((size_t)row * nh + head) * s + query] = m + logf(l);
}

#define SIMPLE(NAME, T)                                                                        \
    extern "C" __global__ void NAME(const T* q, const T* k, const T* v, const uint32_t* bounds, \
                                    T* out, float* lse, int b, int s, int nh, int nkv, int d,   \
                                    float scale, float softcap, int window) {                  \
        attention_simple<T>(q, k, v, bounds, out, lse, b, s, nh, nkv, d, scale, softcap,       \
                            window);                                                           \
    }
SIMPLE(attention_simple_f32, float)
SIMPLE(attention_simple_bf16, __nv_bfloat16)
SIMPLE(attention_simple_f16, __half)

// ---------------------------------------------------------------------------------------
// Tensor-core attention (flash-attention-2 style) for bf16/f16 and head sizes 16..256:
// 4 warps, 64 queries per block (16 per warp), keys in tiles of BN staged in shared memory;
// S = Q K^T and O += P V with mma.sync m16n8k16 (f32 accumulators), online softmax in f32.
// Query blocks are taken heaviest first (causal attention: later queries see more keys).

template <typename T, int D, int BN>
__device__ __forceinline__ void attention_mma(const T* __restrict__ q, const T* __restrict__ k,
                                              const T* __restrict__ v,
                                              const uint32_t* __restrict__ bounds,
                                              T* __restrict__ out, float* __restrict__ lse,
                                              int b, int s, int nh, int nkv, float scale,
                                              float softcap, int window) {
    constexpr int BM = 64;
    constexpr int PAD = 8;            // row padding (16 bytes): conflict-free fragment loads
    constexpr int KSTEPS = D / 16;    // k-steps of Q K^T
    constexpr int NTILES = BN / 8;    // n8 tiles of S
    constexpr int OTILES = D / 8;     // n8 tiles of O
    __shared__ __align__(16) T ks[BN][D + PAD];
    __shared__ __align__(16) T vs[BN][D + PAD];

    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int qblock = gridDim.x - 1 - blockIdx.x;
    const int head = blockIdx.y;
    const int row = blockIdx.z;
    const int kvh = head / (nh / nkv);
    const int start = bounds[2 * row], end = bounds[2 * row + 1];
    const int m0 = qblock * BM;
    const int qrow0 = m0 + warp * 16 + lane / 4;  // this thread's rows: qrow0 and qrow0 + 8
    const int qrow1 = qrow0 + 8;
    const size_t q_stride = (size_t)nh * D, kv_stride = (size_t)nkv * D;

    // The block's queries hold no real token: their output is never read; zeros.
    if (m0 >= end || m0 + BM <= start) {
        for (int i = threadIdx.x; i < BM * D; i += blockDim.x) {
            int r = m0 + i / D;
            if (r < s) out[((size_t)row * s + r) * q_stride + (size_t)head * D + i % D] = from_float<T>(0.f);
        }
        return;
    }

    // Q fragments (A operand, row-major 16 x 16 per k-step) straight from global memory.
    uint32_t qa[KSTEPS][4];
    {
        const T* q0 = q + ((size_t)row * s + min(qrow0, s - 1)) * q_stride + (size_t)head * D;
        const T* q1 = q + ((size_t)row * s + min(qrow1, s - 1)) * q_stride + (size_t)head * D;
        const int c = (lane % 4) * 2;
#pragma unroll
        for (int t = 0; t < KSTEPS; t++) {
            qa[t][0] = *reinterpret_cast<const uint32_t*>(q0 + t * 16 + c);
            qa[t][1] = *reinterpret_cast<const uint32_t*>(q1 + t * 16 + c);
            qa[t][2] = *reinterpret_cast<const uint32_t*>(q0 + t * 16 + c + 8);
            qa[t][3] = *reinterpret_cast<const uint32_t*>(q1 + t * 16 + c + 8);
        }
    }

    float o[OTILES][4];
#pragma unroll
    for (int j = 0; j < OTILES; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

    // Keys this block can see: [lo, hi).
    int lo = start;
    if (window > 0 && m0 - window + 1 > lo) lo = m0 - window + 1;
    int hi = min(end, m0 + BM);
    lo = (lo / BN) * BN;

    for (int n0 = lo; n0 < hi; n0 += BN) {
        __syncthreads();  // the previous tile is no longer read
        // Stage K and V tiles: 16-byte chunks, zeros past the sequence.
        constexpr int CHUNKS = BN * D / 8;
        for (int i = threadIdx.x; i < CHUNKS; i += blockDim.x) {
            int r = i / (D / 8), c = (i % (D / 8)) * 8;
            int key = n0 + r;
            uint4 kval = make_uint4(0, 0, 0, 0), vval = make_uint4(0, 0, 0, 0);
            if (key < s) {
                size_t off = ((size_t)row * s + key) * kv_stride + (size_t)kvh * D + c;
                kval = *reinterpret_cast<const uint4*>(k + off);
                vval = *reinterpret_cast<const uint4*>(v + off);
            }
            *reinterpret_cast<uint4*>(&ks[r][c]) = kval;
            *reinterpret_cast<uint4*>(&vs[r][c]) = vval;
        }
        __syncthreads();

        // S = Q K^T for this warp's 16 queries and BN keys.
        float sc[NTILES][4];
#pragma unroll
        for (int j = 0; j < NTILES; j++) {
            sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
            for (int t = 0; t < KSTEPS; t++) {
                uint32_t kb[2];
                const T* kr = &ks[j * 8 + lane / 4][t * 16 + (lane % 4) * 2];
                kb[0] = *reinterpret_cast<const uint32_t*>(kr);
                kb[1] = *reinterpret_cast<const uint32_t*>(kr + 8);
                Mma<T>::run(sc[j], qa[t], kb);
            }
        }
        // Scale, soft-cap, mask; the running maximum of each of the thread's two rows.
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < NTILES; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int qi = e < 2 ? qrow0 : qrow1;
                int key = n0 + j * 8 + (lane % 4) * 2 + (e % 2);
                float val = finish_score(sc[j][e], scale, softcap, key_visible(qi, key, start, end, window));
                sc[j][e] = val;
                tile_max[e / 2] = fmaxf(tile_max[e / 2], val);
            }
        }
        float alpha[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffff, tile_max[h], 1));
            tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffff, tile_max[h], 2));
            float m_new = fmaxf(m_run[h], tile_max[h]);
            float m_use = m_new == -INFINITY ? 0.f : m_new;
            alpha[h] = __expf(m_run[h] - m_use);
            m_run[h] = m_new;
            tile_max[h] = m_use;
        }
        float tile_sum[2] = {0.f, 0.f};
#pragma unroll
        for (int j = 0; j < NTILES; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float p = __expf(sc[j][e] - tile_max[e / 2]);
                sc[j][e] = p;
                tile_sum[e / 2] += p;
            }
        }
#pragma unroll
        for (int h = 0; h < 2; h++) {
            tile_sum[h] += __shfl_xor_sync(0xffffffff, tile_sum[h], 1);
            tile_sum[h] += __shfl_xor_sync(0xffffffff, tile_sum[h], 2);
            l_run[h] = l_run[h] * alpha[h] + tile_sum[h];
        }
#pragma unroll
        for (int j = 0; j < OTILES; j++) {
            o[j][0] *= alpha[0];
            o[j][1] *= alpha[0];
            o[j][2] *= alpha[1];
            o[j][3] *= alpha[1];
        }
        // O += P V: P from the S accumulators (their layout is the A operand's), V through
        // ldmatrix.trans.
#pragma unroll
        for (int t = 0; t < BN / 16; t++) {
            uint32_t pa[4];
            pa[0] = Mma<T>::pack(sc[2 * t][0], sc[2 * t][1]);
            pa[1] = Mma<T>::pack(sc[2 * t][2], sc[2 * t][3]);
            pa[2] = Mma<T>::pack(sc[2 * t + 1][0], sc[2 * t + 1][1]);
            pa[3] = Mma<T>::pack(sc[2 * t + 1][2], sc[2 * t + 1][3]);
#pragma unroll
            for (int j = 0; j < OTILES; j++) {
                uint32_t vb[2];
                ldmatrix_x2_trans(vb, &vs[t * 16 + (lane % 16)][j * 8]);
                Mma<T>::run(o[j], pa, vb);
            }
        }
    }

    // Normalise and write (b, s, nh, d).
    float inv0 = l_run[0] > 0.f ? 1.f / l_run[0] : 0.f;
    float inv1 = l_run[1] > 0.f ? 1.f / l_run[1] : 0.f;
    bool real0 = qrow0 < s, real1 = qrow1 < s;
    T* o0 = out + ((size_t)row * s + qrow0) * q_stride + (size_t)head * D;
    T* o1 = out + ((size_t)row * s + qrow1) * q_stride + (size_t)head * D;
#pragma unroll
    for (int j = 0; j < OTILES; j++) {
        int c = j * 8 + (lane % 4) * 2;
        if (real0) *reinterpret_cast<uint32_t*>(o0 + c) = Mma<T>::pack(o[j][0] * inv0, o[j][1] * inv0);
        if (real1) *reinterpret_cast<uint32_t*>(o1 + c) = Mma<T>::pack(o[j][2] * inv1, o[j][3] * inv1);
    }
    // The log-sum-exp of each query's scores, for the backward pass.
    if (lane % 4 == 0) {
        float* lse_head = lse + ((size_t)row * nh + head) * s;
        if (real0 && l_run[0] > 0.f) lse_head[qrow0] = m_run[0] + logf(l_run[0]);
        if (real1 && l_run[1] > 0.f) lse_head[qrow1] = m_run[1] + logf(l_run[1]);
    }
}

#define MMA_KERNEL(NAME, T, D, BN)                                                              \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                      \
        const T* q, const T* k, const T* v, const uint32_t* bounds, T* out, float* lse, int b,   \
        int s, int nh, int nkv, float scale, float softcap, int window) {                        \
        attention_mma<T, D, BN>(q, k, v, bounds, out, lse, b, s, nh, nkv, scale, softcap,       \
                                window);                                                         \
    }
MMA_KERNEL(attention_mma_bf16_d16, __nv_bfloat16, 16, 64)
MMA_KERNEL(attention_mma_bf16_d32, __nv_bfloat16, 32, 64)
MMA_KERNEL(attention_mma_bf16_d64, __nv_bfloat16, 64, 64)
MMA_KERNEL(attention_mma_bf16_d128, __nv_bfloat16, 128, 64)
MMA_KERNEL(attention_mma_bf16_d256, __nv_bfloat16, 256, 32)
MMA_KERNEL(attention_mma_f16_d16, __half, 16, 64)
MMA_KERNEL(attention_mma_f16_d32, __half, 32, 64)
MMA_KERNEL(attention_mma_f16_d64, __half, 64, 64)
MMA_KERNEL(attention_mma_f16_d128, __half, 128, 64)
MMA_KERNEL(attention_mma_f16_d256, __half, 256, 32)
