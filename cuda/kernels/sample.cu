// Token sampling (hal::ops::sample): each row's vocabulary is split over blocks, each block
// keeps the best (key, index) of its part, and one warp per row picks among the parts.

#define SAMPLE_GAMMA 0x9E3779B97F4A7C15ull
#define SAMPLE_NONE 0x7fffffff

__device__ __forceinline__ u64 splitmix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The race key of logit v, draw i of state s (hal::ops::sample::sample_key); greedy: v itself.
__device__ __forceinline__ double sample_key(float v, float t, u64 s, i64 i) {
    if (t == 0.0f) return (double)v;
    u64 z = splitmix64(s + (u64)(i + 1) * SAMPLE_GAMMA);
    double u = (double)((z >> 11) + 1) / 9007199254740992.0;
    double e = fmax(-log(u), 2.2250738585072014e-308);
    return (double)v / (double)t - log(e);
}

// Whether (k, i) beats (bk, bi): a larger key, or an equal key at a lower index. NaN keys never
// win; SAMPLE_NONE marks "nothing yet".
__device__ __forceinline__ bool sample_beats(double k, int i, double bk, int bi) {
    if (i == SAMPLE_NONE || k != k) return false;
    return bi == SAMPLE_NONE || k > bk || (k == bk && i < bi);
}

__device__ __forceinline__ void sample_warp_best(double* k, int* i) {
    for (int o = 16; o > 0; o >>= 1) {
        double ok = __shfl_xor_sync(FULL_MASK, *k, o);
        int oi = __shfl_xor_sync(FULL_MASK, *i, o);
        if (sample_beats(ok, oi, *k, *i)) {
            *k = ok;
            *i = oi;
        }
    }
}

// Grid (parts, rows): block p keeps the best of columns [p·per, (p+1)·per) of its row.
extern "C" __global__ void sample_partial(const float* logits, i64 vocab, float t, const i64* rng, i64 per,
                                          double* part_key, int* part_idx, const i64* err) {
    grid_dep_begin();
    __shared__ double wk[32];
    __shared__ int wi[32];
    if (err[0] != 0) return;
    const i64 r = blockIdx.y, p = blockIdx.x;
    const float* row = logits + r * vocab;
    const u64 s = (u64)rng[r];
    const i64 end = min(vocab, (p + 1) * per);
    double bk = 0.0;
    int bi = SAMPLE_NONE;
    for (i64 c = p * per + threadIdx.x; c < end; c += blockDim.x) {
        double k = sample_key(row[c], t, s, c);
        if (sample_beats(k, (int)c, bk, bi)) {
            bk = k;
            bi = (int)c;
        }
    }
    sample_warp_best(&bk, &bi);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) {
        wk[warp] = bk;
        wi[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        bk = lane < warps ? wk[lane] : 0.0;
        bi = lane < warps ? wi[lane] : SAMPLE_NONE;
        sample_warp_best(&bk, &bi);
        if (lane == 0) {
            part_key[r * gridDim.x + p] = bk;
            part_idx[r * gridDim.x + p] = bi;
        }
    }
}

// One warp per row: the best of the `parts` partial results is the token (0 when every key was
// NaN), and a sampling row's generator moves past its vocab draws.
extern "C" __global__ void sample_finish(const double* part_key, const int* part_idx, int parts, i64 vocab, float t,
                                         i64* rng, int* tokens, const i64* err) {
    grid_dep_begin();
    if (err[0] != 0) return;
    const i64 r = blockIdx.x;
    double bk = 0.0;
    int bi = SAMPLE_NONE;
    for (int p = threadIdx.x; p < parts; p += 32) {
        if (sample_beats(part_key[r * parts + p], part_idx[r * parts + p], bk, bi)) {
            bk = part_key[r * parts + p];
            bi = part_idx[r * parts + p];
        }
    }
    sample_warp_best(&bk, &bi);
    if (threadIdx.x == 0) {
        tokens[r] = bi == SAMPLE_NONE ? 0 : bi;
        if (t != 0.0f) rng[r] = (i64)((u64)rng[r] + (u64)vocab * SAMPLE_GAMMA);
    }
}
