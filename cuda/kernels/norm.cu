// RMSNorm (hal::ops::norm): one block per row.

// Elements per thread that rms_norm keeps in registers between its two passes.
#define NORM_HELD 4

// r = fl32(1 / sqrt(fl32(mean(x²)) + eps)) from the thread's sum of squares `ss` (every thread
// calls it: it adds the block's sums).
__device__ __forceinline__ float rms_factor(double ss, i64 dim, float eps, double* red) {
    return rms_from_sum(block_sum_d(ss, red), dim, eps);
}

// y = w ⊙ (x · r), r = fl32(1 / sqrt(fl32(mean(x²)) + eps)); weight may be null.
// Each thread sums the squares of elements threadIdx.x + j·blockDim.x in order of j, then the
// block adds the threads' sums. A row of at most NORM_HELD·blockDim.x elements (a decode row, at
// 1024 threads) is loaded once, with its weights, before the sum: the second pass then reads no
// memory, where it used to wait on the weights' loads after the reduction.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* y, i64 dim, float eps) {
    grid_dep_begin();
    __shared__ double red[32];
    i64 r = blockIdx.x;
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    double ss = 0.0;
    if (dim <= NORM_HELD * (i64)blockDim.x) {
        float xv[NORM_HELD], wv[NORM_HELD];
#pragma unroll
        for (int j = 0; j < NORM_HELD; ++j) {
            i64 i = threadIdx.x + (i64)j * blockDim.x;
            xv[j] = i < dim ? xr[i] : 0.0f;
            wv[j] = w && i < dim ? w[i] : 1.0f;
        }
#pragma unroll
        for (int j = 0; j < NORM_HELD; ++j) {
            double v = (double)xv[j];
            ss += v * v;
        }
        float f = rms_factor(ss, dim, eps, red);
#pragma unroll
        for (int j = 0; j < NORM_HELD; ++j) {
            i64 i = threadIdx.x + (i64)j * blockDim.x;
            float v = xv[j] * f;
            if (i < dim) yr[i] = w ? wv[j] * v : v;
        }
        return;
    }
    // Unrolled so that a thread's loads are in flight together.
#pragma unroll 4
    for (i64 i = threadIdx.x; i < dim; i += blockDim.x) {
        double v = (double)xr[i];
        ss += v * v;
    }
    float f = rms_factor(ss, dim, eps, red);
#pragma unroll 4
    for (i64 i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = xr[i] * f;
        yr[i] = w ? w[i] * v : v;
    }
}

// RmsNorm with `rope` (hal::ops::norm), one block per row of dim (even) values, a thread per pair
// (2p, 2p + 1): y = w ⊙ (x · r) as rms_norm computes it; then, for the pairs in the last rd
// values, the forward RoPE at the position of the row's token (rope_rotate; a negative
// position was reported by check_range and leaves the pair unrotated, as in rope); then, with
// fp8_nope, the e4m3 simulation of the first dim − rd values in blocks of 64 (quant_rows' scale
// and rounding). 32 consecutive pairs are one warp and one block of 64, so the block's amax is a
// warp max: dim − rd is a multiple of 64 and blockDim a multiple of 32. Skips the row when a
// deferred error is pending (as rope does).
extern "C" __global__ void rms_norm_rope(const float* x, const float* w, float* y, i64 dim, float eps,
                                         const float* freqs, const int* pos, i64 heads, i64 rd, int fp8_nope,
                                         const i64* err) {
    grid_dep_begin();
    __shared__ double red[32];
    if (err[0] != 0) return;
    i64 r = blockIdx.x, np = dim / 2, nope = dim - rd;
    const float2* xr = (const float2*)(x + r * dim);
    const float2* wr = (const float2*)w;
    float2* yr = (float2*)(y + r * dim);
    double ss = 0.0;
    for (i64 p = threadIdx.x; p < np; p += blockDim.x) {
        float2 v = xr[p];
        ss += (double)v.x * (double)v.x + (double)v.y * (double)v.y;
    }
    float f = rms_from_sum(block_sum_d(ss, red), dim, eps);
    int at = pos[r / heads];
    int lane = threadIdx.x & 31;
    // Warp-uniform trips: every lane reaches the warp max of its 64-value block.
    for (i64 p0 = (i64)threadIdx.x - lane; p0 < np; p0 += blockDim.x) {
        i64 p = p0 + lane;
        bool in = p < np;
        float a = 0.0f, b = 0.0f;
        if (in) {
            float2 v = xr[p];
            a = v.x * f;
            b = v.y * f;
            if (w) {
                float2 wv = wr[p];
                a = wv.x * a;
                b = wv.y * b;
            }
        }
        if (in && 2 * p >= nope && at >= 0) {
            float c, s;
            rope_cs((float)at, freqs[p - nope / 2], &c, &s);
            rope_rotate(&a, &b, c, s, false);
        } else if (fp8_nope && 2 * p0 < nope) {
            float sc = quant_scale(warp_max_f(fmaxf(fabsf(a), fabsf(b))), FMT_FP8);
            a = quant_value(a, sc, FMT_FP8);
            b = quant_value(b, sc, FMT_FP8);
        }
        if (in) yr[p] = make_float2(a, b);
    }
}
