// The lightning indexer's scores and top-k (hal::ops::indexer).

// scores[r', j] = Σ_h (w[r, h]·ws) · max(0, q[r, h] · keys[s, j]) for j < n = (p + 1) / ratio,
// r = r0 + r'. Each head dot in f64 rounded to f32, the head sum in f64 rounded once. One warp
// per (row, key); grid-stride over rows·cap warps (keys past n are skipped).
extern "C" __global__ void index_scores(const float* q, const float* w, const float* keys, const int* slots,
                                        const int* pos, i64 r0, i64 nrows, i64 heads, i64 d, int num_slots, i64 cap,
                                        i64 ratio, float ws, float* scores, const i64* err) {
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
        const float* k = keys + ((i64)s * cap + j) * d;
        const float* qr = q + r * heads * d;
        double total = 0.0;
        for (i64 h = 0; h < heads; ++h) {
            double acc = 0.0;
            for (i64 c = lane; c < d; c += 32) acc += (double)qr[h * d + c] * (double)k[c];
            acc = warp_sum_d(acc);
            float dot = fmaxf((float)acc, 0.0f);
            total += (double)(w[r * heads + h] * ws) * (double)dot;
        }
        if (lane == 0) scores[rl * cap + j] = (float)total;
    }
}

// index_scores for 64 heads and d = 32·DW: one warp per (row, key); lane l holds the key's values
// l, l + 32, … and forms its partial dot with every head in f32 FMA; a reduce-scatter across the
// warp (31 exchanges per 32 heads instead of a 31-step sum per head) leaves lane l with the dots
// of heads l and l + 32; the weighted head sum is a warp sum in f64, rounded once. The dots are
// f32, not index_scores' f64 (whose conversions run at 1/8 the f32 rate and dominate at 10^5
// keys): within ~1e-6 of it, far inside the op's near-tie tolerance.
template <int DW>
__device__ __forceinline__ void index_scores_h64_impl(const float* q, const float* w, const float* keys, const int* slots,
                                                      const int* pos, i64 r0, i64 nrows, i64 d, int num_slots, i64 cap,
                                                      i64 ratio, float ws, float* scores) {
    int lane = threadIdx.x & 31;
    i64 warps = nrows * cap;
    i64 stride = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 g = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; g < warps; g += stride) {
        i64 rl = g / cap, j = g % cap, r = r0 + rl;
        int s = slots[r], p = pos[r];
        if (s < 0 || s >= num_slots || p < 0) continue;
        i64 n = ((i64)p + 1) / ratio;
        if (j >= n || j >= cap) continue;
        const float* k = keys + ((i64)s * cap + j) * d;
        const float* qr = q + r * 64 * d;
        float kv[DW];
#pragma unroll
        for (int c = 0; c < DW; ++c) kv[c] = k[lane + 32 * c];
        double total = 0.0;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float v[32];
#pragma unroll
            for (int h = 0; h < 32; ++h) {
                const float* qh = qr + (i64)(half * 32 + h) * d + lane;
                float a = 0.0f;
#pragma unroll
                for (int c = 0; c < DW; ++c) a = fmaf(qh[32 * c], kv[c], a);
                v[h] = a;
            }
#pragma unroll
            for (int st = 16; st >= 1; st >>= 1) {
                bool upper = (lane & st) != 0;
#pragma unroll
                for (int i = 0; i < st; ++i) {
                    float give = upper ? v[i] : v[i + st];
                    float keep = upper ? v[i + st] : v[i];
                    v[i] = keep + __shfl_xor_sync(FULL_MASK, give, st);
                }
            }
            float dot = fmaxf(v[0], 0.0f);
            total += (double)(w[r * 64 + half * 32 + lane] * ws) * (double)dot;
        }
        total = warp_sum_d(total);
        if (lane == 0) scores[rl * cap + j] = (float)total;
    }
}

extern "C" __global__ void index_scores_h64(const float* q, const float* w, const float* keys, const int* slots,
                                            const int* pos, i64 r0, i64 nrows, i64 heads, i64 d, int num_slots,
                                            i64 cap, i64 ratio, float ws, float* scores, const i64* err) {
    if (err[0] != 0) return;
    switch (d) {
        case 64: index_scores_h64_impl<2>(q, w, keys, slots, pos, r0, nrows, d, num_slots, cap, ratio, ws, scores); break;
        case 128: index_scores_h64_impl<4>(q, w, keys, slots, pos, r0, nrows, d, num_slots, cap, ratio, ws, scores); break;
        default: index_scores_h64_impl<8>(q, w, keys, slots, pos, r0, nrows, d, num_slots, cap, ratio, ws, scores); break;
    }
}

