// The decode step's routed FP4 experts outside the model: moe.cu's own one-pair kernels (the
// CUDA-core moe_up_r1 / moe_down_r1 and the f16 tensor-core moe_up_fp4_r1 / moe_down_fp4_r1) on
// V4-Flash's six experts of one row (up: W1 and W3 [2048, 4096]; down: W2 [4096, 2048]; e2m1
// with e8m0 scales per 32 columns), beside a pure read of the same weight bytes. Each is timed
// over back-to-back launches that rotate through weight copies larger than the L2, and alone after
// a 256 MB read of another buffer (a cold L2, as in the model's step), and is checked against an
// f64 reference (NMSE). Run on a GPU of sm_89 or newer, from the repository root:
//   nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/fp4b scripts/fp4-expert-bench.cu && /tmp/fp4b
// (docs/performance.md has its figures.)
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <vector>
#include <random>
#include <algorithm>
#include "../cuda/kernels/common.cuh"
#include "../cuda/kernels/moe.cu"

#include "bench-util.cuh"

static const int EXPERTS = 6;  // the experts of one row (top-6), all in use

// up: NM = 2 matrices (W1, W3) of N = inter rows × K = dim; down: NM = 1 (W2), N = dim, K = inter.
struct Problem {
    int nm, n, k;
    size_t mat_bytes() const { return (size_t)EXPERTS * n * k / 2; }
    size_t sc_bytes() const { return (size_t)EXPERTS * n * k / 32; }
    size_t weight_bytes() const { return nm * (mat_bytes() + sc_bytes()); }
};

struct Set {
    u8* w[2];  // [EXPERTS][n][k/2]
    u8* s[2];  // [EXPERTS][n][k/32]
};

// y[(m·EXPERTS + e)·n + row] = W_m,e[row] · x in f64 (x = code value × scale per 128).
__global__ void ref_kernel(Set set, const u8* xq, const float* xs, int nm, int n, int k, double* y) {
    long long total = (long long)nm * EXPERTS * n;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    int m = (int)(i / ((long long)EXPERTS * n));
    long long er = i % ((long long)EXPERTS * n);
    const u8* wr = set.w[m] + er * (k / 2);
    const u8* sr = set.s[m] + er * (k / 32);
    double acc = 0;
    for (int c = 0; c < k; ++c) {
        u8 b = wr[c / 2];
        u8 code = (c & 1) ? b >> 4 : b & 15;
        acc += (double)e2m1_to_f32(code) * (double)e8m0_to_f32(sr[c / 32]) * (double)e4m3_to_f32(xq[c]) *
               (double)xs[c / 128];
    }
    y[i] = acc;
}

__global__ void __launch_bounds__(256) read_all(const uint4* p, long long n16, u32* sink) {
    u32 acc = 0;
    long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n16; i += 4 * stride) {
        uint4 a = __ldg(p + i), b = __ldg(p + i + stride), c = __ldg(p + i + 2 * stride), d = __ldg(p + i + 3 * stride);
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n16; i += stride) {
        uint4 a = __ldg(p + i);
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    if (acc == 0x12345678u) *sink = acc;
}

struct Ctx {
    Problem p;
    std::vector<Set> sets;
    int sms;
    // Routing of one row to experts 0..5: pair e is expert e, all in use.
    int *cnt, *list, *active;
    i64* err;
    float* wts;
    u8* xcodes;    // the E4m3 act_quant form of EXPERTS rows (all the same row): codes, then scales
    float* xvals;  // the F32 form of the same rows
    float* out;
    std::vector<double> want;  // expected out
    cudaEvent_t a, b;
};

