// Checks, on every f32 bit pattern, that the hardware e4m3 conversion the FP8 GEMV uses
// (common.cuh e4m3x2_sat, cvt.rn.satfinite.e4m3x2.f32) gives the codes of the software encoder
// that cpu-ref's act_quant is ported from (quant_code_e4m3), both as a conversion and with a
// power-of-two scale applied as v · (1/s) instead of v / s. Run on a GPU of sm_89 or newer:
//   nvcc -arch=sm_90 -fmad=false -o /tmp/check-e4m3 scripts/check-e4m3-cvt.cu && /tmp/check-e4m3
#include <cstdio>
#include "../cuda/kernels/common.cuh"

__global__ void compare(u32 hi_bits, float s, unsigned long long* bad, u32* first) {
    u32 bits = (hi_bits << 16) | (blockIdx.x * blockDim.x + threadIdx.x);
    float v = __uint_as_float(bits);
    u32 want = s == 0.0f ? f32_to_e4m3(clamp_nan(v, -448.0f, 448.0f)) : quant_code_e4m3(v, s);
    u32 got = s == 0.0f ? e4m3x2_sat(v, -v) : e4m3x2_sat(v * (1.0f / s), -v * (1.0f / s));
    u32 want_neg = s == 0.0f ? f32_to_e4m3(clamp_nan(-v, -448.0f, 448.0f)) : quant_code_e4m3(-v, s);
    if ((got & 0xFF) != want || (got >> 8) != want_neg) {
        if (atomicAdd(bad, 1ull) == 0) *first = bits;
    }
}

int main() {
    // 0: the conversion alone; then the scales act_quant can produce (amax ≥ 1e-4 gives ≥ 2^-22;
    // an infinite amax gives an infinite scale).
    float scales[] = {0.0f, 0x1p-22f, 0x1p-7f, 1.0f, 0x1p+9f, 0x1p+120f, __builtin_huge_valf()};
    unsigned long long* bad;
    u32* first;
    cudaMallocManaged(&bad, sizeof *bad);
    cudaMallocManaged(&first, sizeof *first);
    int failed = 0;
    for (float s : scales) {
        *bad = 0;
        for (u32 hi = 0; hi < 65536; ++hi) compare<<<256, 256>>>(hi, s, bad, first);
        if (cudaDeviceSynchronize() != cudaSuccess) {
            printf("CUDA error\n");
            return 2;
        }
        printf("scale %g: %llu of 2^32 f32 differ%s", s, *bad, *bad ? "" : "\n");
        if (*bad) printf(" (first 0x%08x)\n", *first);
        failed |= *bad != 0;
    }
    printf(failed ? "FAIL\n" : "PASS: the hardware conversion equals the software encoder\n");
    return failed;
}
