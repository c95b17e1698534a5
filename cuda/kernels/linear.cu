// Linear and GroupedLinear over the checkpoint's weight formats (hal::ops::linear).
// The act_quant of FP8/FP4 linears runs first as quant_rows (prelude) into a scratch buffer.

// y[r, o] = Σ_i W[o, i] · x[r, (o / opg)·K + i] (opg = N for a plain linear). One warp per output
// feature at a time (grid-stride over features), RT rows per pass; grid (feature blocks, row
// tiles). `vec`: the 16-byte vector path may be used (k % 32 == 0 and x rows 16-byte aligned).
template <int RT>
__device__ __forceinline__ void linear_impl(const float* x, i64 x_stride, const u8* w, const u8* sc, float* y,
                                            i64 y_stride, i64 rows, i64 k, i64 n, i64 opg, int fmt, int vec) {
    __shared__ float lut[LUT_SIZE];
    if (fmt >= WF_FP8) fill_luts(lut);
    __syncthreads();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpb = blockDim.x >> 5;
    for (i64 o = (i64)blockIdx.x * wpb + warp; o < n; o += (i64)gridDim.x * wpb) {
        i64 xo = (o / opg) * k;
        for (i64 r0 = (i64)blockIdx.y * RT; r0 < rows; r0 += (i64)gridDim.y * RT) {
            int nt = rows - r0 < RT ? (int)(rows - r0) : RT;
            const float* xs[RT];
            float acc[RT];
#pragma unroll
            for (int t = 0; t < RT; ++t) {
                xs[t] = x + (r0 + (t < nt ? t : 0)) * x_stride + xo;
                acc[t] = 0.0f;
            }
            wdot_any<RT>(fmt, vec, w, sc, o, k, xs, nt, acc, lut);
#pragma unroll
            for (int t = 0; t < RT; ++t) {
                float v = warp_sum_f(acc[t]);
                if (lane == 0 && t < nt) y[(r0 + t) * y_stride + o] = v;
            }
        }
    }
}

// One row (decode). With `staged` the block's warps form groups of `ksplit` warps; a group takes
// LIN_OT output features per step, its warps splitting the row in interleaved slabs
// (wdot_vec_split), and their partial sums are added in warp order, so the result does not depend
// on timing. ksplit > 1 gives short rows enough warps to keep HBM busy. The x group of the block's
// features is staged in shared memory (stage_x; k floats of dynamic shared memory), so the host
// sets `staged` only for the vector path (k % 32 == 0) with opg % LIN_OT == 0 and each block step's
// features in one group; else one warp takes one feature (linear_impl).
extern "C" __global__ void __launch_bounds__(256, 2)
    linear_fwd_r1(const float* x, i64 x_stride, const u8* w, const u8* sc, float* y, i64 y_stride, i64 rows, i64 k,
                  i64 n, i64 opg, int fmt, int vec, int ksplit, int staged) {
    grid_dep_begin();
    if (!staged) {
        linear_impl<1>(x, x_stride, w, sc, y, y_stride, rows, k, n, opg, fmt, vec);
        return;
    }
    extern __shared__ float4 sx[];
    __shared__ float lut[LUT_SIZE];
    __shared__ float part[8][LIN_OT];
    if (chunk_dot_needs_lut(fmt)) fill_luts(lut);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int groups = (blockDim.x >> 5) / ksplit, g = warp / ksplit, p = warp % ksplit;
    i64 per_block = (i64)groups * LIN_OT, in_sx = -1;
    for (i64 base = (i64)blockIdx.x * per_block; base < n; base += (i64)gridDim.x * per_block) {
        if (base / opg != in_sx) {  // block-uniform; the previous step ended with a barrier
            in_sx = base / opg;
            stage_x(x + in_sx * k, k, fmt, sx);
        }
        __syncthreads();
        i64 o0 = base + (i64)g * LIN_OT;
        int no = n - o0 >= LIN_OT ? LIN_OT : (n > o0 ? (int)(n - o0) : 0);
        float acc[LIN_OT];
#pragma unroll
        for (int j = 0; j < LIN_OT; ++j) acc[j] = 0.0f;
        if (no > 0) wdot_split_any<LIN_OT>(fmt, w, sc, o0, no, k, sx, acc, lut, p, ksplit);
#pragma unroll
        for (int j = 0; j < LIN_OT; ++j) {
            float v = warp_sum_f(acc[j]);
            if (lane == 0) part[warp][j] = v;
        }
        __syncthreads();
        if (p == 0 && lane < no) {
            float v = part[warp][lane];
            for (int q = 1; q < ksplit; ++q) v += part[warp + q][lane];
            y[o0 + lane] = v;
        }
        __syncthreads();
    }
}

// LIN_RT rows per pass.
extern "C" __global__ void __launch_bounds__(256, 2)
    linear_fwd(const float* x, i64 x_stride, const u8* w, const u8* sc, float* y, i64 y_stride, i64 rows, i64 k,
               i64 n, i64 opg, int fmt, int vec) {
    grid_dep_begin();
    linear_impl<LIN_RT>(x, x_stride, w, sc, y, y_stride, rows, k, n, opg, fmt, vec);
}

// Tensor-core path for many rows (common.cuh tc_tile): grid (feature tiles of TC_BN, row tiles of
// TC_BM, grid-stride). A feature tile lies in one group (opg % TC_BN == 0, or one group).
// x is bf16 when split is 1 (quant_rows_bf16), else f32; x_stride counts elements.
extern "C" __global__ void __launch_bounds__(256)
    linear_tc(const u8* x, i64 x_stride, const u8* w, const u8* sc, float* y, i64 y_stride, i64 rows, i64 k,
              i64 n, i64 opg, int fmt, int split) {
    grid_dep_begin();
    __shared__ TcSmem sm;
    extern __shared__ uint4 tc_stages[];
    fill_luts(sm.lut);
    i64 o0 = (i64)blockIdx.x * TC_BN, xo = (o0 / opg) * k;
    i64 esize = split == 1 ? 2 : 4;
    auto row_of = [&](int c) { return TcWRow{w, sc, o0 + c < n ? o0 + c : -1}; };
    for (i64 r0 = (i64)blockIdx.y * TC_BM; r0 < rows; r0 += (i64)gridDim.y * TC_BM) {
        if (threadIdx.x < TC_BM) {
            i64 r = r0 + threadIdx.x;
            sm.xrow[threadIdx.x] = r < rows ? x + (r * x_stride + xo) * esize : nullptr;
        }
        __syncthreads();
        float acc[2][4][4];
        tc_tile_any(fmt, split, sm, (u16*)tc_stages, row_of, k, acc);
        tc_epilogue(acc, [&](int m, int c, float v) {
            if (r0 + m < rows && o0 + c < n) y[(r0 + m) * y_stride + o0 + c] = v;
        });
    }
}
