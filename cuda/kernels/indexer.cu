// The lightning indexer's scores and top-k (hal::ops::indexer).

// The keys (the indexer compressor's cache) are f32 or bf16: the scoring kernels are templates on
// the key type C (float or u16, read through cache_load / key4), with one entry point per type
// (index_scores / index_scores_bf16, index_scores_t / index_scores_t_bf16) that the host picks.

// scores[r', j] = Σ_h (w[r, h]·ws) · max(0, q[r, h] · keys[s, j]) for j < n = (p + 1) / ratio,
// r = r0 + r'. Each head dot in f64 rounded to f32, the head sum in f64 rounded once. One warp
// per (row, key); grid-stride over rows·cap warps (keys past n are skipped).
template <typename C>
__device__ __forceinline__ void index_scores_rows(const float* q, const float* w, const C* keys, const int* slots,
                                                  const int* pos, i64 r0, i64 nrows, i64 heads, i64 d,
                                                  int num_slots, i64 cap, i64 ratio, float ws, float* scores,
                                                  const i64* err, i64 /* wide_from: index_scores_t's */) {
    if (err[0] != 0) return;
    int lane = threadIdx.x & 31;
    i64 warps = nrows * cap;
    i64 stride = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 g = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; g < warps; g += stride) {
        i64 rl = g / cap, j = g % cap, r = r0 + rl;
        int s = slots[r], p = pos[r];
        if (s < 0 || s >= num_slots || p < 0) continue;
        i64 n = ((i64)p + 1) / ratio;
        if (j >= n || j >= cap) continue;
        const C* k = keys + ((i64)s * cap + j) * d;
        const float* qr = q + r * heads * d;
        double total = 0.0;
        for (i64 h = 0; h < heads; ++h) {
            double acc = 0.0;
            for (i64 c = lane; c < d; c += 32) acc += (double)qr[h * d + c] * (double)cache_load(k + c);
            acc = warp_sum_d(acc);
            float dot = fmaxf((float)acc, 0.0f);
            total += (double)(w[r * heads + h] * ws) * (double)dot;
        }
        if (lane == 0) scores[rl * cap + j] = (float)total;
    }
}

// Elements 4·c4 .. 4·c4 + 3 of a key row: one float4 (f32), or one uint2 of four bf16 widened
// (element 4·c4 in the low half of .x: little-endian).
__device__ __forceinline__ void key4(const float* k, i64 c4, float* kc) {
    float4 v = ((const float4*)k)[c4];
    kc[0] = v.x; kc[1] = v.y; kc[2] = v.z; kc[3] = v.w;
}
__device__ __forceinline__ void key4(const u16* k, i64 c4, float* kc) {
    uint2 v = ((const uint2*)k)[c4];
    kc[0] = bf16_to_f32((u16)v.x); kc[1] = bf16_to_f32((u16)(v.x >> 16));
    kc[2] = bf16_to_f32((u16)v.y); kc[3] = bf16_to_f32((u16)(v.y >> 16));
}

// acc[h] = the f32 FMA dot of key row k with head h of qt [d][64] (offset to the first of NH
// heads), c ascending: two float4 of q per key column for 8 heads, the same address for the
// whole warp.
template <int NH, typename C>
__device__ __forceinline__ void key_dots(const C* k, const float* qt, i64 d, float* acc) {
#pragma unroll
    for (int h = 0; h < NH; ++h) acc[h] = 0.0f;
#pragma unroll(NH < 64 ? 2 : 1)
    for (i64 c4 = 0; c4 < d / 4; ++c4) {
        float kc[4];
        key4(k, c4, kc);
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
            const float4* qrow = (const float4*)(qt + (c4 * 4 + cc) * 64);
#pragma unroll
            for (int h4 = 0; h4 < NH / 4; ++h4) {
                float4 qv = qrow[h4];
                acc[4 * h4] = fmaf(qv.x, kc[cc], acc[4 * h4]);
                acc[4 * h4 + 1] = fmaf(qv.y, kc[cc], acc[4 * h4 + 1]);
                acc[4 * h4 + 2] = fmaf(qv.z, kc[cc], acc[4 * h4 + 2]);
                acc[4 * h4 + 3] = fmaf(qv.w, kc[cc], acc[4 * h4 + 3]);
            }
        }
    }
}

