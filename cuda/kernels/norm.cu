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