// One block (1024 threads) per row r = r0 + blockIdx.x: the min(k, n) largest scores by
// (score descending by f32::total_cmp, index ascending), as indices and scores, padded with −1
// and −∞. Radix select of the k-th key (4 passes of 8 bits), ordered collection of the ties at
// the threshold (lowest indices first), then a bitonic sort in shared memory. Static shared
// memory: about 37 KiB (TOPK_STATIC_SMEM on the host).
// Dynamic shared memory: P u64 with P = the power of two ≥ min(k, cap) (host-sized).
extern "C" __global__ void __launch_bounds__(1024) topk_rows(const float* scores, const int* slots, const int* pos, i64 r0, i64 cap,
                                     i64 ratio, int num_slots, int k, int* out_idx, float* out_score,
                                     const i64* err) {
    extern __shared__ u64 sel[];
    __shared__ u32 hist[256];
    __shared__ u32 whist[32][256];
    __shared__ u32 s_prefix;
    __shared__ int s_remaining, s_gt;
    __shared__ int s_cnt[1024];
    if (err[0] != 0) return;
    i64 rl = blockIdx.x, r = r0 + rl;
    int s = slots[r], p = pos[r];
    if (s < 0 || s >= num_slots || p < 0) return;
    i64 n = ((i64)p + 1) / ratio;
    if (n > cap) n = cap;
    const float* sr = scores + rl * cap;
    int m = (i64)k < n ? k : (int)n;
    int P = 1;
    while (P < m) P <<= 1;
    int tid = threadIdx.x, bd = blockDim.x;
    if (n <= k) {
        for (int i = tid; i < n; i += bd) sel[i] = rank_code(sr[i], (u32)i);
    } else {
        u32 prefix = 0, mask = 0;
        int remaining = k;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int i = tid; i < 32 * 256; i += bd) (&whist[0][0])[i] = 0;
            __syncthreads();
            // Per-warp histograms, one shared-memory add per distinct digit per warp step: the
            // keys of one row share their top digits, and single adds from 1024 threads to the
            // same bin serialize (milliseconds at 10^5 keys).
            i64 nr = (n + bd - 1) / bd * bd;
            for (i64 i = tid; i < nr; i += bd) {
                u32 u = i < n ? total_key(sr[i]) : 0u;
                bool take = i < n && (u & mask) == prefix;
                u32 digit = take ? (u >> shift) & 255u : 256u;
                u32 peers = __match_any_sync(FULL_MASK, digit);
                if (take && __ffs(peers) - 1 == (tid & 31)) atomicAdd(&whist[tid >> 5][digit], (u32)__popc(peers));
            }
            __syncthreads();
            for (int dg = tid; dg < 256; dg += bd) {
                u32 t = 0;
                for (int w = 0; w < (bd >> 5); ++w) t += whist[w][dg];
                hist[dg] = t;
            }
            __syncthreads();
            if (tid == 0) {
                u32 cum = 0;
                for (int dgt = 255; dgt >= 0; --dgt) {
                    if (cum + hist[dgt] >= (u32)remaining) {
                        prefix |= (u32)dgt << shift;
                        remaining -= (int)cum;
                        break;
                    }
                    cum += hist[dgt];
                }
                s_prefix = prefix;
                s_remaining = remaining;
            }
            __syncthreads();
            prefix = s_prefix;
            remaining = s_remaining;
            mask |= 255u << shift;
        }
        // prefix = the k-th largest key; `remaining` of the elements equal to it are taken.
        if (tid == 0) s_gt = 0;
        __syncthreads();
        i64 chunk = (n + bd - 1) / bd;
        i64 lo = tid * chunk, hi = lo + chunk < n ? lo + chunk : n;
        int eq = 0;
        for (i64 i = lo; i < hi; ++i) {
            u32 u = total_key(sr[i]);
            if (u > prefix) sel[atomicAdd(&s_gt, 1)] = rank_code(sr[i], (u32)i);
            else if (u == prefix) ++eq;
        }
        s_cnt[tid] = eq;
        __syncthreads();
        if (tid == 0) {
            int acc = 0;
            for (int t = 0; t < bd; ++t) {
                int c = s_cnt[t];
                s_cnt[t] = acc;
                acc += c;
            }
        }
        __syncthreads();
        int rank = s_cnt[tid];
        int gt = k - remaining;
        for (i64 i = lo; i < hi && rank < remaining; ++i) {
            if (total_key(sr[i]) == prefix) {
                sel[gt + rank] = rank_code(sr[i], (u32)i);
                ++rank;
            }
        }
    }
    for (int i = m + tid; i < P; i += bd) sel[i] = 0;
    __syncthreads();
    // Bitonic sort, descending.
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
    for (int t = tid; t < k; t += bd) {
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
