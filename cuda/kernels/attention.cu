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

    // The row's key set once s and p are known and valid: the window (nwin keys from t0, oldest
    // first), then every compressed entry seen so far (CKV_ALL, one per `ratio` positions, up to
    // cap) or the top-k list (CKV_SELECTED). Returns how many keys that is.
    __device__ __forceinline__ int key_count(i64 ratio) {
        nwin = (i64)p + 1 < window ? p + 1 : (int)window;
        t0 = p - nwin + 1;
        int ncomp = 0;
        if (mode == CKV_ALL) {
            i64 n = ((i64)p + 1) / ratio;
            ncomp = (int)(n < cap ? n : cap);
        } else if (mode == CKV_SELECTED) {
            ncomp = topk;
        }
        return nwin + ncomp;
    }
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
    int nkeys = a.key_count(ratio);
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

// ---- Tensor-core form (bf16 cache, d = 128, 256 or 512; sm_80+) ------------------------------
// The heads of a row share its keys, so a block takes ATC_HEADS heads as the M of bf16 mma.sync
// tiles (FlashMLA's pattern) and walks its key split in chunks of ATC_KEYS keys. Warp w owns the
// dims [w·d/4, (w+1)·d/4): it loads only that slice of q and of each key (cp.async, two chunks in
// flight), forms its share of the logits S = q·Kᵀ over those dims, and after the online softmax
// its share of the output O += P·V, V being the keys again (ldmatrix.trans). The block meets
// twice a chunk: the four partial logits are added in warp order (fixed, so runs agree) and the
// softmax weights published.
// Precision: q (f32) and the weights p (f32) go in as three bf16 terms each, exact for every
// normal f32 (atc_split2, as linear_tc's SPLIT 3); the keys are bf16 already (a fresh f32 kv
// row is rounded as the cache would hold it). Products are exact and the mma sums in f32, so
// the logits match sparse_attn's f32 dots up to summation order. The weights are expf(ℓ − m)
// (≤ 2 ulp; f64 exps cost as much as the tiles here) and den an f64 sum of them; the output
// sums are f32, rescaled when the max grows. That is ~1e-6 relative at most, inside the op's
// tolerance.
#define ATC_HEADS 16
#define ATC_KEYS 64
#define ATC_WARPS 4
#define ATC_TERMS 3