// Σ_h w[h]·max(0, acc[h]) in f64, head order, over the first `valid` of NH heads (heads past
// the op's are skipped, not added as zeros, which would turn a −0 sum into +0).
template <int NH>
__device__ __forceinline__ double relu_dot_sum(const float* acc, const float* w, int valid) {
    double t = 0.0;
#pragma unroll
    for (int h = 0; h < NH; ++h)
        if (h < valid) t += (double)w[h] * (double)fmaxf(acc[h], 0.0f);
    return t;
}

// index_scores by tiles of IS_KEYS keys, for up to 64 heads and d % 4 == 0: block (tile, row) of
// 256 threads, where thread (group g, key j) forms the f32 FMA dots of key j with heads
// 8g .. 8g + 7, reading q from shared memory transposed to [d][64] (two float4 give its eight
// heads, the same address for the whole warp, so no bank conflicts and no cross-lane sums),
// and their Σ_h (w·ws)·max(0, dot_h) in f64 in head order (key_dots, relu_dot_sum); one thread
// per key adds the eight groups' f64 sums in group order and rounds once. The dots are f32, not index_scores' f64: f64
// conversions run at 1/8 the f32 FMA rate and dominate at 10^5 keys; the f32 dot is within ~1e-6
// of the f64 one, far inside the op's near-tie tolerance (as is the grouping of the f64 sum).
// Eight head groups rather than one thread for all 64 heads give a 4K context's 1024 keys 32
// blocks instead of 4 (that kernel took 33 µs of a decode step). From `wide_from` visible keys
// on (host: a tile of 256 keys for half the SMs), each thread takes one key with all 64
// heads instead (`wide`: the dots in registers, the f64 sum over all heads in head order): each
// key row is then read by one thread rather than eight, which at 1M tokens (256K keys) ran in
// half the time of the grouped form. Blocks stride over the tiles, so long rows stage q once per
// block, not once per tile. Dynamic shared memory (host:
// indexer::scores_t_smem): q [d][64] f32, the weights w·ws [64] f32, the sums [IS_KEYS][8] f64.
// A key row is read four elements at a time (key4: 16 bytes f32, 8 bytes bf16; key rows are
// aligned to that since d % 4 == 0).
#define IS_KEYS 32
#define IS_HEADS_PER_THREAD 8
template <typename C>
__device__ __forceinline__ void index_scores_t_rows(const float* q, const float* w, const C* keys, const int* slots,
                                                    const int* pos, i64 r0, i64 nrows, i64 heads, i64 d,
                                                    int num_slots, i64 cap, i64 ratio, float ws, float* scores,
                                                    const i64* err, i64 wide_from) {
    extern __shared__ double is_smem[];
    constexpr int groups = 64 / IS_HEADS_PER_THREAD;
    double* part = is_smem;                             // [IS_KEYS][groups]
    float* wsh = (float*)(is_smem + IS_KEYS * groups);  // [64]
    float* qt = wsh + 64;                               // [d][64]
    if (err[0] != 0) return;
    i64 rl = blockIdx.y, r = r0 + rl;
    int s = slots[r], p = pos[r];
    if (s < 0 || s >= num_slots || p < 0) return;
    i64 n = ((i64)p + 1) / ratio;
    if (n > cap) n = cap;
    bool wide = n >= wide_from;
    i64 tile = wide ? (i64)blockDim.x : IS_KEYS;
    if ((i64)blockIdx.x * tile >= n) return;
    if (threadIdx.x < 64) wsh[threadIdx.x] = threadIdx.x < heads ? w[r * heads + threadIdx.x] * ws : 0.0f;
    // q [heads][d] → qt [d][64]: a float4 of columns per thread, a warp's lanes 32 heads (whole
    // 16-byte pieces of the rows, and stores to 32 banks); all loads are issued before the stores.
    const float4* qr4 = (const float4*)(q + r * heads * d);
#pragma unroll 8
    for (i64 e = threadIdx.x; e < d * 16; e += blockDim.x) {
        i64 c4 = e >> 6;
        int h = (int)(e & 63);
        float4 v = h < heads ? qr4[h * (d / 4) + c4] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        qt[(4 * c4) * 64 + h] = v.x;
        qt[(4 * c4 + 1) * 64 + h] = v.y;
        qt[(4 * c4 + 2) * 64 + h] = v.z;
        qt[(4 * c4 + 3) * 64 + h] = v.w;
    }
    __syncthreads();
    if (wide) {
        for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (i64)gridDim.x * blockDim.x) {
            const C* k = keys + ((i64)s * cap + j) * d;
            float acc[64];
            key_dots<64>(k, qt, d, acc);
            double total = relu_dot_sum<64>(acc, wsh, (int)heads);
            scores[rl * cap + j] = (float)total;
        }
        return;
    }
    int jl = threadIdx.x % IS_KEYS, g = threadIdx.x / IS_KEYS;
    for (i64 j0 = (i64)blockIdx.x * IS_KEYS; j0 < n; j0 += (i64)gridDim.x * IS_KEYS) {
        i64 j = j0 + jl;
        if (j < n) {
            const C* k = keys + ((i64)s * cap + j) * d;
            int h0 = g * IS_HEADS_PER_THREAD;
            float acc[IS_HEADS_PER_THREAD];
            key_dots<IS_HEADS_PER_THREAD>(k, qt + h0, d, acc);
            double sum = relu_dot_sum<IS_HEADS_PER_THREAD>(acc, wsh + h0, (int)heads - h0);
            part[jl * groups + g] = sum;
        }
        __syncthreads();
        if (g == 0 && j < n) {
            double total = 0.0;
#pragma unroll
            for (int q = 0; q < groups; ++q) total += part[jl * groups + q];
            scores[rl * cap + j] = (float)total;
        }
        __syncthreads();
    }
}

