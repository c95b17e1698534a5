// Sparse attention with per-head sinks over the window plus compressed entries, and the window
// ring store (hal::ops::attention). The KV cache (ring, compressed entries) is f32 or bf16; with a
// bf16 cache every key is a bf16 value, this call's fresh kv rows included (rounded on the fly).

#define CKV_NONE 0
#define CKV_ALL 1
#define CKV_SELECTED 2

// ring[slot, pos mod window] = kv[r] — only for the last row of its slot that maps to that ring
// entry (row r + window of the same slot would overwrite it: rows in order). C = float or u16: an
// f32 or bf16 ring (cache_store keeps the nearest-even bf16).
template <typename C>
__device__ __forceinline__ void window_store_rows(const float* kv, const int* slots, const int* pos, C* ring, i64 rows,
                                                  int num_slots, i64 window, i64 dim, const i64* err) {
    if (err[0] != 0) return;
    i64 total = rows * dim;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 r = i / dim, c = i % dim;
        int s = slots[r], p = pos[r];
        if (s < 0 || s >= num_slots || p < 0) continue;
        if (r + window < rows && slots[r + window] == s) continue;
        float v = kv[i];
        cache_store(ring + ((i64)s * window + p % window) * dim + c, v);
    }
}

// window_store (f32 ring) and window_store_bf16 (bf16 ring); the host picks one (ops::cache_kernel).
extern "C" __global__ void window_store(const float* kv, const int* slots, const int* pos, float* ring, i64 rows,
                                       int num_slots, i64 window, i64 dim, const i64* err) {
    grid_dep_begin();
    window_store_rows(kv, slots, pos, ring, rows, num_slots, window, dim, err);
}
extern "C" __global__ void window_store_bf16(const float* kv, const int* slots, const int* pos, u16* ring, i64 rows,
                                            int num_slots, i64 window, i64 dim, const i64* err) {
    grid_dep_begin();
    window_store_rows(kv, slots, pos, ring, rows, num_slots, window, dim, err);
}

// How the elements of a key are read (attn_key, key_elem): a row of this call's kv or an f32 cache
// entry as stored (KEY_F32); a bf16 cache entry widened (KEY_BF16); with a bf16 cache, a row of
// this call's kv rounded to bf16 (KEY_ROUNDED) — so that a key has the same value whether this
// call reads it fresh or a later one from the ring.
#define KEY_F32 0
#define KEY_BF16 1
#define KEY_ROUNDED 2

template <int K>
__device__ __forceinline__ float key_elem(const void* k, i64 c) {
    if (K == KEY_BF16) return cache_load((const u16*)k + c);
    float v = ((const float*)k)[c];
    return K == KEY_ROUNDED ? bf16_round(v) : v;
}

// Calls f(KeyKind<K>()) for a key of kind K (attn_key) of a C cache: one branch per key, none per
// element. With C = float there is one kind and no branch.
template <int K> struct KeyKind {
    static constexpr int value = K;
};
template <typename C, typename F>
__device__ __forceinline__ void with_key_kind(int kind, F&& f) {
    if (sizeof(C) == sizeof(float)) f(KeyKind<KEY_F32>());
    else if (kind == KEY_ROUNDED) f(KeyKind<KEY_ROUNDED>());
    else f(KeyKind<KEY_BF16>());
}

// C = float or u16: the cache (ring and compressed entries) is f32 or bf16.
template <typename C> struct AttnRow {
    const float* kv;
    const C* ring;
    const C* comp;
    const int* idx;
    const int* slots;
    const int* pos;
    i64 r, d, window, cap;
    int s, p, nwin, t0, mode, topk;
};

// Key kk of the row's key set (window oldest first, then compressed), or null if skipped; *kind
// says how to read it (KEY_*).
template <typename C>
__device__ __forceinline__ const void* attn_key(const AttnRow<C>& a, int kk, int* kind) {
    const bool bf16 = sizeof(C) == 2;
    *kind = bf16 ? KEY_BF16 : KEY_F32;
    if (kk < a.nwin) {
        int t = a.t0 + kk;
        i64 rr = a.r - (i64)(a.p - t);
        if (rr >= 0 && a.slots[rr] == a.s && a.pos[rr] == t) {
            *kind = bf16 ? KEY_ROUNDED : KEY_F32;
            return a.kv + rr * a.d;
        }
        return a.ring + ((i64)a.s * a.window + t % a.window) * a.d;
    }
    int j = kk - a.nwin;
    if (a.mode == CKV_SELECTED) {
        j = a.idx[a.r * a.topk + j];
        if (j < 0 || (i64)j >= a.cap) return 0;
    }
    return a.comp + ((i64)a.s * a.cap + j) * a.d;
}

