// The KV compressor (hal::ops::compressor), parallel over emitted entries.
//
// cpu-ref walks the rows in order through a per-slot state machine. Here the result of that walk
// is computed directly: an entry j emitted by row r (slot s, position p, (p + 1) mod ratio = 0)
// pools the positions of block j (and of block j − 1 with overlap); a position t is read from
// this call's rows when it is fresh (row rr = r − (p − t) has slot s and position t — valid under
// the contiguity convention, which check_rows verified), else from the slot's state as it was when
// the call started. Three kernels in stream order: emit (reads the old state), save_prev (overlap:
// rows 0..ratio ← the last emitted block), save_rows (rows of the still open block). The state is
// f32; the cache of finished entries is f32 or bf16 (comp_emit / comp_emit_bf16).

struct CompRow {
    const float* kv;
    const float* score;
    const float* ape;
    const float* skv;    // state_kv of slot s
    const float* ssc;    // state_score of slot s
    const int* slots;
    const int* pos;
    i64 r, cd;
    int s, p, ratio;
};

__device__ __forceinline__ bool comp_fresh(const CompRow& a, i64 t, i64* rr) {
    *rr = a.r - ((i64)a.p - t);
    return *rr >= 0 && a.slots[*rr] == a.s && (i64)a.pos[*rr] == t;
}

// (score, kv) of position t through channel c: this call's row if fresh, else state row srow.
__device__ __forceinline__ void comp_value(const CompRow& a, i64 t, i64 c, int srow, float* sc, float* v) {
    i64 rr;
    if (comp_fresh(a, t, &rr)) {
        *v = a.kv[rr * a.cd + c];
        *sc = a.score[rr * a.cd + c] + a.ape[(t % a.ratio) * a.cd + c];
    } else {
        *v = a.skv[(i64)srow * a.cd + c];
        *sc = a.ssc[(i64)srow * a.cd + c];
    }
}