// The entry points, one per key type (each compiled, registers included, for its own
// instantiation); the host picks one (ops::cache_kernel).
#define INDEX_SCORES_KERNEL(BOUNDS, NAME, BODY, C)                                                                   \
    extern "C" __global__ void BOUNDS NAME(const float* q, const float* w, const C* keys, const int* slots,         \
                                           const int* pos, i64 r0, i64 nrows, i64 heads, i64 d, int num_slots,     \
                                           i64 cap, i64 ratio, float ws, float* scores, const i64* err,            \
                                           i64 wide_from) {                                                        \
        grid_dep_begin();                                                                                          \
        BODY(q, w, keys, slots, pos, r0, nrows, heads, d, num_slots, cap, ratio, ws, scores, err, wide_from);       \
    }
INDEX_SCORES_KERNEL(, index_scores, index_scores_rows, float)
INDEX_SCORES_KERNEL(, index_scores_bf16, index_scores_rows, u16)
INDEX_SCORES_KERNEL(__launch_bounds__(256), index_scores_t, index_scores_t_rows, float)
INDEX_SCORES_KERNEL(__launch_bounds__(256), index_scores_t_bf16, index_scores_t_rows, u16)

// ---- top-k ------------------------------------------------------------------------------------
// Order: score descending by f32::total_cmp, index ascending — i.e. rank_code descending.