// Element (row, col) of a row-major bf16 tile W wide (W ≥ 64), its 16-byte chunks XOR-swizzled by
// row % 8: the eight rows an ldmatrix phase reads at one column fall in distinct banks.
template <int W> __device__ __forceinline__ int atc_off(int row, int col) {
    return row * W + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// Dynamic shared memory of sparse_attn_tc<D>, in bytes (ops::attention::tc_smem_for mirrors it).
template <int D> struct AtcSmem {
    static const int K_ELEMS = ATC_KEYS * D;               // one chunk of keys, bf16
    static const int Q_ELEMS = ATC_TERMS * ATC_HEADS * D;   // q as bf16 terms
    static const int P_ELEMS = ATC_TERMS * ATC_HEADS * ATC_KEYS;
    static const int BYTES = (2 * K_ELEMS + Q_ELEMS + P_ELEMS) * 2 + ATC_WARPS * ATC_HEADS * ATC_KEYS * 4 +
                             ATC_HEADS * (4 + 4 + 8) + 2 * ATC_KEYS * 4 + ATC_WARPS * ATC_KEYS * 8;
};

// Warp w's slice of one chunk of keys [kb, kb + ATC_KEYS) ∩ [kb, k1) into kbuf (zeros where a key
// is missing or skipped); with valid (warp 0) it also records which keys count. kptr holds the
// chunk's key addresses, bit 0 set for a fresh f32 row (rounded here; cp.async takes the rest).
template <int D>
__device__ __forceinline__ void atc_load_keys(const AttnRow<u16>& a, int kb, int k1, u16* kbuf, u64* kptr,
                                              int* valid) {
    const int SLICE = D / ATC_WARPS, PIECES = SLICE / 8;  // 16-byte pieces of a key's slice
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int j = 0; j < ATC_KEYS / 32; ++j) {
        int kk = kb + lane + 32 * j, kind = KEY_BF16;
        const void* p = kk < k1 ? attn_key(a, kk, &kind) : nullptr;
        kptr[lane + 32 * j] = (u64)p | (kind == KEY_ROUNDED ? 1u : 0u);
        if (valid) valid[lane + 32 * j] = p != nullptr;
    }
    __syncwarp();
    if (!__any_sync(FULL_MASK, (kptr[lane] | kptr[lane + 32]) & 1u)) {
        // Cache entries only (every chunk but the one holding this call's fresh rows).
#pragma unroll 8
        for (int it = 0; it < ATC_KEYS * PIECES / 32; ++it) {
            int i = lane + 32 * it, key = i / PIECES, col = warp * SLICE + (i % PIECES) * 8;
            const u16* p = (const u16*)kptr[key];
            cp_async16_zfill(kbuf + atc_off<D>(key, col), p ? p + col : (const u16*)a.kv, p ? 16 : 0);
        }
    } else {
#pragma unroll 1
        for (int it = 0; it < ATC_KEYS * PIECES / 32; ++it) {
            int i = lane + 32 * it, key = i / PIECES, col = warp * SLICE + (i % PIECES) * 8;
            u64 p = kptr[key];
            u16* dst = kbuf + atc_off<D>(key, col);
            if (p & 1u) {
                const float4* f = (const float4*)(p - 1) + col / 4;
                float4 v0 = f[0], v1 = f[1];
                *(uint4*)dst = make_uint4((u32)f32_to_bf16(v0.x) | ((u32)f32_to_bf16(v0.y) << 16),
                                          (u32)f32_to_bf16(v0.z) | ((u32)f32_to_bf16(v0.w) << 16),
                                          (u32)f32_to_bf16(v1.x) | ((u32)f32_to_bf16(v1.y) << 16),
                                          (u32)f32_to_bf16(v1.z) | ((u32)f32_to_bf16(v1.w) << 16));
            } else {
                cp_async16_zfill(dst, p ? (const u16*)p + col : (const u16*)a.kv, p ? 16 : 0);
            }
        }
    }
    cp_async_commit();
}

// (lo, hi) as ATC_TERMS packed bf16 pairs (lo in the low half) whose sums are lo and hi: exact
// for normal f32 (each residual is exact, and 3 × 8 bits hold a 24-bit significand). A
// non-finite value leaves NaN terms, and so a NaN product, as its products would be anyway.
__device__ __forceinline__ void atc_split2(float lo, float hi, u32* t) {
#pragma unroll
    for (int s = 0; s < ATC_TERMS; ++s) {
        u32 b;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(b) : "f"(hi), "f"(lo));
        t[s] = b;
        lo -= __uint_as_float(b << 16);
        hi -= __uint_as_float(b & 0xFFFF0000u);
    }
}

