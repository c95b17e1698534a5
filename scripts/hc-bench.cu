// A decode mHC site outside the model: hc.cu's own kernels for one row of V4-Flash's streams
// (4 × 4096, 24 mixes, 20 Sinkhorn iterations) as the runtime runs them, two kernels
// (hc_post_mix_partial, then hc_pre_finish / hc_head_finish: one block finishes the row), against
// an experiment defined here, one kernel (hc_site: the row's blocks finish it together, meeting at
// two barriers; slower, so not in the runtime). Each form runs as a CUDA graph of COPIES
// sites whose mixing weights rotate through 60 MB (as in the model, where the step's other
// weights pass the L2 between two sites), replayed REPLAYS times; the time is per site. The
// streams x of both forms must be bit-identical, and y, post and comb (summed in another order)
// within an NMSE of 1e-12. Run on a GPU of sm_80 or newer, from the repository root:
//   nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/hcb scripts/hc-bench.cu && /tmp/hcb
// (docs/performance.md has its figures.)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <random>
#include "../cuda/kernels/common.cuh"
#include "../cuda/kernels/hc.cu"

// ---- The experiment: HcPre / HcHead of a few rows in one kernel -------------------------------
// Not in the runtime (slower; docs/performance.md). Grid (splits, rows) of SITE_BLOCK threads.
// Block s of row r owns the columns c0 = SITE_COLS·s .. c0 + SITE_COLS of each of the m streams;
// a row's blocks meet twice at a barrier (row_barrier), so they must all be resident at once (a runtime would launch it only where the whole grid fits the
// device). hc_*_mix_partial + hc_*_finish leave the finishing to one block a row, whose serial
// chain of loads and reductions takes 7.5 µs of a V4-Flash site's 11.8; here it is spread over
// the row's blocks.
// 1. Each block forms its X values (HcPost of the last sub-layer's output f where f is given, else
//    x as it is), writes them to x (with f) and keeps them in shared memory, and writes its sums
//    of x² and of the nm mixing dots to part[r][0 .. nm + 1][s]. Barrier.
// 2. Every block adds the row's sums (warp_batched_sums: in split order in each lane, then over
//    the warp; the same values in every block) and forms ρ, μ and pre. Block 0 writes post, and
//    its warp 0 then runs the Sinkhorn into comb (hc_comb_warp); nothing reads comb before the
//    next site.
// 3. Warp 1 merges the block's columns, u = Σ_j pre_j · X_j (f64, rounded once), and writes their
//    Σ u² to usq[r][s]. Barrier.
// 4. Warp 1 adds the row's usq in split order and writes y = norm ⊙ (u · ρ_u).
// HcHead is the same with nm = m and no post or comb (null).
#define SITE_COLS 32    // one column a lane of warp 1
#define SITE_BLOCK 256
#define SITE_MAX_M 5    // hc_comb_warp's m·m ≤ 32

// Barrier of the `count` blocks of one row, called by one thread of each: bar[0] counts the
// arrivals and bar[1] the barriers passed. The last to arrive sets bar[0] back to 0 before it
// moves bar[1] on, so both words are ready for the next barrier and the next launch. What each
// block wrote before its call is visible to every block after theirs.
__device__ __forceinline__ void row_barrier(unsigned* bar, unsigned count) {
    volatile unsigned* passed = bar + 1;
    unsigned before = *passed;  // read before arriving: it cannot move until this block has
    __threadfence();
    if (atomicAdd(bar, 1u) == count - 1) {
        atomicExch(bar, 0u);
        __threadfence();
        atomicAdd(bar + 1, 1u);
    } else {
        while (*passed == before) __nanosleep(32);
    }
    __threadfence();
}

