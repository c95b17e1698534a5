// Decode attention outside the model: attention.cu's two forms for one row of V4-Flash (64 heads
// × 512, a 128-token window, bf16 cache) in the three layer kinds at 4K of context (window
// only; HCA, 32 entries; CSA, top-512 of 1024), each with sparse_attn_combine as the runtime
// launches them (ops::attention: splits and blocks alike). Each case runs as a CUDA graph of
// COPIES calls over distinct caches (KV_MB in all, past the L2), replayed REPLAYS times; times are
// per call. The two forms' outputs must agree within an NMSE of 1e-10 (the op's tolerance).
// Run on a GPU of sm_80 or newer, from the repository root:
//   nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/ab scripts/attn-bench.cu && /tmp/ab
// (docs/performance.md has its figures.)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>
#include <random>
#include <algorithm>
#include "bench-util.cuh"
#include "../cuda/kernels/common.cuh"
#include "../cuda/kernels/attention.cu"

static const int H = 64, D = 512, WIN = 128, POS = 4095, CAP = 1024, TOPK = 512, COPIES = 48, REPLAYS = 20;
static const int KEYS_PER_SPLIT = 16, HEADS_PER_BLOCK = 8, TC_HEADS = 16, TC_KEYS = 64;

static u16 to_bf16(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return (u16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

struct Copy {
    float *q, *kv;
    u16 *ring, *comp;
    int* idx;
};
struct Bufs {
    Copy c[COPIES];
    float *sink, *out;
    int *slots, *pos;
    i64* err;
    float* pm;
    double *pden, *pacc;
    int sms;
};

// Layer kinds: 0 window only, 1 HCA (all entries, ratio 128), 2 CSA (top-k of ratio 4).
static void kind_args(int kind, int* mode, i64* ratio, i64* cap, int* topk, int* max_keys) {
    *mode = kind == 0 ? CKV_NONE : kind == 1 ? CKV_ALL : CKV_SELECTED;
    *ratio = kind == 1 ? 128 : 4;
    *cap = kind == 1 ? 32 : CAP;
    *topk = kind == 2 ? TOPK : 0;
    *max_keys = WIN + (kind == 0 ? 0 : kind == 1 ? 32 : TOPK);
}

// One call in form `tc` (0: sparse_attn_bf16, 1: sparse_attn_tc_512) on copy c; `combine` 0
// leaves the partials.
// tc 2: the tiles with one split (no partials, no combine).
static void call(cudaStream_t s, Bufs& b, int c, int kind, int tc, bool combine = true) {
    int mode, topk, max_keys;
    i64 ratio, cap;
    kind_args(kind, &mode, &ratio, &cap, &topk, &max_keys);
    float scale = 1.0f / sqrtf((float)D);
    int blocks, splits;
    const Copy& x = b.c[c];
    if (tc) {
        blocks = H / TC_HEADS;
        splits = tc == 2 ? 1 : std::min((b.sms + blocks - 1) / blocks, (max_keys + TC_KEYS - 1) / TC_KEYS);
        size_t smem = AtcSmem<D>::BYTES;
        sparse_attn_tc_512<<<dim3(blocks, splits), ATC_WARPS * 32, smem, s>>>(
            x.q, x.kv, x.ring, b.sink, b.slots, b.pos, x.comp, x.idx, H, 1, WIN, mode, ratio, cap, topk, scale, b.out,
            b.err, splits, b.pm, b.pden, b.pacc, 0, 0, 0, 0, 0, nullptr, 0);
    } else {
        blocks = H / HEADS_PER_BLOCK;
        splits = std::min((4 * b.sms + blocks - 1) / blocks, (max_keys + KEYS_PER_SPLIT - 1) / KEYS_PER_SPLIT);
        sparse_attn_bf16<<<dim3(blocks, splits), HEADS_PER_BLOCK * 32, 0, s>>>(
            x.q, x.kv, x.ring, b.sink, b.slots, b.pos, x.comp, x.idx, H, D, 1, WIN, mode, ratio, cap, topk, scale, b.out,
            b.err, splits, b.pm, b.pden, b.pacc, 1, 0, 0, 0, 0, 0, nullptr, 0);
    }
    if (combine && splits > 1)
        sparse_attn_combine<<<dim3(H, D / 128), 128, (splits + 3) / 4 * 4 * 8, s>>>(
            b.sink, b.slots, b.pos, H, D, 1, splits, b.pm, b.pden, b.pacc, b.out, b.err);
}

static double time_graph(cudaStream_t s, Bufs& b, int kind, int tc, bool combine) {
    return time_graph_us(s, COPIES, REPLAYS, [&](cudaStream_t st) {
        for (int c = 0; c < COPIES; ++c) call(st, b, c, kind, tc, combine);
    });
}

static std::vector<float> output(cudaStream_t s, Bufs& b, int kind, int tc) {
    CK(cudaMemset(b.out, 0xff, (size_t)H * D * 4));
    call(s, b, 0, kind, tc);
    CK(cudaStreamSynchronize(s));
    CK(cudaGetLastError());
    std::vector<float> o((size_t)H * D);
    CK(cudaMemcpy(o.data(), b.out, o.size() * 4, cudaMemcpyDeviceToHost));
    return o;
}

// `ab once`: two CSA calls of the tiles alone, for a profiler or a sanitizer: the host's splits
// (a chunk each), then one split (ten chunks through the double buffer).
int main(int argc, char** argv) {
    std::mt19937 rng(11);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    auto vec = [&](size_t n) {
        std::vector<float> v(n);
        for (auto& x : v) x = nd(rng);
        return v;
    };
    auto bf = [&](size_t n) {
        std::vector<u16> v(n);
        for (auto& x : v) x = to_bf16(nd(rng));
        return v;
    };
    Bufs b;
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    b.sms = prop.multiProcessorCount;
    for (int c = 0; c < COPIES; ++c) {
        b.c[c].q = upload(vec((size_t)H * D));
        b.c[c].kv = upload(vec(D));
        b.c[c].ring = upload(bf((size_t)WIN * D));
        b.c[c].comp = upload(bf((size_t)CAP * D));
        std::vector<int> all(CAP);
        for (int i = 0; i < CAP; ++i) all[i] = i;
        std::shuffle(all.begin(), all.end(), rng);
        all.resize(TOPK);
        b.c[c].idx = upload(all);
    }
    b.sink = upload(vec(H));
    b.out = upload(std::vector<float>((size_t)H * D));
    b.slots = upload(std::vector<int>{0});
    b.pos = upload(std::vector<int>{POS});
    b.err = upload(std::vector<i64>(8, 0));
    size_t n = (size_t)H * 4 * b.sms;
    b.pm = upload(std::vector<float>(n));
    b.pden = upload(std::vector<double>(n));
    b.pacc = upload(std::vector<double>(n * D));
    CK(cudaFuncSetAttribute(sparse_attn_tc_512, cudaFuncAttributeMaxDynamicSharedMemorySize, AtcSmem<D>::BYTES));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    printf("%s, %d SMs; one row at position %d, %d heads × %d, window %d, bf16 cache, %d copies (%.0f MB of KV)\n",
           prop.name, b.sms, POS, H, D, WIN, COPIES, COPIES * (double)(WIN + CAP) * D * 2 / 1e6);
    if (argc > 1 && !strcmp(argv[1], "once")) {
        call(s, b, 0, 2, 1, false);
        call(s, b, 0, 2, 2, false);
        CK(cudaStreamSynchronize(s));
        return 0;
    }
    const char* names[3] = {"window only (128 keys)", "HCA (160 keys)", "CSA (640 keys)"};
    int bad = 0;
    for (int kind = 0; kind < 3; ++kind) {
        std::vector<float> o0 = output(s, b, kind, 0), o1 = output(s, b, kind, 1);
        double num = 0, den = 0;
        bool finite = true;
        for (size_t i = 0; i < o0.size(); ++i) {
            finite &= std::isfinite(o1[i]) && std::isfinite(o0[i]);
            num += (double)(o1[i] - o0[i]) * (o1[i] - o0[i]);
            den += (double)o0[i] * o0[i];
        }
        double nmse = num / den;
        bool ok = finite && nmse <= 1e-10;
        bad += !ok;
        double a0 = time_graph(s, b, kind, 0, false), c0 = time_graph(s, b, kind, 0, true);
        double a1 = time_graph(s, b, kind, 1, false), c1 = time_graph(s, b, kind, 1, true);
        double one = time_graph(s, b, kind, 2, true);
        std::vector<float> o2 = output(s, b, kind, 2);
        double num2 = 0;
        for (size_t i = 0; i < o0.size(); ++i) {
            finite &= std::isfinite(o2[i]);
            num2 += (double)(o2[i] - o0[i]) * (o2[i] - o0[i]);
        }
        bool ok2 = finite && num2 / den <= 1e-10;
        bad += !ok2;
        printf("%-24s warp per head: %6.2f us (+ combine: %6.2f); tiles: %6.2f us (+ combine: %6.2f), one split "
               "%6.2f us; NMSE %.2e, %.2e %s\n",
               names[kind], a0, c0, a1, c1, one, nmse, num2 / den, ok && ok2 ? "ok" : "FAIL");
    }
    i64 err[8];
    CK(cudaMemcpy(err, b.err, sizeof(err), cudaMemcpyDeviceToHost));
    if (err[0] != 0) {
        printf("device error %lld\n", err[0]);
        bad++;
    }
    return bad ? 1 : 0;
}
