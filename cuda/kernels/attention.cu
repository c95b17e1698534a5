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

// (q · k) · scale by one warp, the dot in f32 FMA (lane sums, then a shuffle tree). f32 rather
// than cpu-ref's f64: a conversion to f64 runs at 1/8 the f32 FMA rate, and at long context the
// logits are most of the work; the f32 dot is within ~1e-6 of the f64 one, far inside the op's
// tolerance. The softmax weights and the weighted sums stay in f64.
template <int K>
__device__ __forceinline__ float attn_logit(const float* q, const void* k, i64 d, float scale) {
    int lane = threadIdx.x & 31;
    float acc = 0.0f;
    for (i64 c = lane; c < d; c += 32) acc = fmaf(q[c], key_elem<K>(k, c), acc);
    return warp_sum_f(acc) * scale;
}

// One warp, one head: an online softmax over keys [k0, k1) — running max m, with den and the
// weighted sum rescaled by e^{m_old − m} when it grows — then either the output (one split:
// o = acc / (den + e^{sink−m}), zeros without keys) or the split's (m, den, acc) partials.
// Logits in f32 (attn_logit), weights and sums in f64. DPL > 0: d = 32·DPL with q, the sums and
// the key's lane elements (read once for the logit and the sum) in registers; DPL = 0: any d, q
// in `qs` and the sums in `aw` (shared memory, d each). C: the cache type (AttnRow).
template <int DPL, typename C>
__device__ __forceinline__ void attn_head(const AttnRow<C>& a, int k0, int k1, int nkeys, const float* qg, float scale,
                                          float* qs, double* aw, float sink_h, int splits, i64 b, float* pm,
                                          double* pden, double* pacc, float* og) {
    int lane = threadIdx.x & 31;
    i64 d = a.d;
    float qr[DPL > 0 ? DPL : 1];
    double acc[DPL > 0 ? DPL : 1];
    if (DPL > 0) {
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            qr[i] = qg[lane + 32 * i];
            acc[i] = 0.0;
        }
    } else {
        for (i64 c = lane; c < d; c += 32) {
            qs[c] = qg[c];
            aw[c] = 0.0;
        }
        __syncwarp();
    }
    float m = __uint_as_float(0xff800000u);
    double den = 0.0;
    for (int kk = k0; kk < k1; ++kk) {
        int kind;
        const void* kp = attn_key(a, kk, &kind);
        if (!kp) continue;
        float kr[DPL > 0 ? DPL : 1];
        float l;
        if (DPL > 0) {
            with_key_kind<C>(kind, [&](auto k) {
#pragma unroll
                for (int i = 0; i < DPL; ++i) kr[i] = key_elem<decltype(k)::value>(kp, lane + 32 * i);
            });
            float t = 0.0f;
#pragma unroll
            for (int i = 0; i < DPL; ++i) t = fmaf(qr[i], kr[i], t);
            l = warp_sum_f(t) * scale;
        } else {
            with_key_kind<C>(kind, [&](auto k) { l = attn_logit<decltype(k)::value>(qs, kp, d, scale); });
        }
        if (l > m) {
            double f = exp((double)(m - l));  // 0 for the first key (m = −∞)
            den *= f;
            if (DPL > 0) {
#pragma unroll
                for (int i = 0; i < DPL; ++i) acc[i] *= f;
            } else {
                for (i64 c = lane; c < d; c += 32) aw[c] *= f;
            }
            m = l;
        }
        double pe = exp((double)(l - m));
        den += pe;
        if (DPL > 0) {
#pragma unroll
            for (int i = 0; i < DPL; ++i) acc[i] += pe * (double)kr[i];
        } else {
            with_key_kind<C>(kind, [&](auto k) {
                for (i64 c = lane; c < d; c += 32) aw[c] += pe * (double)key_elem<decltype(k)::value>(kp, c);
            });
        }
    }
    if (splits > 1) {
        if (lane == 0) {
            pm[b] = m;
            pden[b] = den;
        }
        if (DPL > 0) {
#pragma unroll
            for (int i = 0; i < DPL; ++i) pacc[b * d + lane + 32 * i] = acc[i];
        } else {
            for (i64 c = lane; c < d; c += 32) pacc[b * d + c] = aw[c];
        }
        return;
    }
    if (nkeys == 0) {
        for (i64 c = lane; c < d; c += 32) og[c] = 0.0f;
        return;
    }
    den += exp((double)(sink_h - m));
    if (DPL > 0) {
#pragma unroll
        for (int i = 0; i < DPL; ++i) og[lane + 32 * i] = (float)(acc[i] / den);
    } else {
        for (i64 c = lane; c < d; c += 32) og[c] = (float)(aw[c] / den);
    }
}