extern "C" __global__ void __launch_bounds__(SITE_BLOCK) hc_site(
    const float* f, const float* x_prev, const float* post_prev, const float* comb_prev, float* x, const float* fnw,
    const float* base, const float* scale, const float* norm_w, int m, i64 d, int nm, int iters, float hc_eps,
    float norm_eps, double* part, double* usq, unsigned* bars, float* y, float* post, float* comb) {
    grid_dep_begin();
    __shared__ float xs[SITE_MAX_M * SITE_COLS];
    __shared__ float mu[(2 + SITE_MAX_M) * SITE_MAX_M];
    __shared__ float pre[SITE_MAX_M];
    __shared__ double sums[(2 + SITE_MAX_M) * SITE_MAX_M + 1];
    __shared__ double red[32];
    i64 r = blockIdx.y, n = m * d, c0 = (i64)blockIdx.x * SITE_COLS;
    int splits = gridDim.x, vals = m * SITE_COLS, t = threadIdx.x;
    unsigned* bar = bars + 2 * r;
    double* pr = part + r * (nm + 1) * splits;
    // 1. The block's X values (zero past d) and its partial sums.
    double ss = 0.0;
    for (int v = t; v < vals; v += blockDim.x) {
        i64 c = c0 + v % SITE_COLS, col = (i64)(v / SITE_COLS) * d + c;
        float xv = 0.0f;
        if (c < d) {
            for (int i = 0; i < nm; ++i) asm volatile("prefetch.global.L1 [%0];" ::"l"(fnw + (i64)i * n + col));
            if (f) {
                xv = hc_post_at(f, x_prev, post_prev, comb_prev, r, m, d, v / SITE_COLS, c);
                x[r * n + col] = xv;
            } else {
                xv = x[r * n + col];
            }
        }
        xs[v] = xv;
        ss += (double)xv * (double)xv;
    }
    __syncthreads();
    warp_batched_sums(
        nm, 0, vals,
        [&](int i, i64 v) {
            i64 c = c0 + v % SITE_COLS;
            return c < d ? (double)fnw[(i64)i * n + (v / SITE_COLS) * d + c] * (double)xs[v] : 0.0;
        },
        [&](int i, double sum) { pr[(i64)(1 + i) * splits + blockIdx.x] = sum; });
    ss = block_sum_d(ss, red);
    if (t == 0) {
        pr[blockIdx.x] = ss;
        row_barrier(bar, splits);
    }
    __syncthreads();
    // 2. The row's mixes and pre (post by block 0).
    warp_batched_sums(
        nm + 1, 0, splits, [&](int i, i64 s) { return __ldcg(pr + (i64)i * splits + s); },
        [&](int i, double sum) { sums[i] = sum; });
    __syncthreads();
    if (t < nm) {
        float mt = (float)sums[1 + t] * rms_from_sum(sums[0], n, norm_eps);
        mu[t] = mt;
        if (t < m)
            pre[t] = (float)sigmoid_d(scale[0] * mt + base[t]) + hc_eps;
        else if (t < 2 * m && post && blockIdx.x == 0)
            post[r * m + t - m] = 2.0f * (float)sigmoid_d(scale[1] * mt + base[t]);
    }
    __syncthreads();
    int warp = t >> 5, lane = t & 31;
    if (warp == 0) {
        if (comb && blockIdx.x == 0) {
            if (m == 4)
                hc_comb_warp<4>(mu, scale, base, m, iters, hc_eps, comb + r * m * m);
            else
                hc_comb_warp<0>(mu, scale, base, m, iters, hc_eps, comb + r * m * m);
        }
        return;
    }
    if (warp != 1) return;
    // 3. The merge of the block's columns, and their Σ u².
    double acc = 0.0;
    for (int j = 0; j < m; ++j) acc += (double)pre[j] * (double)xs[j * SITE_COLS + lane];
    float u = (float)acc;
    double uu = warp_sum_d((double)u * (double)u);
    double* ur = usq + r * splits;
    if (lane == 0) {
        ur[blockIdx.x] = uu;
        row_barrier(bar, splits);
    }
    __syncwarp();
    // 4. The norm.
    double tot = 0.0;
    for (int s = lane; s < splits; s += 32) tot += __ldcg(ur + s);
    float fr = rms_from_sum(warp_sum_d(tot), d, norm_eps);
    i64 c = c0 + lane;
    if (c < d) y[r * d + c] = norm_w[c] * (u * fr);
}