// A warp's share of one head's vectors (q, the weighted sums, a key): where each lane keeps its
// elements and how it reads a key. The logits are f32 dots (lane sums by FMA, then a shuffle
// tree) rather than cpu-ref's f64: a conversion to f64 runs at 1/8 the f32 FMA rate, and at long
// context the logits are most of the work; the f32 dot is within ~1e-6 of the f64 one, far inside
// the op's tolerance. The softmax weights, den and the weighted sums are f64; within a batch of
// ATTN_BATCH keys RegLanes sums weight × key in f32 (each weight rounded to f32) and adds that to
// the f64 sums once, since an f32 → f64 conversion per element costs more than the rest of the
// sum: ≤ 32 terms of at most 1 each, ~1e-7 relative, far inside the tolerance too.
//
// RegLanes<DPL>, d = 32·DPL (128, 256, 512) with 16-byte aligned vectors: q and the sums in
// registers, lane l holding elements 128·g + 4·l + {0..3} of each 128-element group g, so a key's
// elements come in 16-byte (f32) or 8-byte (bf16) loads.
template <int DPL> struct RegLanes {
    static_assert(DPL % 4 == 0, "whole 4-element vectors per lane");
    float q[DPL];
    double acc[DPL];
    float batch[DPL];
    int lane;

    __device__ __forceinline__ i64 col(int i) const { return (i64)(i / 4) * 128 + 4 * lane + (i % 4); }
    __device__ __forceinline__ void init(const float* qg) {
        lane = threadIdx.x & 31;
#pragma unroll
        for (int g = 0; g < DPL / 4; ++g) {
            float4 v = ((const float4*)qg)[32 * g + lane];
            q[4 * g] = v.x; q[4 * g + 1] = v.y; q[4 * g + 2] = v.z; q[4 * g + 3] = v.w;
        }
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            acc[i] = 0.0;
            batch[i] = 0.0f;
        }
    }
    template <int K> __device__ __forceinline__ void load(const void* k, float* kr) const {
#pragma unroll
        for (int g = 0; g < DPL / 4; ++g) {
            if (K == KEY_BF16) {
                uint2 w = ((const uint2*)k)[32 * g + lane];
                kr[4 * g] = bf16_to_f32((u16)(w.x & 0xFFFFu)); kr[4 * g + 1] = bf16_to_f32((u16)(w.x >> 16));
                kr[4 * g + 2] = bf16_to_f32((u16)(w.y & 0xFFFFu)); kr[4 * g + 3] = bf16_to_f32((u16)(w.y >> 16));
            } else {
                float4 v = ((const float4*)k)[32 * g + lane];
                kr[4 * g] = v.x; kr[4 * g + 1] = v.y; kr[4 * g + 2] = v.z; kr[4 * g + 3] = v.w;
                if (K == KEY_ROUNDED) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) kr[4 * g + e] = bf16_round(kr[4 * g + e]);
                }
            }
        }
    }
    // This lane's part of q · k.
    template <int K> __device__ __forceinline__ float dot(const void* k) const {
        float kr[DPL];
        load<K>(k, kr);
        float t = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) t = fmaf(q[i], kr[i], t);
        return t;
    }
    template <int K> __device__ __forceinline__ void add(const void* k, float pe) {
        float kr[DPL];
        load<K>(k, kr);
#pragma unroll
        for (int i = 0; i < DPL; ++i) batch[i] = fmaf(pe, kr[i], batch[i]);
    }
    // The batch's f32 sums into the f64 ones.
    __device__ __forceinline__ void flush() {
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            acc[i] += (double)batch[i];
            batch[i] = 0.0f;
        }
    }
    __device__ __forceinline__ void scale(double f) {
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc[i] *= f;
    }
    // Whole vectors per lane, so that a warp's stores fill the sectors they touch.
    __device__ __forceinline__ void store_partial(double* p) const {
#pragma unroll
        for (int g = 0; g < DPL / 4; ++g) {
            double2* v = (double2*)(p + col(4 * g));
            v[0] = make_double2(acc[4 * g], acc[4 * g + 1]);
            v[1] = make_double2(acc[4 * g + 2], acc[4 * g + 3]);
        }
    }
    __device__ __forceinline__ void store_out(float* og, double den) const {
#pragma unroll
        for (int g = 0; g < DPL / 4; ++g)
            *(float4*)(og + col(4 * g)) = make_float4((float)(acc[4 * g] / den), (float)(acc[4 * g + 1] / den),
                                                      (float)(acc[4 * g + 2] / den), (float)(acc[4 * g + 3] / den));
    }
};