// Element i of a top-k source: row scores (code rank_code(score, base + i)) or the sorted
// candidate codes of topk_partial (0 = padding).
struct TopkSrc {
    const float* sr;
    const u64* cr;
    i64 base;
    __device__ __forceinline__ u32 key(i64 i) const { return sr ? total_key(sr[i]) : (u32)(cr[i] >> 32); }
    __device__ __forceinline__ u64 code(i64 i) const { return sr ? rank_code(sr[i], (u32)(base + i)) : cr[i]; }
};

struct TopkShared {
    u32 whist[32][256];
    u32 prefix;
    int remaining, gt;
    u32 scan[32];
};

// Inclusive prefix sum of v over the block's threads in thread order; called by every thread of
// a block of whole warps (at most 1024 threads). `tot`: 32 words of shared scratch.
__device__ __forceinline__ u32 block_incl_scan(u32 v, u32* tot) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 1; o < 32; o <<= 1) {
        u32 u = __shfl_up_sync(FULL_MASK, v, o);
        if (lane >= o) v += u;
    }
    if (lane == 31) tot[w] = v;
    __syncthreads();
    if (w == 0) {
        u32 t = lane < nw ? tot[lane] : 0u;
        for (int o = 1; o < 32; o <<= 1) {
            u32 u = __shfl_up_sync(FULL_MASK, t, o);
            if (lane >= o) t += u;
        }
        tot[lane] = t;
    }
    __syncthreads();
    u32 r = v + (w > 0 ? tot[w - 1] : 0u);
    __syncthreads();
    return r;
}