// Each launch after a pure read of `flush_bytes` bytes of another buffer (a cold L2 and other
// code in the SMs' instruction caches, as in the model's step), timed by events around it alone.
static uint4* flush_buf;
static size_t flush_bytes = 256u << 20;
static u32* flush_sink;
template <typename F> static float time_cold_us(Ctx& c, F launch, int iters = 30) {
    std::vector<cudaEvent_t> ev(2 * iters);
    for (auto& e : ev) CK(cudaEventCreate(&e));
    for (int i = 0; i < iters; ++i) {
        read_all<<<c.sms * 8, 256>>>(flush_buf, (long long)(flush_bytes / 16), flush_sink);
        CK(cudaEventRecord(ev[2 * i]));
        launch(c.sets[i % c.sets.size()]);
        CK(cudaEventRecord(ev[2 * i + 1]));
    }
    CK(cudaDeviceSynchronize());
    std::vector<float> t(iters);
    for (int i = 0; i < iters; ++i) CK(cudaEventElapsedTime(&t[i], ev[2 * i], ev[2 * i + 1]));
    for (auto& e : ev) CK(cudaEventDestroy(e));
    std::sort(t.begin(), t.end());
    return t[iters / 2] * 1000.0f;
}

template <typename F> static float time_us(Ctx& c, F launch, int iters = 60) {
    for (int i = 0; i < 4; ++i) launch(c.sets[i % c.sets.size()]);
    CK(cudaEventRecord(c.a));
    for (int i = 0; i < iters; ++i) launch(c.sets[i % c.sets.size()]);
    CK(cudaEventRecord(c.b));
    CK(cudaEventSynchronize(c.b));
    float ms;
    CK(cudaEventElapsedTime(&ms, c.a, c.b));
    return ms * 1000.0f / iters;
}

static double nmse(const Ctx& c) {
    std::vector<float> y(c.want.size());
    CK(cudaMemcpy(y.data(), c.out, y.size() * 4, cudaMemcpyDeviceToHost));
    double num = 0, den = 0;
    for (size_t i = 0; i < y.size(); ++i) {
        if (!std::isfinite(y[i])) return INFINITY;
        num += (y[i] - c.want[i]) * (y[i] - c.want[i]);
        den += c.want[i] * c.want[i];
    }
    return num / den;
}

// One of moe.cu's kernels: `fp4` picks the tensor-core form (input codes, 4-warp blocks, ksplit).
static void run_kernel(Ctx& c, bool fp4, int ksplit, const char* name) {
    const Problem& p = c.p;
    bool up = p.nm == 2;
    int threads = fp4 ? FP4_WARPS * 32 : 256;
    unsigned gx;
    size_t smem;
    if (fp4) {
        gx = (p.n + MMA_ROWS * (FP4_WARPS / ksplit) - 1) / (MMA_ROWS * (FP4_WARPS / ksplit));
        smem = (size_t)p.k * 2 + 64 + p.k / 128 * 4;  // moe.rs fp4_f16_smem
    } else {
        // linear.rs feature_blocks: about 8 blocks per SM in all, LIN_OT rows a warp step.
        gx = std::max(1, std::min((p.n + 8 * LIN_OT - 1) / (8 * LIN_OT), (c.sms * 8 + EXPERTS - 1) / EXPERTS));
        smem = (size_t)p.k * 4;
    }
    dim3 grid(gx, EXPERTS, 1);
    const float* xs = (const float*)(c.xcodes + (size_t)EXPERTS * p.k);  // codes_scales_offset
    const float* x = fp4 ? (const float*)c.xcodes : c.xvals;
    const void* kern = up ? (fp4 ? (const void*)moe_up_fp4_r1 : (const void*)moe_up_r1)
                          : (fp4 ? (const void*)moe_down_fp4_r1 : (const void*)moe_down_r1);
    CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    i64 rows = up ? 1 : EXPERTS;  // up: one row of 6 pairs; down: the 6 pairs' h rows
    int experts = EXPERTS, kk = EXPERTS, fmt = WF_FP4;
    i64 dim = up ? p.k : p.n, inter = up ? p.n : p.k;
    float limit = 0.0f;
    auto launch = [&](const Set& s) {
        if (up) {
            if (fp4)
                moe_up_fp4_r1<<<grid, threads, smem>>>(x, s.w[0], s.s[0], s.w[1], s.s[1], c.wts, c.cnt, c.list,
                                                         c.active, experts, rows, kk, dim, inter, fmt, limit, c.out,
                                                         c.err, xs, ksplit);
            else
                moe_up_r1<<<grid, threads, smem>>>(x, s.w[0], s.s[0], s.w[1], s.s[1], c.wts, c.cnt, c.list, c.active,
                                                     experts, rows, kk, dim, inter, fmt, limit, c.out, c.err);
        } else {
            if (fp4)
                moe_down_fp4_r1<<<grid, threads, smem>>>(x, s.w[0], s.s[0], c.cnt, c.list, c.active, experts, rows,
                                                           dim, inter, fmt, c.out, c.err, xs, ksplit);
            else
                moe_down_r1<<<grid, threads, smem>>>(x, s.w[0], s.s[0], c.cnt, c.list, c.active, experts, rows, dim,
                                                       inter, fmt, c.out, c.err);
        }
    };
    CK(cudaMemset(c.out, 0, c.want.size() * 4));
    launch(c.sets[0]);
    CK(cudaDeviceSynchronize());
    double e = nmse(c);
    float us = time_us(c, launch), cold = time_cold_us(c, launch);
    cudaFuncAttributes fa;
    CK(cudaFuncGetAttributes(&fa, kern));
    printf("  %-30s %7.2f us  %6.0f GB/s  nmse %.1e  regs %d  blocks %u  alone after a flush: %.2f us\n", name, us,
           p.weight_bytes() / (us * 1e3), e, fa.numRegs, grid.x * grid.y, cold);
}

