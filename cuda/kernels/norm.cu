// RMSNorm (hal::ops::norm): one block per row.

// y = w ⊙ (x · r), r = fl32(1 / sqrt(fl32(mean(x²)) + eps)); weight may be null.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* y, i64 dim, float eps) {
    grid_dep_begin();
    __shared__ double red[32];
    i64 r = blockIdx.x;
    const float* xr = x + r * dim;
    double ss = 0.0;
    // Unrolled so that a thread's loads are in flight together: one block per row, so a decode
    // step's norm is one SM waiting on memory.
#pragma unroll 4
    for (i64 i = threadIdx.x; i < dim; i += blockDim.x) {
        double v = (double)xr[i];
        ss += v * v;
    }
    ss = block_sum_d(ss, red);
    float ms = (float)(ss / (double)dim);
    float f = (float)(1.0 / sqrt((double)(ms + eps)));
    float* yr = y + r * dim;
#pragma unroll 4
    for (i64 i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = xr[i] * f;
        yr[i] = w ? w[i] * v : v;
    }
}