// SmemLanes: any d, or unaligned vectors: q in `qs` and the sums in `aw` (shared memory, d each),
// lane l holding elements l, l + 32, ...
struct SmemLanes {
    float* qs;
    double* aw;
    i64 d;
    int lane;

    __device__ __forceinline__ void init(const float* qg) {
        lane = threadIdx.x & 31;
        for (i64 c = lane; c < d; c += 32) {
            qs[c] = qg[c];
            aw[c] = 0.0;
        }
        __syncwarp();
    }
    template <int K> __device__ __forceinline__ float dot(const void* k) const {
        float t = 0.0f;
        for (i64 c = lane; c < d; c += 32) t = fmaf(qs[c], key_elem<K>(k, c), t);
        return t;
    }
    template <int K> __device__ __forceinline__ void add(const void* k, float pe) {
        for (i64 c = lane; c < d; c += 32) aw[c] = fma((double)pe, (double)key_elem<K>(k, c), aw[c]);
    }
    __device__ __forceinline__ void flush() {}
    __device__ __forceinline__ void scale(double f) {
        for (i64 c = lane; c < d; c += 32) aw[c] *= f;
    }
    __device__ __forceinline__ void store_partial(double* p) const {
        for (i64 c = lane; c < d; c += 32) p[c] = aw[c];
    }
    __device__ __forceinline__ void store_out(float* og, double den) const {
        for (i64 c = lane; c < d; c += 32) og[c] = (float)(aw[c] / den);
    }
};

// Keys a warp takes in one batch of attn_head: one per lane.
#define ATTN_BATCH 32
// Logits of a batch computed ATTN_DOTS at a time, so that their loads and shuffle trees overlap.
// No more unrolling than that, here or in the weighted sums: a decode launch runs this code a few
// times per warp, so fetching it costs as much as running it (4 logits at a time and the sums
// unrolled twice measured 13 % slower on the H100, docs/performance.md).
#define ATTN_DOTS 2

// One warp, one head: an online softmax over keys [k0, k1) in batches of ATTN_BATCH. Lane j
// finds key j of the batch (attn_key) and holds its logit; the batch's max m_b updates the running
// max m (den and the sums rescaled by e^{m_old − m} when it grows), then lane j's weight
// e^{ℓ_j − m} (f64) is summed into den and each key is added to the sums with its weight
// (broadcast by shuffle). So a key costs no serial round trip: the loads of a batch are in
// flight together. Then either the output (one split: o = acc / (den + e^{sink−m}), zeros
// without keys) or the split's (m, den, acc) partials. L: RegLanes or SmemLanes; C: the cache
// type (AttnRow).
template <typename L, typename C>
__device__ __forceinline__ void attn_head(L& lanes, const AttnRow<C>& a, int k0, int k1, int nkeys, const float* qg,
                                          float scale, float sink_h, int splits, i64 b, float* pm, double* pden,
                                          double* pacc, float* og) {
    const float NEG_INF = __uint_as_float(0xff800000u);
    int lane = threadIdx.x & 31;
    lanes.init(qg);
    float m = NEG_INF;
    double den = 0.0;
    for (int kb = k0; kb < k1; kb += ATTN_BATCH) {
        int nb = k1 - kb < ATTN_BATCH ? k1 - kb : ATTN_BATCH;
        int kind = KEY_F32;
        const void* kp = lane < nb ? attn_key(a, kb + lane, &kind) : nullptr;
        if (__ballot_sync(FULL_MASK, kp != nullptr) == 0) continue;
        float l = NEG_INF;
        for (int j0 = 0; j0 < nb; j0 += ATTN_DOTS) {
            float t[ATTN_DOTS];
#pragma unroll
            for (int u = 0; u < ATTN_DOTS; ++u) {
                int j = (j0 + u) & 31;
                const void* p = (const void*)__shfl_sync(FULL_MASK, (unsigned long long)kp, j);
                int kd = __shfl_sync(FULL_MASK, kind, j);
                t[u] = 0.0f;
                if (p) with_key_kind<C>(kd, [&](auto k) { t[u] = lanes.template dot<decltype(k)::value>(p); });
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
                for (int u = 0; u < ATTN_DOTS; ++u) t[u] += __shfl_xor_sync(FULL_MASK, t[u], o);
            }
#pragma unroll
            for (int u = 0; u < ATTN_DOTS; ++u)
                if (lane == j0 + u) l = t[u] * scale;
        }
        if (!kp) l = NEG_INF;
        float mb = warp_max_f(l);
        if (mb > m) {
            double f = exp((double)(m - mb));  // 0 for the first keys (m = −∞)
            den *= f;
            lanes.scale(f);
            m = mb;
        }
        double pe = kp ? exp((double)(l - m)) : 0.0;
        den += warp_sum_d(pe);
#pragma unroll 1
        for (int j = 0; j < nb; ++j) {
            const void* p = (const void*)__shfl_sync(FULL_MASK, (unsigned long long)kp, j);
            int kd = __shfl_sync(FULL_MASK, kind, j);
            float pj = __shfl_sync(FULL_MASK, (float)pe, j);
            if (p) with_key_kind<C>(kd, [&](auto k) { lanes.template add<decltype(k)::value>(p, pj); });
        }
        lanes.flush();
    }
    if (splits > 1) {
        if (lane == 0) {
            pm[b] = m;
            pden[b] = den;
        }
        lanes.store_partial(pacc + b * a.d);
        return;
    }
    if (nkeys == 0) {
        for (i64 c = lane; c < a.d; c += 32) og[c] = 0.0f;
        return;
    }
    den += exp((double)(sink_h - m));
    lanes.store_out(og, den);
}