#include "bench-util.cuh"

static const int M = 4, D = 4096, N = M * D, NM = (2 + M) * M, SPLITS = 128, BLOCK = 256, ITERS = 20;
static const int COPIES = 40, REPLAYS = 20;
static const float HC_EPS = 1e-6f, NORM_EPS = 1e-6f;

// The finishing kernels' dynamic shared memory (cuda/src/ops/hc.rs finish_smem), stashed.
static size_t finish_smem(int floats, int doubles) { return ((floats + 1) / 2 * 2 + 2 * doubles + 3) / 4 * 4 * 4 + D * 4; }

template <typename T> T* zeros(size_t n) {
    T* p;
    CK(cudaMalloc(&p, n * sizeof(T)));
    CK(cudaMemset(p, 0, n * sizeof(T)));
    return p;
}

struct Bufs {
    float *f, *x_prev, *post_prev, *comb_prev, *base, *scale, *norm_w;
    float* fnw[COPIES];
    float *x, *y, *post, *comb;
    double *part, *usq;
    unsigned* bars;
};

// One site in form `fused` (0: two kernels, 1: hc_site, 2: hc_post_mix_partial alone, 3:
// hc_pre_finish alone) of HcPre (`head` 0) or HcHead (1), with copy c of the mixing weights.
static void site(cudaStream_t s, Bufs& b, int c, int fused, int head, int iters) {
    int nm = head ? M : NM;
    size_t split = (N / SPLITS) * 4;
    size_t fin = head ? finish_smem(2 * M, M + 1) : finish_smem(NM + 2 * M * M + M, NM + 1);
    long long n = N;
    if (fused == 1) {
        hc_site<<<dim3(D / SITE_COLS, 1), SITE_BLOCK, 0, s>>>(
            b.f, b.x_prev, b.post_prev, b.comb_prev, b.x, b.fnw[c], b.base, b.scale, b.norm_w, M, D, nm, iters, HC_EPS,
            NORM_EPS, b.part, b.usq, b.bars, b.y, head ? nullptr : b.post, head ? nullptr : b.comb);
        return;
    }
    if (fused != 3)
        hc_post_mix_partial<<<dim3(1, SPLITS), BLOCK, split, s>>>(b.f, b.x_prev, b.post_prev, b.comb_prev, b.x, b.fnw[c],
                                                                  n, M, nm, SPLITS, b.part);
    if (fused == 2) return;
    if (head)
        hc_head_finish<<<1, BLOCK, fin, s>>>(b.part, SPLITS, b.base, b.scale, M, n, HC_EPS, NORM_EPS, b.x, b.norm_w, 1,
                                             b.y);
    else
        hc_pre_finish<<<1, BLOCK, fin, s>>>(b.part, SPLITS, b.base, b.scale, M, n, iters, HC_EPS, NORM_EPS, b.x,
                                            b.norm_w, 1, b.y, b.post, b.comb);
}

// µs per site of a graph of COPIES sites, replayed REPLAYS times (after one untimed replay).
static double time_graph(cudaStream_t s, Bufs& b, int fused, int head, int iters) {
    return time_graph_us(s, COPIES, REPLAYS, [&](cudaStream_t st) {
        for (int c = 0; c < COPIES; ++c) site(st, b, c, fused, head, iters);
    });
}