// Grid: (row · head group, + the row check block) × key splits, ATC_WARPS warps a block. Outputs
// as sparse_attn's: the output rows with one split, else the (m, den, acc) partials that
// sparse_attn_combine adds.
template <int D>
__device__ __forceinline__ void sparse_attn_tc_rows(const float* q, const float* kv, const u16* ring,
                                                    const float* sink, const int* slots, const int* pos,
                                                    const u16* comp, const int* idx, i64 heads, int num_slots,
                                                    i64 window, int mode, i64 ratio, i64 cap, int topk, float scale,
                                                    float* out, const i64* err, int splits, float* pm,
                                                    double* pden, double* pacc) {
    typedef AtcSmem<D> L;
    const int SLICE = D / ATC_WARPS, KSTEPS = SLICE / 16, NT = SLICE / 8;
    const float NEG_INF = __uint_as_float(0xff800000u);
    extern __shared__ __align__(16) unsigned char atc_sm[];
    u16* kbuf = (u16*)atc_sm;                         // [2][ATC_KEYS][D]
    u16* qs = kbuf + 2 * L::K_ELEMS;                   // [TERMS][HEADS][D]
    u16* ps = qs + L::Q_ELEMS;                         // [TERMS][HEADS][KEYS]
    float* sp = (float*)(ps + L::P_ELEMS);             // [WARPS][HEADS][KEYS]
    float* fac = sp + ATC_WARPS * ATC_HEADS * ATC_KEYS;  // [HEADS]
    float* mrow = fac + ATC_HEADS;                     // [HEADS]
    double* drow = (double*)(mrow + ATC_HEADS);        // [HEADS]
    int* valid = (int*)(drow + ATC_HEADS);             // [2][KEYS]
    u64* kptr = (u64*)(valid + 2 * ATC_KEYS);          // [WARPS][KEYS]

    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
    i64 groups = (heads + ATC_HEADS - 1) / ATC_HEADS;
    i64 r = blockIdx.x / groups, h0 = (blockIdx.x % groups) * ATC_HEADS;
    // This warp's slice of q, heads h0 .. h0 + 15 (zeros past the last head), loaded first: it
    // does not depend on the row's position, so its latency hides under the key lookups.
    const int QV = ATC_HEADS * SLICE / 4 / 32, QROW = SLICE / 4;
    int cb = warp * SLICE;
    float4 qv[QV];
#pragma unroll
    for (int j = 0; j < QV; ++j) {
        int i = lane + 32 * j, hh = i / QROW;
        qv[j] = h0 + hh < heads ? *(const float4*)(q + ((r * heads + h0 + hh) * D + cb + (i % QROW) * 4))
                                : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    // The error word read with q, slots and pos rather than before them (all three are in
    // bounds whatever it says): one round trip fewer on the way to the keys.
    AttnRow<u16> a;
    a.s = slots[r];
    a.p = pos[r];
    if (err[0] != 0) return;
    a.kv = kv; a.ring = ring; a.comp = comp; a.idx = idx; a.slots = slots; a.pos = pos;
    a.r = r; a.d = D; a.window = window; a.cap = cap; a.mode = mode; a.topk = topk;
    if (a.s < 0 || a.s >= num_slots || a.p < 0) return;
    int nkeys = a.key_count(ratio);
    int per = (nkeys + splits - 1) / splits;
    per = (per + ATC_KEYS - 1) / ATC_KEYS * ATC_KEYS;
    int k0 = blockIdx.y * per, k1 = k0 + per < nkeys ? k0 + per : nkeys;
    int nchunks = k1 > k0 ? (k1 - k0 + ATC_KEYS - 1) / ATC_KEYS : 0;
    u64* wptr = kptr + warp * ATC_KEYS;
    if (nchunks > 0) atc_load_keys<D>(a, k0, k1, kbuf, wptr, warp == 0 ? valid : nullptr);
#pragma unroll
    for (int j = 0; j < QV; ++j) {
        int i = lane + 32 * j, hh = i / QROW, col = cb + (i % QROW) * 4;
        u32 t01[ATC_TERMS], t23[ATC_TERMS];
        atc_split2(qv[j].x, qv[j].y, t01);
        atc_split2(qv[j].z, qv[j].w, t23);
#pragma unroll
        for (int s = 0; s < ATC_TERMS; ++s)
            *(uint2*)(qs + s * ATC_HEADS * D + atc_off<D>(hh, col)) = make_uint2(t01[s], t23[s]);
    }

    float o[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
    // The softmax state of head tid / 8, kept alike by its 8 threads (den: each its own keys').
    float m_run = NEG_INF;
    double den = 0.0;
    int sh = threadIdx.x >> 3, sj = (threadIdx.x & 7) * 8;

    for (int c = 0; c < nchunks; ++c) {
        int buf = c & 1;
        u16* kc = kbuf + buf * L::K_ELEMS;
        if (c + 1 < nchunks) {
            __syncwarp();
            atc_load_keys<D>(a, k0 + (c + 1) * ATC_KEYS, k1, kbuf + (buf ^ 1) * L::K_ELEMS, wptr,
                             warp == 0 ? valid + (buf ^ 1) * ATC_KEYS : nullptr);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncwarp();

        // S (partial over this warp's dims) = q · Kᵀ: 8 key tiles, three q terms each.
        float s[ATC_KEYS / 8][4];
#pragma unroll
        for (int nt = 0; nt < ATC_KEYS / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll 2
        for (int ks = 0; ks < KSTEPS; ++ks) {
            int col = cb + ks * 16;
            u32 af[ATC_TERMS][4];
#pragma unroll
            for (int t = 0; t < ATC_TERMS; ++t)
                ldmatrix_x4(af[t], qs + t * ATC_HEADS * D + atc_off<D>(lane & 15, col + (lane >> 4) * 8));
#pragma unroll
            for (int np = 0; np < ATC_KEYS / 16; ++np) {
                u32 b[4];
                ldmatrix_x4(b, kc + atc_off<D>(np * 16 + (lane >> 4) * 8 + (lane & 7), col + ((lane >> 3) & 1) * 8));
#pragma unroll
                for (int t = 0; t < ATC_TERMS; ++t) {
                    mma_bf16(s[2 * np], af[t], b[0], b[1]);
                    mma_bf16(s[2 * np + 1], af[t], b[2], b[3]);
                }
            }
        }
        float* sw = sp + warp * ATC_HEADS * ATC_KEYS;
#pragma unroll
        for (int nt = 0; nt < ATC_KEYS / 8; ++nt) {
            *(float2*)(sw + g * ATC_KEYS + nt * 8 + 2 * t4) = make_float2(s[nt][0], s[nt][1]);
            *(float2*)(sw + (g + 8) * ATC_KEYS + nt * 8 + 2 * t4) = make_float2(s[nt][2], s[nt][3]);
        }
        __syncthreads();

        // Online softmax: thread (head sh, keys sj .. sj + 7) of the chunk.
        {
            const int* vc = valid + buf * ATC_KEYS;
            float l[8];
            float cmax = NEG_INF;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                int e = sh * ATC_KEYS + sj + j;
                float dot = ((sp[e] + sp[ATC_HEADS * ATC_KEYS + e]) + sp[2 * ATC_HEADS * ATC_KEYS + e]) +
                            sp[3 * ATC_HEADS * ATC_KEYS + e];
                l[j] = vc[sj + j] ? dot * scale : NEG_INF;
                cmax = fmaxf(cmax, l[j]);
            }
#pragma unroll
            for (int o2 = 1; o2 < 8; o2 <<= 1) cmax = fmaxf(cmax, __shfl_xor_sync(FULL_MASK, cmax, o2));
            float f = 1.0f;
            if (cmax > m_run) {
                f = expf(m_run - cmax);  // 0 for the first keys (m = −∞)
                den *= (double)f;
                m_run = cmax;
            }
            float pv[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                pv[j] = l[j] == NEG_INF ? 0.0f : expf(l[j] - m_run);
                den += (double)pv[j];
            }
            u32 pt[4][ATC_TERMS];
#pragma unroll
            for (int j = 0; j < 4; ++j) atc_split2(pv[2 * j], pv[2 * j + 1], pt[j]);
#pragma unroll
            for (int t = 0; t < ATC_TERMS; ++t)
                *(uint4*)(ps + t * ATC_HEADS * ATC_KEYS + atc_off<ATC_KEYS>(sh, sj)) =
                    make_uint4(pt[0][t], pt[1][t], pt[2][t], pt[3][t]);
            if ((threadIdx.x & 7) == 0) fac[sh] = f;
        }
        __syncthreads();

        // O (this warp's dims) = O · f + P · V.
        float fa = fac[g], fb = fac[g + 8];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            o[nt][0] *= fa; o[nt][1] *= fa;
            o[nt][2] *= fb; o[nt][3] *= fb;
        }
#pragma unroll
        for (int kk = 0; kk < ATC_KEYS / 16; ++kk) {
            u32 af[ATC_TERMS][4];
#pragma unroll
            for (int t = 0; t < ATC_TERMS; ++t)
                ldmatrix_x4(af[t], ps + t * ATC_HEADS * ATC_KEYS +
                                       atc_off<ATC_KEYS>(lane & 15, kk * 16 + (lane >> 4) * 8));
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                u32 b[4];
                ldmatrix_x4<true>(b, kc + atc_off<D>(kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7),
                                                     cb + np * 16 + (lane >> 4) * 8));
#pragma unroll
                for (int t = 0; t < ATC_TERMS; ++t) {
                    mma_bf16(o[2 * np], af[t], b[0], b[1]);
                    mma_bf16(o[2 * np + 1], af[t], b[2], b[3]);
                }
            }
        }
    }

    // The heads' (m, den): den summed over each head's 8 threads.
#pragma unroll
    for (int o2 = 1; o2 < 8; o2 <<= 1) den += __shfl_xor_sync(FULL_MASK, den, o2);
    if ((threadIdx.x & 7) == 0) {
        mrow[sh] = m_run;
        drow[sh] = den;
    }
    __syncthreads();
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        int hh = g + 8 * half;
        i64 h = h0 + hh;
        if (h >= heads) continue;
        i64 rh = r * heads + h;
        if (splits > 1) {
            i64 b = rh * splits + blockIdx.y;
            if (warp == 0 && t4 == 0) {
                pm[b] = mrow[hh];
                pden[b] = drow[hh];
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                *(double2*)(pacc + b * D + cb + nt * 8 + 2 * t4) =
                    make_double2((double)o[nt][2 * half], (double)o[nt][2 * half + 1]);
        } else {
            float* og = out + rh * D + cb;
            double dn = drow[hh] + exp((double)(sink[h] - mrow[hh]));
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                *(float2*)(og + nt * 8 + 2 * t4) =
                    nkeys == 0 ? make_float2(0.0f, 0.0f)
                               : make_float2((float)((double)o[nt][2 * half] / dn),
                                             (float)((double)o[nt][2 * half + 1] / dn));
        }
    }
}