// Grid: (row, group of `hg` heads) × key splits; warp w of a block is head group·hg + w, so the
// block's warps walk the same keys (read once from L2 per block, then from L1) — the keys are
// shared by all heads. Each warp takes a contiguous share of the row's keys (attn_head); with
// several splits sparse_attn_combine rescales the partials to the common max.
// Dynamic shared memory (SmemLanes only, without in_regs): hg·d doubles (sums) + hg·d floats (q).
template <typename C>
__device__ __forceinline__ void sparse_attn_rows(const float* q, const float* kv, const C* ring, const float* sink,
                                                 const int* slots, const int* pos, const C* comp, const int* idx,
                                                 i64 heads, i64 d, int num_slots, i64 window, int mode, i64 ratio,
                                                 i64 cap, int topk, float scale, float* out, const i64* err,
                                                 int splits, float* pm, double* pden, double* pacc,
                                                 int in_regs) {
    extern __shared__ double shd[];
    if (err[0] != 0) return;
    int warp = threadIdx.x >> 5, hg = blockDim.x >> 5;
    i64 groups = (heads + hg - 1) / hg;
    i64 r = blockIdx.x / groups, h = (blockIdx.x % groups) * hg + warp;
    AttnRow<C> a;
    a.kv = kv; a.ring = ring; a.comp = comp; a.idx = idx; a.slots = slots; a.pos = pos;
    a.r = r; a.d = d; a.window = window; a.cap = cap; a.mode = mode; a.topk = topk;
    a.s = slots[r];
    a.p = pos[r];
    if (a.s < 0 || a.s >= num_slots || a.p < 0 || h >= heads) return;
    a.nwin = (i64)a.p + 1 < window ? a.p + 1 : (int)window;
    a.t0 = a.p - a.nwin + 1;
    int ncomp = 0;
    if (mode == CKV_ALL) {
        i64 n = ((i64)a.p + 1) / ratio;
        ncomp = (int)(n < cap ? n : cap);
    } else if (mode == CKV_SELECTED) {
        ncomp = topk;
    }
    int nkeys = a.nwin + ncomp;
    int per = (nkeys + splits - 1) / splits;
    int k0 = blockIdx.y * per, k1 = k0 + per < nkeys ? k0 + per : nkeys;
    const float* qg = q + (r * heads + h) * d;
    i64 b = (r * heads + h) * splits + blockIdx.y;
    float* og = out + (r * heads + h) * d;
    double* aw = shd + (i64)warp * d;
    float* qs = (float*)(shd + (i64)hg * d) + (i64)warp * d;
    // in_regs (the host's choice): d is 128, 256 or 512 and every q, key, output and partial
    // row is 16-byte aligned, as RegLanes' vector loads and stores need.
    if (in_regs && d == 128) {
        RegLanes<4> lanes;
        attn_head(lanes, a, k0, k1, nkeys, qg, scale, sink[h], splits, b, pm, pden, pacc, og);
    } else if (in_regs && d == 256) {
        RegLanes<8> lanes;
        attn_head(lanes, a, k0, k1, nkeys, qg, scale, sink[h], splits, b, pm, pden, pacc, og);
    } else if (in_regs && d == 512) {
        RegLanes<16> lanes;
        attn_head(lanes, a, k0, k1, nkeys, qg, scale, sink[h], splits, b, pm, pden, pacc, og);
    } else {
        SmemLanes lanes{qs, aw, d, 0};
        attn_head(lanes, a, k0, k1, nkeys, qg, scale, sink[h], splits, b, pm, pden, pacc, og);
    }
}