// The outputs of one site (x, y, post, comb) as bytes.
static std::vector<char> outputs(cudaStream_t s, Bufs& b, int fused, int head) {
    CK(cudaMemset(b.y, 0xff, D * 4));
    site(s, b, 0, fused, head, ITERS);
    CK(cudaStreamSynchronize(s));
    CK(cudaGetLastError());
    std::vector<char> out((N + D + M + M * M) * 4);
    CK(cudaMemcpy(out.data(), b.x, N * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(out.data() + N * 4, b.y, D * 4, cudaMemcpyDeviceToHost));
    if (!head) {
        CK(cudaMemcpy(out.data() + (N + D) * 4, b.post, M * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(out.data() + (N + D + M) * 4, b.comb, M * M * 4, cudaMemcpyDeviceToHost));
    }
    return out;
}

int main() {
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    auto vec = [&](size_t n, float sd, float mean = 0.0f) {
        std::vector<float> v(n);
        for (auto& x : v) x = mean + sd * nd(rng);
        return v;
    };
    Bufs b;
    b.f = upload(vec(D, 1.0f));
    b.x_prev = upload(vec(N, 1.0f));
    std::vector<float> post(M), comb(M * M, 0.25f);
    for (auto& p : post) p = 1.0f + 0.5f * nd(rng) * 0.1f;
    b.post_prev = upload(post);
    b.comb_prev = upload(comb);
    b.base = upload(vec(NM, 0.5f));
    b.scale = upload(std::vector<float>{0.1f, 0.1f, 0.1f});
    b.norm_w = upload(vec(D, 0.1f, 1.0f));
    for (int c = 0; c < COPIES; ++c) b.fnw[c] = upload(vec((size_t)NM * N, 0.02f));
    b.x = zeros<float>(N);
    b.y = zeros<float>(D);
    b.post = zeros<float>(M);
    b.comb = zeros<float>(M * M);
    b.part = zeros<double>((size_t)SPLITS * (NM + 1));
    b.usq = zeros<double>(D / SITE_COLS);
    b.bars = zeros<unsigned>(2);
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CK(cudaFuncSetAttribute(hc_pre_finish, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
    CK(cudaFuncSetAttribute(hc_head_finish, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));

    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("%s, %d SMs; one row, %d streams × %d, %d mixes, %d splits of %d threads, %d copies of the mixing "
           "weights (%.1f MB)\n",
           prop.name, prop.multiProcessorCount, M, D, NM, SPLITS, BLOCK, COPIES, COPIES * (double)NM * N * 4 / 1e6);
    int bad = 0;
    for (int head = 0; head < 2; ++head) {
        std::vector<char> two = outputs(s, b, 0, head), one = outputs(s, b, 1, head);
        // The sums run in another order: compare as floats (relative to the largest |value| of
        // each output), and x, which both form alike, bit for bit.
        const float *p2 = (const float*)two.data(), *p1 = (const float*)one.data();
        bool x_same = memcmp(p2, p1, N * 4) == 0;
        const char* names[3] = {"y", "post", "comb"};
        int offs[4] = {N, N + D, N + D + M, N + D + M + M * M};
        printf("%s: x %s;", head ? "HcHead" : "HcPre", x_same ? "bit-identical" : "DIFFERS");
        bad += !x_same;
        for (int o = 0; o < (head ? 1 : 3); ++o) {
            double num = 0, den = 0;
            for (int i = offs[o]; i < offs[o + 1]; ++i) {
                double e = (double)p1[i] - (double)p2[i];
                num += e * e;
                den += (double)p2[i] * (double)p2[i];
            }
            double nmse = num / den;
            bool ok = nmse <= 1e-12;  // NaN fails
            bad += !ok;
            printf(" %s NMSE %.2e%s", names[o], nmse, ok ? "" : " (FAIL)");
        }
        printf("\n");
    }
    printf("µs per site (graph of %d sites, %d replays):\n", COPIES, REPLAYS);
    printf("  pieces of the two kernels (HcPre): post-mix %.2f, finish %.2f (with 1 Sinkhorn iteration %.2f)\n",
           time_graph(s, b, 2, 0, ITERS), time_graph(s, b, 3, 0, ITERS), time_graph(s, b, 3, 0, 1));
    for (int round = 0; round < 2; ++round) {
        printf("  round %d: HcPre two kernels %.2f, hc_site %.2f; with 1 Sinkhorn iteration %.2f / %.2f; "
               "HcHead %.2f / %.2f\n",
               round, time_graph(s, b, 0, 0, ITERS), time_graph(s, b, 1, 0, ITERS), time_graph(s, b, 0, 0, 1),
               time_graph(s, b, 1, 0, 1), time_graph(s, b, 0, 1, ITERS), time_graph(s, b, 1, 1, ITERS));
    }
    return bad ? 1 : 0;
}