// One entry point per d; the host takes it for a bf16 cache where the shared memory holds
// AtcSmem<d> and every row is 16-byte aligned (ops::attention).
#define SPARSE_ATTN_TC_KERNEL(D)                                                                                     \
    extern "C" __global__ void __launch_bounds__(ATC_WARPS * 32) sparse_attn_tc_##D(                                 \
        const float* q, const float* kv, const u16* ring, const float* sink, const int* slots, const int* pos,       \
        const u16* comp, const int* idx, i64 heads, int num_slots, i64 window, int mode, i64 ratio, i64 cap,         \
        int topk, float scale, float* out, i64* err, int splits, float* pm, double* pden, double* pacc,              \
        ROWS_CHECK_PARAMS) {                                                                                         \
        grid_dep_begin();                                                                                            \
        ROWS_CHECK_BLOCK(slots, pos, num_slots, err)                                                                 \
        sparse_attn_tc_rows<D>(q, kv, ring, sink, slots, pos, comp, idx, heads, num_slots, window, mode, ratio, cap,  \
                               topk, scale, out, err, splits, pm, pden, pacc);                                       \
    }
SPARSE_ATTN_TC_KERNEL(128)
SPARSE_ATTN_TC_KERNEL(256)
SPARSE_ATTN_TC_KERNEL(512)