// sparse_attn (f32 cache) and sparse_attn_bf16 (bf16 ring and compressed entries): one entry point
// per cache type, each compiled (registers included) for its own instantiation; the host picks one
// (ops::cache_kernel). A block bounds its row's slot and position, and attn_key each index, so the
// row check may run beside it (ROWS_CHECK_BLOCK).
#define SPARSE_ATTN_KERNEL(NAME, C)                                                                                  \
    extern "C" __global__ void NAME(const float* q, const float* kv, const C* ring, const float* sink,               \
                                    const int* slots, const int* pos, const C* comp, const int* idx, i64 heads,      \
                                    i64 d, int num_slots, i64 window, int mode, i64 ratio, i64 cap, int topk,         \
                                    float scale, float* out, i64* err, int splits, float* pm, double* pden,          \
                                    double* pacc, int in_regs, ROWS_CHECK_PARAMS) {                                  \
        grid_dep_begin();                                                                                            \
        ROWS_CHECK_BLOCK(slots, pos, num_slots, err)                                                                 \
        sparse_attn_rows(q, kv, ring, sink, slots, pos, comp, idx, heads, d, num_slots, window, mode, ratio, cap,     \
                         topk, scale, out, err, splits, pm, pden, pacc, in_regs);                                    \
    }
SPARSE_ATTN_KERNEL(sparse_attn, float)
SPARSE_ATTN_KERNEL(sparse_attn_bf16, u16)

// Block (row·head, c) for elements [128·c, 128·c + 128) of the output, one thread each:
// o = Σ_s e^{m_s−M}·acc_s / (Σ_s e^{m_s−M}·den_s + e^{sink−M}) over the key splits s of
// sparse_attn, M = max_s m_s. A row with no keys (M = −∞) gets zeros.
#define COMBINE_COLS 128
extern "C" __global__ void sparse_attn_combine(const float* sink, const int* slots, const int* pos, i64 heads, i64 d,
                                               int num_slots, int splits, const float* pm, const double* pden,
                                               const double* pacc, float* out, const i64* err) {
    grid_dep_begin();
    if (err[0] != 0) return;
    i64 rh = blockIdx.x, r = rh / heads, h = rh % heads;
    int s = slots[r], p = pos[r];
    if (s < 0 || s >= num_slots || p < 0) return;
    extern __shared__ double fac[];  // e^{m_s − M}, 0 for empty splits
    const float* m = pm + rh * splits;
    float mx = __uint_as_float(0xff800000u);
    for (int j = 0; j < splits; ++j) mx = fmaxf(mx, m[j]);
    i64 c = (i64)blockIdx.y * COMBINE_COLS + threadIdx.x;
    float* og = out + rh * d;
    if (mx == __uint_as_float(0xff800000u)) {
        if (c < d) og[c] = 0.0f;
        return;
    }
    // Padded to a multiple of 4 with zeros (the host allocates that much): the loop below may be
    // compiled to vector loads of fac.
    int padded = (splits + 3) & ~3;
    for (int j = threadIdx.x; j < padded; j += blockDim.x)
        fac[j] = j < splits && pden[rh * splits + j] != 0.0 ? exp((double)(m[j] - mx)) : 0.0;
    __syncthreads();
    if (c >= d) return;
    double den = exp((double)(sink[h] - mx));
    double t = 0.0;
    const double* acc = pacc + rh * splits * d + c;
#pragma unroll 4
    for (int j = 0; j < splits; ++j) {
        double f = fac[j];
        den += pden[rh * splits + j] * f;
        if (f != 0.0) t += acc[(i64)j * d] * f;
    }
    og[c] = (float)(t / den);
}
