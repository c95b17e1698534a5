// Calibration kernels (not ops): a dense f32 GEMM on the CUDA cores, used by
// `Backend::calibrate` as the yardstick the prefill GEMMs are compared against.
//
// calibrate_sgemm: C[M, N] = A[M, K] · B[N, K]ᵀ (both operands K-contiguous, like Linear's
// x · Wᵀ). Classic register-tiled SIMT kernel: a 256-thread block computes a 128×128 tile of C,
// K in steps of 8 through shared memory, each thread an 8×8 sub-tile (rows tr + 16i, columns
// tc + 16j) accumulated with explicit fmaf (the family is compiled with --fmad=false).
// Requires M % 128 == 0, N % 128 == 0, K % 8 == 0 (the caller picks such sizes).

extern "C" __global__ void __launch_bounds__(256) calibrate_sgemm(const float* __restrict__ A,
                                                                   const float* __restrict__ B,
                                                                   float* __restrict__ C, int M, int N, int K) {
    grid_dep_begin();
    __shared__ float As[8][128 + 4];
    __shared__ float Bs[8][128 + 4];
    const int tid = threadIdx.x;
    const int bm = blockIdx.y * 128, bn = blockIdx.x * 128;
    const int tr = tid / 16, tc = tid % 16;
    const int lr = tid >> 1, lk = (tid & 1) * 4;
    if (bm >= M || bn >= N) return;
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
    const float* a_row = A + (size_t)(bm + lr) * K + lk;
    const float* b_row = B + (size_t)(bn + lr) * K + lk;
    for (int k0 = 0; k0 < K; k0 += 8) {
        const float4 a = *reinterpret_cast<const float4*>(a_row + k0);
        const float4 b = *reinterpret_cast<const float4*>(b_row + k0);
        As[lk + 0][lr] = a.x; As[lk + 1][lr] = a.y; As[lk + 2][lr] = a.z; As[lk + 3][lr] = a.w;
        Bs[lk + 0][lr] = b.x; Bs[lk + 1][lr] = b.y; Bs[lk + 2][lr] = b.z; Bs[lk + 3][lr] = b.w;
        __syncthreads();
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            float ra[8], rb[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) ra[i] = As[k][tr + 16 * i];
#pragma unroll
            for (int j = 0; j < 8; ++j) rb[j] = Bs[k][tc + 16 * j];
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(ra[i], rb[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) C[(size_t)(bm + tr + 16 * i) * N + bn + tc + 16 * j] = acc[i][j];
}