static void problem(Problem p, int nsets, int sms) {
    Ctx c;
    c.p = p;
    c.sms = sms;
    std::mt19937_64 rng(42);
    std::vector<u8> hw(p.mat_bytes()), hs(p.sc_bytes());
    for (int i = 0; i < nsets; ++i) {
        Set s = {};
        for (int m = 0; m < p.nm; ++m) {
            for (auto& v : hw) v = (u8)rng();
            for (auto& v : hs) v = (u8)(120 + rng() % 8);  // 2^-7 .. 2^0
            CK(cudaMalloc(&s.w[m], hw.size()));
            CK(cudaMalloc(&s.s[m], hs.size()));
            CK(cudaMemcpy(s.w[m], hw.data(), hw.size(), cudaMemcpyHostToDevice));
            CK(cudaMemcpy(s.s[m], hs.data(), hs.size(), cudaMemcpyHostToDevice));
        }
        c.sets.push_back(s);
    }
    // The input row: random e4m3 codes (no NaN) and power-of-two scales, in both act_quant forms.
    std::vector<u8> hx((size_t)EXPERTS * p.k + (size_t)EXPERTS * p.k / 128 * 4);
    std::vector<float> hv((size_t)EXPERTS * p.k), hsc(p.k / 128);
    for (auto& v : hsc) v = ldexpf(1.0f, (int)(rng() % 9) - 12);
    for (int i = 0; i < p.k; ++i) {
        u8 code;
        do code = (u8)rng();
        while ((code & 0x7F) == 0x7F);
        int sgn = code >> 7, e = (code >> 3) & 15, m = code & 7;
        float v = (e == 0 ? m / 512.0f : (1.0f + m / 8.0f) * ldexpf(1.0f, e - 7)) * hsc[i / 128];
        for (int r = 0; r < EXPERTS; ++r) {
            hx[(size_t)r * p.k + i] = code;
            hv[(size_t)r * p.k + i] = sgn ? -v : v;
        }
    }
    for (int r = 0; r < EXPERTS; ++r)
        memcpy(&hx[(size_t)EXPERTS * p.k + (size_t)r * p.k / 128 * 4], hsc.data(), hsc.size() * 4);
    CK(cudaMalloc(&c.xcodes, hx.size()));
    CK(cudaMalloc(&c.xvals, hv.size() * 4));
    CK(cudaMemcpy(c.xcodes, hx.data(), hx.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(c.xvals, hv.data(), hv.size() * 4, cudaMemcpyHostToDevice));
    // Expert e's one pair is pair e: list[e · rows] (rows = 1 for up, 6 for down: the h rows).
    int rows = p.nm == 2 ? 1 : EXPERTS;
    std::vector<int> cnt(EXPERTS + 1, 1), list((size_t)EXPERTS * rows, 0), active(EXPERTS);
    cnt[EXPERTS] = EXPERTS;
    for (int e = 0; e < EXPERTS; ++e) list[(size_t)e * rows] = active[e] = e;
    std::vector<float> wts(EXPERTS, 1.0f);
    CK(cudaMalloc(&c.cnt, cnt.size() * 4));
    CK(cudaMalloc(&c.list, list.size() * 4));
    CK(cudaMalloc(&c.active, active.size() * 4));
    CK(cudaMalloc(&c.wts, wts.size() * 4));
    CK(cudaMalloc(&c.err, 8));
    CK(cudaMemset(c.err, 0, 8));
    CK(cudaMemcpy(c.cnt, cnt.data(), cnt.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(c.list, list.data(), list.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(c.active, active.data(), active.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(c.wts, wts.data(), wts.size() * 4, cudaMemcpyHostToDevice));
    size_t outs = (size_t)EXPERTS * p.n;
    CK(cudaMalloc(&c.out, outs * 4));
    CK(cudaEventCreate(&c.a));
    CK(cudaEventCreate(&c.b));
    {
        // Expected: up h = SwiGLU(W1·x, W3·x) (limit 0: no clamp, weight 1); down ye = W2·h.
        double* ref;
        size_t n = (size_t)p.nm * outs;
        CK(cudaMalloc(&ref, n * 8));
        ref_kernel<<<(n + 127) / 128, 128>>>(c.sets[0], c.xcodes, (const float*)(c.xcodes + (size_t)EXPERTS * p.k),
                                             p.nm, p.n, p.k, ref);
        CK(cudaDeviceSynchronize());
        std::vector<double> r(n);
        CK(cudaMemcpy(r.data(), ref, n * 8, cudaMemcpyDeviceToHost));
        c.want.resize(outs);
        for (size_t i = 0; i < outs; ++i) c.want[i] = p.nm == 2 ? r[i] / (1.0 + exp(-r[i])) * r[outs + i] : r[i];
        CK(cudaFree(ref));
    }
    printf("%s: %d experts x %d matrices of %d x %d: %.1f MB of weights and scales, %d copies\n",
           p.nm == 2 ? "up" : "down", EXPERTS, p.nm, p.n, p.k, p.weight_bytes() / 1e6, nsets);
    u32* sink;
    CK(cudaMalloc(&sink, 4));
    for (int per_sm : {2, 8}) {
        auto launch = [&](const Set& s) {
            for (int m = 0; m < p.nm; ++m)
                read_all<<<sms * per_sm / p.nm, 256>>>((const uint4*)s.w[m], (long long)(p.mat_bytes() / 16), sink);
        };
        float us = time_us(c, launch);
        printf("  read the weights, %d blocks/SM   %7.2f us  %6.0f GB/s (codes only)\n", per_sm, us,
               p.nm * p.mat_bytes() / (us * 1e3));
    }
    run_kernel(c, false, 0, p.nm == 2 ? "moe_up_r1" : "moe_down_r1");
    for (int split : {1, 2, 4}) {
        char name[64];
        snprintf(name, sizeof name, "%s ksplit %d", p.nm == 2 ? "moe_up_fp4_r1" : "moe_down_fp4_r1", split);
        run_kernel(c, true, split, name);
    }
}

int main() {
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("%s, %d SMs, L2 %d MB\n", prop.name, sms, prop.l2CacheSize >> 20);
    CK(cudaMalloc(&flush_buf, flush_bytes));
    CK(cudaMemset(flush_buf, 1, flush_bytes));
    CK(cudaMalloc(&flush_sink, 4));
    problem({2, 2048, 4096}, 4, sms);  // up
    problem({1, 4096, 2048}, 4, sms);  // down
    return 0;
}