// The m = min(k, n) largest codes of src[0..n) into sel[0..m) (unordered), then sel[m..P) = 0 and
// sorted descending; called by the whole block (1024 threads), P a power of two ≥ m. Radix select
// of the k-th key (4 passes of 8 bits; per-warp histograms with one shared add per distinct digit
// per warp step, since the keys share their top digits and 1024 threads adding to one bin
// serialize), then the elements above it and the ties at it in source order (lowest index first).
// The digit search and the ties' ranks are block scans: one thread walking 256 bins per pass and
// 1024 counts was most of the kernel's 40 µs at 1024 keys.
__device__ void topk_select_sort(const TopkSrc& src, i64 n, int k, int m, int P, u64* sel, TopkShared& sh) {
    int tid = threadIdx.x, bd = blockDim.x;
    if (n <= k) {
        for (int i = tid; i < n; i += bd) sel[i] = src.code(i);
    } else {
        u32 prefix = 0, mask = 0;
        int remaining = k;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int i = tid; i < 32 * 256; i += bd) (&sh.whist[0][0])[i] = 0;
            if (tid == 0) {
                sh.prefix = prefix;
                sh.remaining = remaining;
            }
            __syncthreads();
            i64 nr = (n + bd - 1) / bd * bd;
            for (i64 i = tid; i < nr; i += bd) {
                u32 u = i < n ? src.key(i) : 0u;
                bool take = i < n && (u & mask) == prefix;
                u32 digit = take ? (u >> shift) & 255u : 256u;
                u32 peers = __match_any_sync(FULL_MASK, digit);
                if (take && __ffs(peers) - 1 == (tid & 31)) atomicAdd(&sh.whist[tid >> 5][digit], (u32)__popc(peers));
            }
            __syncthreads();
            // Thread j < 256 takes digit 255 − j: its inclusive scan is the count at or above
            // the digit, and the k-th key's digit is the one thread where it first reaches
            // `remaining`.
            u32 here = 0;
            if (tid < 256) {
                for (int w = 0; w < (bd >> 5); ++w) here += sh.whist[w][255 - tid];
            }
            u32 upto = block_incl_scan(here, sh.scan);
            if (tid < 256 && upto - here < (u32)remaining && upto >= (u32)remaining) {
                sh.prefix = prefix | ((u32)(255 - tid) << shift);
                sh.remaining = remaining - (int)(upto - here);
            }
            __syncthreads();
            prefix = sh.prefix;
            remaining = sh.remaining;
            mask |= 255u << shift;
        }
        // prefix = the k-th largest key; `remaining` of the elements equal to it are taken.
        if (tid == 0) sh.gt = 0;
        __syncthreads();
        i64 chunk = (n + bd - 1) / bd;
        i64 lo = tid * chunk, hi = lo + chunk < n ? lo + chunk : n;
        int eq = 0;
        for (i64 i = lo; i < hi; ++i) {
            u32 u = src.key(i);
            if (u > prefix) sel[atomicAdd(&sh.gt, 1)] = src.code(i);
            else if (u == prefix) ++eq;
        }
        int rank = (int)(block_incl_scan((u32)eq, sh.scan) - (u32)eq);
        int gt = k - remaining;
        for (i64 i = lo; i < hi && rank < remaining; ++i) {
            if (src.key(i) == prefix) {
                sel[gt + rank] = src.code(i);
                ++rank;
            }
        }
    }
    for (int i = m + tid; i < P; i += bd) sel[i] = 0;
    __syncthreads();
    // Bitonic sort, descending. Where each thread can hold one element (P ≤ threads), thread i
    // keeps element i in a register: partners closer than 32 are a shuffle away, farther ones
    // are swapped through sel (two barriers), so only 10 of the 45 stages of P = 512 wait on the
    // block.
    if (P <= bd) {
        u64 x = tid < P ? sel[tid] : 0;
        for (int size = 2; size <= P; size <<= 1) {
            for (int st = size >> 1; st > 0; st >>= 1) {
                u64 y;
                if (st >= 32) {
                    __syncthreads();
                    if (tid < P) sel[tid] = x;
                    __syncthreads();
                    y = tid < P ? sel[tid ^ st] : 0;
                } else {
                    y = __shfl_xor_sync(FULL_MASK, x, st);
                }
                bool keep_larger = ((tid & st) == 0) == ((tid & size) == 0);
                x = keep_larger ? (x > y ? x : y) : (x < y ? x : y);
            }
        }
        __syncthreads();
        if (tid < P) sel[tid] = x;
        __syncthreads();
        return;
    }
    for (int size = 2; size <= P; size <<= 1) {
        for (int st = size >> 1; st > 0; st >>= 1) {
            for (int i = tid; i < P; i += bd) {
                int jx = i ^ st;
                if (jx > i) {
                    u64 x = sel[i], y = sel[jx];
                    bool desc = (i & size) == 0;
                    if ((x < y) == desc) {
                        sel[i] = y;
                        sel[jx] = x;
                    }
                }
            }
            __syncthreads();
        }
    }
}

// The bitonic sort's size for m codes: the smallest power of two ≥ m.
__device__ __forceinline__ int pow2_at_least(int m) {
    int P = 1;
    while (P < m) P <<= 1;
    return P;
}

// The visible entries n of row r, or −1 for a row the checks rejected.
__device__ __forceinline__ i64 topk_visible(const int* slots, const int* pos, i64 r, int num_slots, i64 ratio, i64 cap) {
    int s = slots[r], p = pos[r];
    if (s < 0 || s >= num_slots || p < 0) return -1;
    i64 n = ((i64)p + 1) / ratio;
    return n < cap ? n : cap;
}

// Row r's indices and scores from the sorted codes sel[0..m), padded with −1 and −∞.
__device__ __forceinline__ void topk_write(const u64* sel, int m, int k, const float* sr, i64 r, int* out_idx,
                                           float* out_score) {
    for (int t = threadIdx.x; t < k; t += blockDim.x) {
        if (t < m) {
            u32 idx = 0xFFFFFFFFu - (u32)(sel[t] & 0xFFFFFFFFull);
            out_idx[r * k + t] = (int)idx;
            out_score[r * k + t] = sr[idx];
        } else {
            out_idx[r * k + t] = -1;
            out_score[r * k + t] = __uint_as_float(0xff800000u);
        }
    }
}