// One block per row; rows that emit an entry pool it, finish it and write cache[s, j]: C = float
// (f32 cache) or u16 (bf16 cache: cache_store keeps the nearest-even bf16). Dynamic shared memory:
// width floats, plus width doubles when rotate.
template <typename C>
__device__ __forceinline__ void comp_emit_rows(const float* kv, const float* score, const float* ape,
                                               const float* norm_w, const float* freqs, const int* slots,
                                               const int* pos, const float* state_kv, const float* state_score,
                                               C* cache, int num_slots, int ratio, int overlap, i64 width,
                                               i64 rope_dim, int rotate, i64 cap, float norm_eps, const i64* err) {
    extern __shared__ double shd[];
    __shared__ double red[32];
    if (err[0] != 0) return;
    i64 r = blockIdx.x;
    int s = slots[r], p = pos[r];
    if (s < 0 || s >= num_slots || p < 0) return;
    if (((i64)p + 1) % ratio != 0) return;
    i64 j = (i64)p / ratio;
    if (j >= cap) return;
    int co = overlap ? 2 : 1;
    i64 cd = co * width;
    i64 cr = (i64)co * ratio;
    CompRow a;
    a.kv = kv; a.score = score; a.ape = ape; a.slots = slots; a.pos = pos;
    a.skv = state_kv + (i64)s * cr * cd;
    a.ssc = state_score + (i64)s * cr * cd;
    a.r = r; a.cd = cd; a.s = s; a.p = p; a.ratio = ratio;
    double* hv = shd;                                      // [width] doubles (rotate only)
    float* e = (float*)(rotate ? shd + width : shd);       // [width]
    i64 jr = j * ratio;
    // Where block j − 1's positions that are not fresh live: if position jr − 1 is fresh the block
    // was still open when the call started (state rows ratio..2·ratio), else it was complete
    // (copied to rows 0..ratio at its emission).
    i64 dummy;
    bool prev_open = jr >= 1 && comp_fresh(a, jr - 1, &dummy);
    for (i64 c = threadIdx.x; c < width; c += blockDim.x) {
        float sc, v;
        float m = __uint_as_float(0xff800000u);
        if (overlap) {
            if (j > 0)
                for (int i = 0; i < ratio; ++i) {
                    comp_value(a, jr - ratio + i, c, prev_open ? ratio + i : i, &sc, &v);
                    m = fmaxf(m, sc);
                }
            for (int i = 0; i < ratio; ++i) {
                comp_value(a, jr + i, width + c, ratio + i, &sc, &v);
                m = fmaxf(m, sc);
            }
        } else {
            for (int i = 0; i < ratio; ++i) {
                comp_value(a, jr + i, c, i, &sc, &v);
                m = fmaxf(m, sc);
            }
        }
        double num = 0.0, den = 0.0;
        if (overlap) {
            if (j > 0)
                for (int i = 0; i < ratio; ++i) {
                    comp_value(a, jr - ratio + i, c, prev_open ? ratio + i : i, &sc, &v);
                    double pe = exp((double)(sc - m));
                    num += pe * (double)v;
                    den += pe;
                }
            for (int i = 0; i < ratio; ++i) {
                comp_value(a, jr + i, width + c, ratio + i, &sc, &v);
                double pe = exp((double)(sc - m));
                num += pe * (double)v;
                den += pe;
            }
        } else {
            for (int i = 0; i < ratio; ++i) {
                comp_value(a, jr + i, c, i, &sc, &v);
                double pe = exp((double)(sc - m));
                num += pe * (double)v;
                den += pe;
            }
        }
        e[c] = (float)(num / den);
    }
    // RMSNorm ⊙ norm_w.
    double ss = 0.0;
    for (i64 c = threadIdx.x; c < width; c += blockDim.x) ss += (double)e[c] * (double)e[c];
    float f = rms_from_sum(block_sum_d(ss, red), width, norm_eps);
    for (i64 c = threadIdx.x; c < width; c += blockDim.x) e[c] = norm_w[c] * (e[c] * f);
    __syncthreads();
    // Forward RoPE of the last rope_dim dims at position j·ratio.
    i64 nope = width - rope_dim;
    for (i64 i = threadIdx.x; i < rope_dim / 2; i += blockDim.x) {
        float cs, sn;
        rope_cs((float)jr, freqs[i], &cs, &sn);
        rope_rotate(&e[nope + 2 * i], &e[nope + 2 * i + 1], cs, sn, false);
    }
    __syncthreads();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int block, fmt;
    i64 qd;
    if (rotate) {
        for (i64 c = threadIdx.x; c < width; c += blockDim.x) hv[c] = (double)e[c];
        hadamard_block(hv, (int)width);
        double hs = 1.0 / sqrt((double)width);
        for (i64 c = threadIdx.x; c < width; c += blockDim.x) e[c] = (float)(hv[c] * hs);
        __syncthreads();
        block = 32; fmt = FMT_FP4; qd = width;
    } else {
        block = 64; fmt = FMT_FP8; qd = nope;
    }
    // Quantization simulation, one warp per block of values.
    for (i64 b = warp; b * block < qd; b += nw) {
        float* xb = e + b * block;
        i64 len = qd - b * block < block ? qd - b * block : block;
        float amax = 0.0f;
        for (i64 i = lane; i < len; i += 32) amax = fmaxf(amax, fabsf(xb[i]));
        amax = warp_max_f(amax);
        float sq = quant_scale(amax, fmt);
        for (i64 i = lane; i < len; i += 32) xb[i] = quant_value(xb[i], sq, fmt);
    }
    __syncthreads();
    C* dst = cache + ((i64)s * cap + j) * width;
    for (i64 c = threadIdx.x; c < width; c += blockDim.x) cache_store(dst + c, e[c]);
}

