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
__device__ __forceinline__ void linear_fwd_r1_impl(const float* x, i64 x_stride, const u8* w, const u8* sc, float* y,
                                                   i64 y_stride, i64 rows, i64 k, i64 n, i64 opg, int fmt, int vec,
                                                   int ksplit, int staged) {
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

#define LINEAR_R1_ARGS                                                                                      \
    const float *x, i64 x_stride, const u8 *w, const u8 *sc, float *y, i64 y_stride, i64 rows, i64 k, i64 n, \
        i64 opg, int fmt, int vec, int ksplit, int staged
extern "C" __global__ void __launch_bounds__(256, 2) linear_fwd_r1(LINEAR_R1_ARGS) {
    grid_dep_begin();
    linear_fwd_r1_impl(x, x_stride, w, sc, y, y_stride, rows, k, n, opg, fmt, vec, ksplit, staged);
}
// linear_fwd_r1 for weights the L2 holds with room to spare (the host picks it): launched early,
// each block asks the L2 for the weight rows of all its steps before it waits, so its loads after
// the wait hit the L2 instead of HBM. Staged form only (its blocks take whole row runs).
extern "C" __global__ void __launch_bounds__(256, 2) linear_fwd_r1_early(LINEAR_R1_ARGS) {
    grid_dep_trigger();
    i64 per_block = (i64)((blockDim.x >> 5) / ksplit) * LIN_OT, row_bytes = mat_bytes(fmt, 1, k);
    for (i64 base = (i64)blockIdx.x * per_block; base < n; base += (i64)gridDim.x * per_block)
        prefetch_block_l2(w + base * row_bytes, (n - base < per_block ? n - base : per_block) * row_bytes);
    grid_dep_wait();
    linear_fwd_r1_impl(x, x_stride, w, sc, y, y_stride, rows, k, n, opg, fmt, vec, ksplit, staged);
}

// ---- FP8 one-row GEMV on tensor cores (sm_89+) ----------------------------------------------
// y[o] = Σ_kb sw[o / 128, kb]·sx[kb]·Σ_{i in block kb} W[o, i]·q[i] over the 128-column blocks
// kb, with the row act_quant'ed as e4m3 codes q and power-of-two scales sx.
// A warp takes MMA_ROWS weight rows and multiplies them with mma.sync m16n8k32 e4m3 → f32: the
// raw weight bytes are the A fragments and the codes of x the B fragments. On sm_89 that is one
// e4m3 mma instruction per 512 weight bytes. sm_90 has no e4m3 mma.sync (its FP8 tensor-core
// path is wgmma), so ptxas converts both fragments to f16 (12 F2FP.F16.E4M3.UNPACK) and issues two
// HMMA.16816 per mma (SASS of this kernel). That is 14 instructions, against about 116 for
// linear_fwd_r1 (e4m3 → f16 → f32 conversions and one FMA per weight; ncu, the 1024 → 32768
// projection).
// Each 128-column block is summed by 4 mma into fresh f32 accumulators and then scaled into
// the f32 total: the promotion of DeepSeek's FP8 GEMM, whose tensor cores keep ~14 bits between
// promotions (the conformance bound for FP8 linears allows for it).
//
// The k order inside an mma is free as long as A and B agree: lane (g, t) loads 16 bytes of rows
// g and g + 8 and of x at column 16·t of each 64-column step, and each of its 32-bit words is
// the fragment word the PTX layout puts at row g (g + 8), columns 4t.. (16 + 4t..) of one of two
// mma, so every lane's loads are whole 16-byte vectors. x fills all 8 B columns alike; column
// 0 of D is read (lanes t = 0: c0 for row g, c2 for row g + 8).
//
// Where the codes come from (QUANT_IN): linear_fp8_r1 reads the f32 row and act_quants each k
// block itself, as quant_rows_e4m3 would: the warp's lanes hold 4 columns each, a warp max gives
// the block's scale, each lane encodes its 4 values into one word (two hardware conversions,
// e4m3x2_sat; every row group repeats this for the whole row, so the software encoder cost
// 2 µs a GEMV on an H100), and 8 shuffles hand lane
// (g, t) the words of columns 16t.. and 64 + 16t... A warp quantizes only the k blocks it
// multiplies, after issuing the next block's loads, so no block-wide pass over the row stands
// before the first weight load (that pass is what made act_quant inside linear_fwd_r1 slower,
// docs/performance.md). linear_fp8_r1_codes takes codes and scales quant_rows_e4m3 wrote.
//
// The block's 8 warps are 8 / ksplit row groups of ksplit warps, each warp one
// contiguous run of the k blocks; the group's partial sums are added in warp order through
// shared memory, so the result does not depend on timing. Each warp issues the loads of its next
// k block before the mma of the current one. `early` (Dev::early_weights): 0, no L2 prefetch;
// 1, the warp's whole run of weight lines is prefetched into the L2 first; 2, that prefetch and
// the first k block's weights are issued before grid_dep_wait() (common.cuh says why that is
// safe), so a GEMV whose blocks are resident before its predecessor ends streams its weights
// under the predecessor's tail. Three blocks per SM (80 registers; ptxas -v for sm_90).
// Needs k % 128 == 0 (and, with QUANT_IN, x 16-byte aligned).
template <bool QUANT_IN>
__device__ __forceinline__ void linear_fp8_r1_impl(const void* xin, const float* xs, const u8* w, const u8* sc,
                                                   float* y, i64 n, i64 k, int ksplit, int early) {
#if __CUDA_ARCH__ >= 890
    __shared__ float part[8][MMA_ROWS];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    int groups = 8 / ksplit, lg = warp / ksplit, p = warp % ksplit;
    i64 r0 = ((i64)blockIdx.x * groups + lg) * MMA_ROWS;
    i64 kblocks = k >> 7, per = (kblocks + ksplit - 1) / ksplit;
    i64 kb0 = r0 < n ? p * per : 0, kb1 = r0 < n ? min(kblocks, kb0 + per) : 0;
    i64 ra = min(r0 + g, n - 1), rb = min(r0 + g + 8, n - 1);
    const u8* wa = w + ra * k + 16 * t;
    const u8* wb = w + rb * k + 16 * t;
    const u8* srow = sc + (r0 >> 7) * kblocks;
    // One k block: rows g and g + 8 at both 64-column steps, the weight block's scale, and x:
    // the lane's codes at both steps, or (QUANT_IN) the lane's 4 f32 values of the block.
    struct Blk {
        uint4 q[4];
        uint4 xq[2];
        float4 xv;
        float s;
    };
    auto load_w = [&](i64 kb, Blk& b) {
        i64 o = kb << 7;
        b.q[0] = __ldg((const uint4*)(wa + o));
        b.q[1] = __ldg((const uint4*)(wb + o));
        b.q[2] = __ldg((const uint4*)(wa + o + 64));
        b.q[3] = __ldg((const uint4*)(wb + o + 64));
        b.s = e8m0_to_f32(srow[kb]);
    };
    auto load_x = [&](i64 kb, Blk& b) {
        i64 o = kb << 7;
        if (QUANT_IN) {
            b.xv = __ldg((const float4*)((const float*)xin + o) + lane);
        } else {
            const u8* xt = (const u8*)xin + 16 * t;
            b.xq[0] = __ldg((const uint4*)(xt + o));
            b.xq[1] = __ldg((const uint4*)(xt + o + 64));
            b.s *= xs[kb];
        }
    };
    // QUANT_IN: b's codes and b.s *= the block's act scale (quant_row_blocks' arithmetic).
    auto quantize = [&](Blk& b) {
        float4 v = b.xv;
        float amax = warp_max_f(fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
        float s = quant_scale(amax, FMT_FP8), inv = 1.0f / s;
        u32 word = e4m3x2_sat(v.x * inv, v.y * inv) | (e4m3x2_sat(v.z * inv, v.w * inv) << 16);
        u32 c[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) c[j] = __shfl_sync(FULL_MASK, word, (j < 4 ? 4 * t : 16 + 4 * t) + (j & 3));
        b.xq[0] = make_uint4(c[0], c[1], c[2], c[3]);
        b.xq[1] = make_uint4(c[4], c[5], c[6], c[7]);
        b.s *= s;
    };
    // A row's 128 columns are one 128-byte line: lane (g, t) asks the L2 for row g (t even) or
    // g + 8 (t odd) at every other k block after the first, so the whole run is requested at once.
    auto prefetch_run = [&]() {
        for (i64 kb = kb0 + 1 + (t >> 1); kb < kb1; kb += 2) prefetch_l2((t & 1 ? wb : wa) + (kb << 7));
    };
    Blk cur, nxt;
    if (early < 2) grid_dep_wait();
    if (early > 0) prefetch_run();
    if (kb0 < kb1) load_w(kb0, cur);
    if (early == 2) grid_dep_wait();
    if (kb0 < kb1) load_x(kb0, cur);
    float acc0 = 0.0f, acc2 = 0.0f;
    for (i64 kb = kb0; kb < kb1; ++kb) {
        if (kb + 1 < kb1) {
            load_w(kb + 1, nxt);
            load_x(kb + 1, nxt);
        }
        if (QUANT_IN) quantize(cur);
        float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const uint4 &ra4 = cur.q[2 * h], &rb4 = cur.q[2 * h + 1], &x4 = cur.xq[h];
            mma_e4m3_16x8x32(d, ra4.x, rb4.x, ra4.y, rb4.y, x4.x, x4.y);
            mma_e4m3_16x8x32(d, ra4.z, rb4.z, ra4.w, rb4.w, x4.z, x4.w);
        }
        acc0 = fmaf(d[0], cur.s, acc0);
        acc2 = fmaf(d[2], cur.s, acc2);
        cur = nxt;
    }
    if (t == 0) {
        part[warp][g] = acc0;
        part[warp][g + 8] = acc2;
    }
    __syncthreads();
    if (threadIdx.x < groups * MMA_ROWS) {
        int q = threadIdx.x / MMA_ROWS, r = threadIdx.x % MMA_ROWS;
        i64 o = ((i64)blockIdx.x * groups + q) * MMA_ROWS + r;
        float v = part[q * ksplit][r];
        for (int j = 1; j < ksplit; ++j) v += part[q * ksplit + j][r];
        if (o < n) y[o] = v;
    }
#else
    grid_dep_wait();
#endif
}

// x: the f32 row.
extern "C" __global__ void __launch_bounds__(256, 3)
    linear_fp8_r1(const float* x, const u8* w, const u8* sc, float* y, i64 n, i64 k, int ksplit, int early) {
    grid_dep_trigger();
    linear_fp8_r1_impl<true>(x, nullptr, w, sc, y, n, k, ksplit, early);
}

// xq, xs: the row's e4m3 codes and their scales (quant_rows_e4m3).
extern "C" __global__ void __launch_bounds__(256, 3)
    linear_fp8_r1_codes(const u8* xq, const float* xs, const u8* w, const u8* sc, float* y, i64 n, i64 k,
                        int ksplit, int early) {
    grid_dep_trigger();
    linear_fp8_r1_impl<false>(xq, xs, w, sc, y, n, k, ksplit, early);
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