// Grid: (row, group of `hg` heads) × key splits; warp w of a block is head group·hg + w, so the
// block's warps walk the same keys (read once from L2 per block, then from L1) — the keys are
// shared by all heads. Each warp takes a contiguous share of the row's keys (attn_head); with
// several splits sparse_attn_combine rescales the partials to the common max.
// Dynamic shared memory (d not 128, 256 or 512 only): hg·d doubles (sums) + hg·d floats (q).
template <typename C>
__device__ __forceinline__ void sparse_attn_rows(const float* q, const float* kv, const C* ring, const float* sink,
                                                 const int* slots, const int* pos, const C* comp, const int* idx,
                                                 i64 heads, i64 d, int num_slots, i64 window, int mode, i64 ratio,
                                                 i64 cap, int topk, float scale, float* out, const i64* err,
                                                 int splits, float* pm, double* pden, double* pacc) {
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
    switch (d) {
        case 128: attn_head<4>(a, k0, k1, nkeys, qg, scale, qs, aw, sink[h], splits, b, pm, pden, pacc, og); break;
        case 256: attn_head<8>(a, k0, k1, nkeys, qg, scale, qs, aw, sink[h], splits, b, pm, pden, pacc, og); break;
        case 512: attn_head<16>(a, k0, k1, nkeys, qg, scale, qs, aw, sink[h], splits, b, pm, pden, pacc, og); break;
        default: attn_head<0>(a, k0, k1, nkeys, qg, scale, qs, aw, sink[h], splits, b, pm, pden, pacc, og); break;
    }
}

// sparse_attn (f32 cache) and sparse_attn_bf16 (bf16 ring and compressed entries): one entry point
// per cache type, each compiled (registers included) for its own instantiation; the host picks one
// (ops::cache_kernel).
#define SPARSE_ATTN_KERNEL(NAME, C)                                                                                  \
    extern "C" __global__ void NAME(const float* q, const float* kv, const C* ring, const float* sink,               \
                                    const int* slots, const int* pos, const C* comp, const int* idx, i64 heads,      \
                                    i64 d, int num_slots, i64 window, int mode, i64 ratio, i64 cap, int topk,         \
                                    float scale, float* out, const i64* err, int splits, float* pm, double* pden,    \
                                    double* pacc) {                                                                  \
        grid_dep_begin();                                                                                            \
        sparse_attn_rows(q, kv, ring, sink, slots, pos, comp, idx, heads, d, num_slots, window, mode, ratio, cap,     \
                         topk, scale, out, err, splits, pm, pden, pacc);                                             \
    }
SPARSE_ATTN_KERNEL(sparse_attn, float)
SPARSE_ATTN_KERNEL(sparse_attn_bf16, u16)

// One block per (row, head): o = Σ_s e^{m_s−M}·acc_s / (Σ_s e^{m_s−M}·den_s + e^{sink−M}) over the
// key splits s of sparse_attn, M = max_s m_s. A row with no keys (M = −∞) gets zeros.
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
    float* og = out + rh * d;
    if (mx == __uint_as_float(0xff800000u)) {
        for (i64 c = threadIdx.x; c < d; c += blockDim.x) og[c] = 0.0f;
        return;
    }
    // Padded to a multiple of 4 with zeros (the host allocates that much): the loops below may be
    // compiled to vector loads of fac.
    int padded = (splits + 3) & ~3;
    for (int j = threadIdx.x; j < padded; j += blockDim.x)
        fac[j] = j < splits && pden[rh * splits + j] != 0.0 ? exp((double)(m[j] - mx)) : 0.0;
    __syncthreads();
    double den = exp((double)(sink[h] - mx));
    for (int j = 0; j < splits; ++j) den += pden[rh * splits + j] * fac[j];
    for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
        double t = 0.0;
        for (int j = 0; j < splits; ++j)
            if (fac[j] != 0.0) t += pacc[(rh * splits + j) * d + c] * fac[j];
        og[c] = (float)(t / den);
    }
}