// One block (1024 threads) per row r = r0 + blockIdx.x: the top min(k, n) of the row's scores.
// Dynamic shared memory: P u64 with P = the power of two ≥ min(k, cap) (host-sized). A block
// bounds its row's slot, position and visible entries (topk_visible), as the score kernels do, so
// the op's row check may run beside it (ROWS_CHECK_BLOCK).
extern "C" __global__ void __launch_bounds__(1024) topk_rows(const float* scores, const int* slots, const int* pos, i64 r0, i64 cap,
                                     i64 ratio, int num_slots, int k, int* out_idx, float* out_score,
                                     i64* err, ROWS_CHECK_PARAMS) {
    grid_dep_begin();
    ROWS_CHECK_BLOCK(slots, pos, num_slots, err)
    extern __shared__ u64 sel[];
    __shared__ TopkShared sh;
    if (err[0] != 0) return;
    i64 rl = blockIdx.x, r = r0 + rl;
    i64 n = topk_visible(slots, pos, r, num_slots, ratio, cap);
    if (n < 0) return;
    const float* sr = scores + rl * cap;
    int m = (i64)k < n ? k : (int)n;
    int P = pow2_at_least(m);
    TopkSrc src = {sr, nullptr, 0};
    topk_select_sort(src, n, k, m, P, sel, sh);
    topk_write(sel, m, k, sr, r, out_idx, out_score);
}

// Rows of at most RANK_MAX entries: entry i's place in the output is its rank, the number of
// entries that come before it in (key descending, index ascending) order, so the top-k comes out
// sorted with no select or sort, and ranks ≥ k are dropped. Grid (tiles of RANK_BLOCK entries,
// + the row check column, rows); each block stages the row's n keys in shared memory and a thread
// counts for one entry. A warp's entries are consecutive, so against the keys before the warp
// a tie counts (lower index), against those after it only a greater key does, and only its own
// 32 keys need both tests. n² comparisons, spread over n / RANK_BLOCK blocks: at n = 1024 that is
// 8 blocks of 1024 comparisons a thread, where topk_rows' select and sort wait on ~60 block
// barriers. A block bounds its row as topk_rows does, so the row check may run beside it.
#define RANK_BLOCK 128
#define RANK_MAX 4096
extern "C" __global__ void __launch_bounds__(RANK_BLOCK)
    topk_rank(const float* scores, const int* slots, const int* pos, i64 r0, i64 cap, i64 ratio, int num_slots, int k,
              int* out_idx, float* out_score, i64* err, ROWS_CHECK_PARAMS) {
    grid_dep_begin();
    ROWS_CHECK_BLOCK(slots, pos, num_slots, err)
    __shared__ __align__(16) u32 keys[RANK_MAX];
    if (err[0] != 0) return;
    i64 rl = blockIdx.y, r = r0 + rl;
    i64 n = topk_visible(slots, pos, r, num_slots, ratio, cap);
    if (n < 0) return;
    int tid = threadIdx.x, m = (i64)k < n ? k : (int)n;
    if (blockIdx.x == 0) {
        for (int t = m + tid; t < k; t += RANK_BLOCK) {
            out_idx[r * k + t] = -1;
            out_score[r * k + t] = __uint_as_float(0xff800000u);
        }
    }
    int base = blockIdx.x * RANK_BLOCK;
    if (base >= n) return;
    const float* sr = scores + rl * cap;
    int nn = (int)n, n4 = (nn + 3) & ~3;
    // Eight loads a thread issued before their stores (traced at 8.3 µs with or without this).
    for (int j0 = tid; j0 < n4; j0 += 8 * RANK_BLOCK) {
        u32 v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            int j = j0 + u * RANK_BLOCK;
            v[u] = j < nn ? total_key(sr[j]) : 0u;
        }
#pragma unroll
        for (int u = 0; u < 8; ++u)
            if (j0 + u * RANK_BLOCK < n4) keys[j0 + u * RANK_BLOCK] = v[u];
    }
    __syncthreads();
    int i = base + tid, w0 = base + (tid & ~31);
    if (i >= nn) return;
    u32 ki = keys[i];
    int rank = 0;
    const uint4* k4 = (const uint4*)keys;
    for (int j = 0; j < w0 / 4; ++j) {  // w0 is a multiple of 32
        uint4 c = k4[j];
        rank += (c.x >= ki) + (c.y >= ki) + (c.z >= ki) + (c.w >= ki);
    }
    int w1 = w0 + 32 < nn ? w0 + 32 : nn;
    for (int j = w0; j < w1; ++j) rank += keys[j] > ki || (keys[j] == ki && j < i);
    // After the warp's keys (w1 = w0 + 32 then, a multiple of 4), in whole uint4s: the padding
    // keys are 0, never greater.
    if (w1 < nn) {
        for (int j = w1 / 4; j < n4 / 4; ++j) {
            uint4 c = k4[j];
            rank += (c.x > ki) + (c.y > ki) + (c.z > ki) + (c.w > ki);
        }
    }
    if (rank < k) {
        out_idx[r * k + rank] = i;
        out_score[r * k + rank] = sr[i];
    }
}

