// A GPTQ weight dequantized in one pass (src/ops/gptq.rs):
// w[o, c] = T((code[o, c] - zero[g, o]) * scale[g, o]), g = g_idx[c], in f32, rounded once.

#include "mma.cuh"

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

// The projection y = x · wᵀ straight from the codes (src/ops/gptq.rs, `matmul`): x (m, k) in
// T, codes (n, k), y (m, n) in T; no (n, k) weight in device memory. A block computes a
// 128 x 128 tile of y over k in steps of 32: the step's codes are dequantized into shared
// memory in T (the one-pass kernel's arithmetic, so the weight's bits are the same), x's
// step is copied beside them, and eight warps (2 x 4, 64 x 32 each) multiply them on tensor
// cores (mma.sync m16n8k16, f32 accumulators). Two shared stages: the next step's loads
// are issued before this step's products and stored (dequantized) after them. y rounded
// once from f32. Needs k % 32 == 0 (the host checks it).

namespace gptq_mm {
constexpr int BM = 128, BN = 128, BK = 32, PAD = 8, THREADS = 256;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* smem_row) {
    uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

template <typename T>
__device__ void gptq_matmul(const T* __restrict__ x, const unsigned char* __restrict__ codes,
                            const float* __restrict__ params, const unsigned int* __restrict__ g_idx,
                            T* __restrict__ y, unsigned int m, unsigned int n, unsigned int k,
                            unsigned int groups) {
    using namespace gptq_mm;
    __shared__ __align__(16) T xs[2][BM][BK + PAD];
    __shared__ __align__(16) T ws[2][BN][BK + PAD];
    const float* zeros = params + (size_t)groups * n;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int wm = warp / 4, wn = warp % 4;
    const unsigned int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;

    // Staging: x's step as two 16-byte chunks a thread (row tid / 4 and 64 + tid / 4,
    // columns (tid % 4) * 8 ..+8); the codes as one 16-byte chunk (row tid / 2, columns
    // (tid % 2) * 16 ..+16).
    uint4 xr[2], cr;
    const int xrow = tid / 4, xcol = (tid % 4) * 8, crow = tid / 2, ccol = (tid % 2) * 16;
    auto load = [&](unsigned int k0) {
        for (int i = 0; i < 2; i++) {
            unsigned int gm = m0 + xrow + 64 * i;
            xr[i] = gm < m ? *reinterpret_cast<const uint4*>(x + (size_t)gm * k + k0 + xcol)
                           : make_uint4(0, 0, 0, 0);
        }
        unsigned int gn = n0 + crow;
        cr = gn < n ? *reinterpret_cast<const uint4*>(codes + (size_t)gn * k + k0 + ccol)
                    : make_uint4(0, 0, 0, 0);
    };
    auto store = [&](int stage, unsigned int k0) {
        for (int i = 0; i < 2; i++)
            *reinterpret_cast<uint4*>(&xs[stage][xrow + 64 * i][xcol]) = xr[i];
        unsigned int gn = n0 + crow;
        const unsigned char* c = reinterpret_cast<const unsigned char*>(&cr);
        unsigned int last = 0xffffffffu;
        float scale = 0.f, zero = 0.f;
        for (int j = 0; j < 16; j++) {
            unsigned int g = __ldg(g_idx + k0 + ccol + j);
            float w = 0.f;
            if (gn < n && g < groups) {
                if (g != last) {
                    size_t at = (size_t)g * n + gn;
                    scale = __ldg(params + at);
                    zero = __ldg(zeros + at);
                    last = g;
                }
                // As the one-pass kernel: subtract, then multiply, each rounded in f32.
                w = __fmul_rn(__fsub_rn((float)c[j], zero), scale);
            }
            ws[stage][crow][ccol + j] = from_float<T>(w);
        }
    };

    float acc[4][4][4];
    for (int a = 0; a < 4; a++)
        for (int b = 0; b < 4; b++)
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0.f;

    const unsigned int steps = k / BK;
    load(0);
    store(0, 0);
    __syncthreads();
    for (unsigned int s = 0; s < steps; s++) {
        const int cur = s % 2;
        if (s + 1 < steps) load((s + 1) * BK);
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t a[4][4], b[4][2];
            for (int mi = 0; mi < 4; mi++)
                ldmatrix_x4(a[mi], &xs[cur][wm * 64 + mi * 16 + lane % 16][kk + (lane / 16) * 8]);
            for (int p = 0; p < 2; p++) {
                uint32_t r[4];
                ldmatrix_x4(r, &ws[cur][wn * 32 + p * 16 + lane % 8 + (lane / 16) * 8]
                                  [kk + ((lane / 8) % 2) * 8]);
                b[2 * p][0] = r[0];
                b[2 * p][1] = r[1];
                b[2 * p + 1][0] = r[2];
                b[2 * p + 1][1] = r[3];
            }
            for (int mi = 0; mi < 4; mi++)
                for (int ni = 0; ni < 4; ni++) Mma<T>::run(acc[mi][ni], a[mi], b[ni]);
        }
        if (s + 1 < steps) store(cur ^ 1, (s + 1) * BK);
        __syncthreads();
    }

    // The accumulators: c0, c1 at (row lane / 4, columns 2 (lane % 4) ..+2), c2, c3 eight
    // rows below.
    for (int mi = 0; mi < 4; mi++)
        for (int ni = 0; ni < 4; ni++)
            for (int h = 0; h < 2; h++) {
                unsigned int row = m0 + wm * 64 + mi * 16 + lane / 4 + 8 * h;
                unsigned int col = n0 + wn * 32 + ni * 8 + 2 * (lane % 4);
                if (row >= m) continue;
                for (int e = 0; e < 2; e++)
                    if (col + e < n) y[(size_t)row * n + col + e] = from_float<T>(acc[mi][ni][2 * h + e]);
            }
}

#define MATMUL(NAME, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                    \
        const T* x, const unsigned char* codes, const float* params, const unsigned int* g_idx, \
        T* y, unsigned int m, unsigned int n, unsigned int k, unsigned int groups) {            \
        gptq_matmul<T>(x, codes, params, g_idx, y, m, n, k, groups);                            \
    }
MATMUL(gptq_matmul_bf16, __nv_bfloat16)
MATMUL(gptq_matmul_f16, __half)