// comp_emit (f32 cache) and comp_emit_bf16 (bf16 cache): one entry point per cache type, each
// compiled (registers included) for its own instantiation; the host picks one (ops::cache_kernel).
#define COMP_EMIT_KERNEL(NAME, C)                                                                                    \
    extern "C" __global__ void NAME(const float* kv, const float* score, const float* ape, const float* norm_w,      \
                                    const float* freqs, const int* slots, const int* pos, const float* state_kv,     \
                                    const float* state_score, C* cache, int num_slots, int ratio, int overlap,       \
                                    i64 width, i64 rope_dim, int rotate, i64 cap, float norm_eps, const i64* err) {  \
        grid_dep_begin();                                                                                            \
        comp_emit_rows(kv, score, ape, norm_w, freqs, slots, pos, state_kv, state_score, cache, num_slots, ratio,    \
                       overlap, width, rope_dim, rotate, cap, norm_eps, err);                                        \
    }
COMP_EMIT_KERNEL(comp_emit, float)
COMP_EMIT_KERNEL(comp_emit_bf16, u16)

// Overlap only: for the last row of each slot's run that emits, state rows 0..ratio ← the rows of
// the block it emitted (fresh rows, or the old state rows ratio..2·ratio). One block per row.
extern "C" __global__ void comp_save_prev(const float* kv, const float* score, const float* ape, const int* slots,
                                          const int* pos, float* state_kv, float* state_score, i64 rows,
                                          int num_slots, int ratio, i64 width, i64 cap, const i64* err) {
    grid_dep_begin();
    if (err[0] != 0) return;
    i64 r = blockIdx.x;
    int s = slots[r], p = pos[r];
    if (s < 0 || s >= num_slots || p < 0) return;
    if (((i64)p + 1) % ratio != 0 || (i64)p / ratio >= cap) return;
    if (r + ratio < rows && slots[r + ratio] == s) return;  // a later row of the run emits again
    i64 cd = 2 * width, cr = 2 * (i64)ratio;
    CompRow a;
    a.kv = kv; a.score = score; a.ape = ape; a.slots = slots; a.pos = pos;
    float* skv = state_kv + (i64)s * cr * cd;
    float* ssc = state_score + (i64)s * cr * cd;
    a.skv = skv; a.ssc = ssc;
    a.r = r; a.cd = cd; a.s = s; a.p = p; a.ratio = ratio;
    i64 jr = (i64)p + 1 - ratio;
    for (i64 t = threadIdx.x; t < (i64)ratio * cd; t += blockDim.x) {
        int i = (int)(t / cd);
        i64 c = t % cd;
        float sc, v;
        comp_value(a, jr + i, c, ratio + i, &sc, &v);
        skv[(i64)i * cd + c] = v;
        ssc[(i64)i * cd + c] = sc;
    }
}

// State rows of the open block: row r writes state row (p mod ratio) (+ ratio with overlap) unless
// row r + ratio of the same slot writes it later.
extern "C" __global__ void comp_save_rows(const float* kv, const float* score, const float* ape, const int* slots,
                                          const int* pos, float* state_kv, float* state_score, i64 rows,
                                          int num_slots, int ratio, int overlap, i64 width, const i64* err) {
    grid_dep_begin();
    if (err[0] != 0) return;
    int co = overlap ? 2 : 1;
    i64 cd = co * width, cr = (i64)co * ratio;
    i64 total = rows * cd;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
        i64 r = t / cd, c = t % cd;
        int s = slots[r], p = pos[r];
        if (s < 0 || s >= num_slots || p < 0) continue;
        if (r + ratio < rows && slots[r + ratio] == s) continue;
        int i = p % ratio;
        i64 at = ((i64)s * cr + i + (overlap ? ratio : 0)) * cd + c;
        state_kv[at] = kv[r * cd + c];
        state_score[at] = score[r * cd + c] + ape[(i64)i * cd + c];
    }
}