// Long rows, stage 1: block (row, segment) writes the sorted top min(k, len) codes of its `seg`
// scores to cand[(row·segments + segment)·k ..], padded with 0. Same shared memory as topk_rows.
extern "C" __global__ void __launch_bounds__(1024) topk_partial(const float* scores, const int* slots, const int* pos, i64 r0,
                                        i64 cap, i64 ratio, int num_slots, int k, i64 seg, u64* cand,
                                        const i64* err) {
    grid_dep_begin();
    extern __shared__ u64 sel[];
    __shared__ TopkShared sh;
    if (err[0] != 0) return;
    i64 rl = blockIdx.x, r = r0 + rl;
    i64 n = topk_visible(slots, pos, r, num_slots, ratio, cap);
    if (n < 0) return;
    i64 lo = (i64)blockIdx.y * seg, len = n - lo < seg ? n - lo : seg;
    u64* out = cand + ((i64)rl * gridDim.y + blockIdx.y) * k;
    if (len <= 0) {
        for (int t = threadIdx.x; t < k; t += blockDim.x) out[t] = 0;
        return;
    }
    int m = (i64)k < len ? k : (int)len;
    int P = pow2_at_least(m);
    TopkSrc src = {scores + rl * cap + lo, nullptr, lo};
    topk_select_sort(src, len, k, m, P, sel, sh);
    for (int t = threadIdx.x; t < k; t += blockDim.x) out[t] = t < m ? sel[t] : 0;
}

// Long rows, stage 2: the top min(k, n) of the row's segments·k candidates (the segments' top-k
// contain the row's; equal scores stay in index order: segments in order, each sorted).
extern "C" __global__ void __launch_bounds__(1024) topk_merge(const float* scores, const u64* cand, int segments,
                                      const int* slots, const int* pos, i64 r0, i64 cap, i64 ratio,
                                      int num_slots, int k, int* out_idx, float* out_score, const i64* err) {
    grid_dep_begin();
    extern __shared__ u64 sel[];
    __shared__ TopkShared sh;
    if (err[0] != 0) return;
    i64 rl = blockIdx.x, r = r0 + rl;
    i64 n = topk_visible(slots, pos, r, num_slots, ratio, cap);
    if (n < 0) return;
    int m = (i64)k < n ? k : (int)n;
    int P = pow2_at_least(m);
    TopkSrc src = {nullptr, cand + (i64)rl * segments * k, 0};
    topk_select_sort(src, (i64)segments * k, m, m, P, sel, sh);
    topk_write(sel, m, k, scores + rl * cap, r, out_idx, out_score);
}
