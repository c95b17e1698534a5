// Mixture of experts (hal::ops::moe): gate, clamped SwiGLU, routed experts.

__device__ __forceinline__ float swiglu_f(float g, float u, float limit) {
    if (limit > 0.0f) {
        g = g > limit ? limit : g;
        u = clamp_nan(u, -limit, limit);
    }
    return (float)((double)g / (1.0 + exp(-(double)g))) * u;
}

extern "C" __global__ void swiglu(const float* g, const float* u, float* h, i64 n, float limit) {
    grid_dep_begin();
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        h[i] = swiglu_f(g[i], u[i], limit);
}

// Lane partial sum of dot(wr, xr) in f64 over the columns first, first + stride, ... (unrolled:
// the loads of several steps in flight; the order of the sum is that of the loop).
__device__ __forceinline__ double gate_partial(const float* xr, const float* wr, i64 dim, i64 first, i64 stride) {
    double acc = 0.0;
#pragma unroll 8
    for (i64 i = first; i < dim; i += stride) acc += (double)wr[i] * (double)xr[i];
    return acc;
}

// sqrt(softplus(z)) of the dot rounded once to f32 (softplus(z) = z above 20).
__device__ __forceinline__ float gate_score(double dot) {
    float z = (float)dot;
    float sp = z > 20.0f ? z : (float)log1p(exp((double)z));
    return sqrtf(sp);
}

// gate_scores for many rows: grid (row tiles, expert tiles) of DOT_TILE each (dot_tile_f64).
extern "C" __global__ void __launch_bounds__(256) gate_scores_tiled(const float* x, const float* gw, i64 rows, i64 dim,
                                                                    i64 experts, float* s) {
    grid_dep_begin();
    i64 r0 = (i64)blockIdx.x * DOT_TILE, e0 = (i64)blockIdx.y * DOT_TILE;
    int xr = (int)(rows - r0 < DOT_TILE ? rows - r0 : DOT_TILE);
    int wr = (int)(experts - e0 < DOT_TILE ? experts - e0 : DOT_TILE);
    double acc[4];
    dot_tile_f64(x + r0 * dim, xr, gw + e0 * dim, wr, dim, -1, 0, dim, acc);
    int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
#pragma unroll
    for (int j = 0; j < 4; ++j)
        if (ty * 4 + j < xr && tx < wr) s[(r0 + ty * 4 + j) * experts + e0 + tx] = gate_score(acc[j]);
}

// s[r, e] = gate_score(dot(gate_w[e], x[r])), the dot in f64. parts == 1 (many rows): one warp per
// (r, e), grid-stride. parts = 2, 4 or 8 (few rows: a decode row's 256 dots would use 32 SMs):
// `parts` warps per (r, e), each over an interleaved share of 32-column slabs, their partial sums
// added in warp order.
extern "C" __global__ void gate_scores(const float* x, const float* gw, i64 rows, i64 dim, i64 experts, int parts,
                                       float* s) {
    grid_dep_begin();
    __shared__ double part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    i64 dots = rows * experts;
    if (parts == 1) {
        i64 stride = ((i64)gridDim.x * blockDim.x) >> 5;
        for (i64 d = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; d < dots; d += stride) {
            double acc = warp_sum_d(gate_partial(x + (d / experts) * dim, gw + (d % experts) * dim, dim, lane, 32));
            if (lane == 0) s[d] = gate_score(acc);
        }
        return;
    }
    int per_block = (blockDim.x >> 5) / parts, p = warp % parts;
    for (i64 base = (i64)blockIdx.x * per_block; base < dots; base += (i64)gridDim.x * per_block) {
        i64 d = base + warp / parts;
        double acc = 0.0;
        if (d < dots)
            acc = gate_partial(x + (d / experts) * dim, gw + (d % experts) * dim, dim, (i64)p * 32 + lane, 32 * (i64)parts);
        acc = warp_sum_d(acc);
        if (lane == 0) part[warp] = acc;
        __syncthreads();
        if (p == 0 && lane == 0 && d < dots) {
            double t = part[warp];
            for (int q = 1; q < parts; ++q) t += part[warp + q];
            s[d] = gate_score(t);
        }
        __syncthreads();
    }
}

// Expert set and weights of rows r0, r0 + stride, ..., one warp each (scored: top-k of s + bias by
// total order, ties lower e first; hashed: tid2eid[ids[r]]), then weights route_scale · s_e / Σ s
// (sum in f64, rounded once). Rows with a bad hashed id or table entry are left alone (the check
// reports them).
__device__ __forceinline__ void gate_select_rows(const float* s, const float* bias, const int* tid2eid, const int* ids,
                                                 i64 rows, int experts, int k, i64 vocab, int hashed,
                                                 float route_scale, int* out_e, float* out_w, i64 r0, i64 stride) {
    int lane = threadIdx.x & 31;
    for (i64 r = r0; r < rows; r += stride) {
        const float* sr = s + r * experts;
        int* er = out_e + r * k;
        if (hashed) {
            i64 id = ids[r];
            if (id < 0 || id >= vocab) continue;
            bool bad = false;
            for (int t = lane; t < k; t += 32) {
                int e = tid2eid[id * k + t];
                bad = bad || e < 0 || e >= experts;
            }
            if (__any_sync(FULL_MASK, bad)) continue;
            for (int t = lane; t < k; t += 32) er[t] = tid2eid[id * k + t];
        } else {
            u64 prev = ~0ull;
            for (int t = 0; t < k; ++t) {
                u64 best = 0;
                for (int e = lane; e < experts; e += 32) {
                    u64 c = rank_code(sr[e] + bias[e], (u32)e);
                    if (c < prev && c > best) best = c;
                }
                for (int o = 16; o > 0; o >>= 1) {
                    u64 b2 = __shfl_xor_sync(FULL_MASK, best, o);
                    best = b2 > best ? b2 : best;
                }
                if (lane == 0) er[t] = (int)(0xFFFFFFFFu - (u32)(best & 0xFFFFFFFFull));
                prev = best;
            }
        }
        __syncwarp();
        // Lane t mod 32 loads s of expert t, so that the loads are in flight together; every
        // lane adds them in order t (shuffles), so the sum is that of a sequential loop.
        double sum = 0.0;
        for (int t0 = 0; t0 < k; t0 += 32) {
            float st = t0 + lane < k ? sr[er[t0 + lane]] : 0.0f;
            int n = k - t0 < 32 ? k - t0 : 32;
            for (int j = 0; j < n; ++j) sum += (double)__shfl_sync(FULL_MASK, st, j);
        }
        float sf = (float)sum;
        for (int t = lane; t < k; t += 32) out_w[r * k + t] = sr[er[t]] / sf * route_scale;
    }
}

// One warp per row (gate_select_rows), grid-stride.
extern "C" __global__ void gate_select(const float* s, const float* bias, const int* tid2eid, const int* ids,
                                       i64 rows, int experts, int k, i64 vocab, int hashed, float route_scale,
                                       int* out_e, float* out_w, const i64* err) {
    grid_dep_begin();
    if (err[0] != 0) return;
    gate_select_rows(s, bias, tid2eid, ids, rows, experts, k, vocab, hashed, route_scale, out_e, out_w,
                     ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5, ((i64)gridDim.x * blockDim.x) >> 5);
}

// Hashed-gate argument check by the whole block: token id range, then tid2eid entries (lowest
// row).
__device__ void gate_hashed_check(const int* ids, const int* tid2eid, i64 rows, int k, i64 vocab, int experts, int op,
                                  i64* err, i64* sh) {
    i64 m = ROW_NONE;
    for (i64 r = threadIdx.x; r < rows; r += blockDim.x) {
        i64 id = ids[r];
        bool bad = id < 0 || id >= vocab;
        for (int t = 0; !bad && t < k; ++t) {
            int e = tid2eid[id * k + t];
            bad = e < 0 || e >= experts;
        }
        if (bad) { m = r; break; }
    }
    m = block_min_i64(m, sh);
    if (threadIdx.x == 0 && m != ROW_NONE) {
        i64 id = ids[m];
        if (id < 0 || id >= vocab) {
            report_error(err, E_TOKEN, op, m, id, vocab, 0);
        } else {
            for (int t = 0; t < k; ++t) {
                int e = tid2eid[id * k + t];
                if (e < 0 || e >= experts) { report_error(err, E_TID2EID, op, m, id, e, experts); break; }
            }
        }
    }
}

// One block.
extern "C" __global__ void __launch_bounds__(1024) check_gate_hashed(const int* ids, const int* tid2eid, i64 rows, int k, i64 vocab,
                                             int experts, int op, i64* err) {
    grid_dep_begin();
    __shared__ i64 sh[32];
    if (err[0] != 0) return;
    gate_hashed_check(ids, tid2eid, rows, k, vocab, experts, op, err, sh);
}

// Two blocks, for few rows of a hashed gate (a decode step): block 0 runs check_gate_hashed and
// block 1 gate_select with a warp per row, side by side in one launch instead of two kernels one
// after the other. The selection skips the rows that the check reports (gate_select_rows).
extern "C" __global__ void __launch_bounds__(1024) gate_select_checked(const float* s, const int* tid2eid, const int* ids,
                                                                      i64 rows, int experts, int k, i64 vocab,
                                                                      float route_scale, int op, int* out_e,
                                                                      float* out_w, i64* err) {
    grid_dep_begin();
    __shared__ i64 sh[32];
    if (err[0] != 0) return;
    if (blockIdx.x == 0)
        gate_hashed_check(ids, tid2eid, rows, k, vocab, experts, op, err, sh);
    else
        gate_select_rows(s, nullptr, tid2eid, ids, rows, experts, k, vocab, 1, route_scale, out_e, out_w,
                         threadIdx.x >> 5, blockDim.x >> 5);
}

// One block. Routed-experts argument check: each entry in range (list order), then no repeats
// (the smallest repeated expert), lowest row first.
__device__ int experts_row_error(const int* er, int k, int experts, i64* v) {
    for (int t = 0; t < k; ++t)
        if (er[t] < 0 || er[t] >= experts) { v[0] = er[t]; v[1] = experts; return E_EXPERT_RANGE; }
    int dup = -1;
    for (int a = 0; a < k; ++a)
        for (int b = a + 1; b < k; ++b)
            if (er[a] == er[b] && (dup < 0 || er[a] < dup)) dup = er[a];
    if (dup >= 0) { v[0] = dup; v[1] = 0; return E_EXPERT_DUP; }
    return 0;
}

// Whether every row of ex is valid, by the whole block; thread 0 reports the lowest bad row.
__device__ bool experts_valid(const int* ex, i64 rows, int k, int experts, int op, i64* err, i64* sh) {
    i64 m = ROW_NONE;
    i64 v[2];
    for (i64 r = threadIdx.x; r < rows; r += blockDim.x)
        if (experts_row_error(ex + r * k, k, experts, v) != 0) { m = r; break; }
    m = block_min_i64(m, sh);
    if (m == ROW_NONE) return true;
    if (threadIdx.x == 0) report_error(err, experts_row_error(ex + m * k, k, experts, v), op, m, v[0], v[1], 0);
    return false;
}

extern "C" __global__ void __launch_bounds__(1024) check_experts(const int* ex, i64 rows, int k, int experts, int op, i64* err) {
    grid_dep_begin();
    __shared__ i64 sh[32];
    if (err[0] != 0) return;
    experts_valid(ex, rows, k, experts, op, err, sh);
}

// Pair p = r·k + t of this chunk into the per-expert lists list[e, 0..cnt[e]) (any order), the
// ascending-expert order of each row: order[r·k + rank] = t, and the experts in use:
// active[0..cnt[experts]) (any order). cnt (experts + 1 ints) must be zero before the first pair.
__device__ __forceinline__ void route_pair(i64 p, const int* ex, i64 rows, int k, int experts, int* cnt, int* list,
                                           int* order, int* active) {
    i64 r = p / k;
    int e = ex[p];
    if (e < 0 || e >= experts) return;
    int slot = atomicAdd(&cnt[e], 1);
    list[(i64)e * rows + slot] = (int)p;
    if (slot == 0) active[atomicAdd(&cnt[experts], 1)] = e;
    int rank = 0;
    for (int t = 0; t < k; ++t) rank += ex[r * k + t] < e ? 1 : 0;
    order[r * k + rank] = (int)(p - r * k);
}

extern "C" __global__ void moe_route(const int* ex, i64 rows, int k, int experts, int* cnt, int* list, int* order,
                                     int* active, const i64* err) {
    grid_dep_begin();
    if (err[0] != 0) return;
    i64 pairs = rows * k;
    for (i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += (i64)gridDim.x * blockDim.x)
        route_pair(p, ex, rows, k, experts, cnt, list, order, active);
}

// Block 0, for few pairs (a decode step): check_experts, the zeroing of cnt and moe_route in one
// launch instead of three nodes. Routes nothing when a row is bad (the error is recorded). A
// second block, where the grid has one, act_quants the input rows x [rows, dim] into xq at the
// same time (blocks of qblock, a warp per block): the experts' input, without a kernel of its own.
// codes = 0: quant_rows' values; else quant_rows_e4m3's codes, their scales at byte scales_off
// (the tensor-core FP4 experts' input; dim % qblock == 0).
extern "C" __global__ void __launch_bounds__(1024) moe_route_checked(const int* ex, i64 rows, int k, int experts,
                                                                    int op, int* cnt, int* list, int* order,
                                                                    int* active, i64* err, const float* x, float* xq,
                                                                    i64 dim, int qblock, int codes, i64 scales_off) {
    grid_dep_begin();
    __shared__ i64 sh[32];
    if (blockIdx.x == 1) {
        u8* xc = (u8*)xq;
        float* scales = (float*)(xc + scales_off);
        i64 nb = dim / qblock;
        quant_row_blocks_by(
            x, rows, dim, dim, qblock, FMT_FP8, threadIdx.x >> 5, blockDim.x >> 5,
            [&](i64 i, float v, float s) {
                if (codes)
                    xc[i] = quant_code_e4m3(v, s);
                else
                    xq[i] = quant_value(v, s, FMT_FP8);
            },
            [&](i64 r, i64 b, float s) {
                if (codes) scales[r * nb + b] = s;
            });
        return;
    }
    if (err[0] != 0 || !experts_valid(ex, rows, k, experts, op, err, sh)) return;
    for (int e = threadIdx.x; e <= experts; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (i64 p = threadIdx.x; p < rows * k; p += blockDim.x) route_pair(p, ex, rows, k, experts, cnt, list, order, active);
}

// h[p, o] = weights[p] · SwiGlu(W1_e[o] · xq[r], W3_e[o] · xq[r]) for the pairs p of expert
// e = active[blockIdx.y]. One warp per o (grid-stride), RT pairs per pass. W1, W3: [E, inter, dim].
template <int RT>
__device__ __forceinline__ void moe_up_impl(const float* xq, const u8* w1, const u8* s1, const u8* w3, const u8* s3,
                                            const float* wts, const int* cnt, const int* list, const int* active,
                                            int experts, i64 rows, int k, i64 dim, i64 inter, int fmt, float limit,
                                            float* h, const i64* err) {
    __shared__ float lut[LUT_SIZE];
    if (err[0] != 0 || (int)blockIdx.y >= cnt[experts]) return;
    if (fmt >= WF_FP8) fill_luts(lut);
    __syncthreads();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpb = blockDim.x >> 5;
    i64 e = active[blockIdx.y];
    int n = cnt[e];
    const u8* w1e = w1 + e * mat_bytes(fmt, inter, dim);
    const u8* w3e = w3 + e * mat_bytes(fmt, inter, dim);
    const u8* s1e = s1 ? s1 + e * scale_bytes(fmt, inter, dim) : s1;
    const u8* s3e = s3 ? s3 + e * scale_bytes(fmt, inter, dim) : s3;
    for (i64 o = (i64)blockIdx.x * wpb + warp; o < inter; o += (i64)gridDim.x * wpb) {
        for (i64 t0 = (i64)blockIdx.z * RT; t0 < n; t0 += (i64)gridDim.z * RT) {
            int nt = n - t0 < RT ? (int)(n - t0) : RT;
            const float* xs[RT];
            int pr[RT];
            float ag[RT], au[RT];
#pragma unroll
            for (int t = 0; t < RT; ++t) {
                pr[t] = list[e * rows + t0 + (t < nt ? t : 0)];
                xs[t] = xq + (i64)(pr[t] / k) * dim;
                ag[t] = 0.0f;
                au[t] = 0.0f;
            }
            wdot_any<RT>(fmt, 1, w1e, s1e, o, dim, xs, nt, ag, lut);
            wdot_any<RT>(fmt, 1, w3e, s3e, o, dim, xs, nt, au, lut);
#pragma unroll
            for (int t = 0; t < RT; ++t) {
                float g = warp_sum_f(ag[t]);
                float u = warp_sum_f(au[t]);
                if (lane == 0 && t < nt) h[(i64)pr[t] * inter + o] = swiglu_f(g, u, limit) * wts[pr[t]];
            }
        }
    }
}

// ye[p, o] = W2_e[o] · hq[p] for the pairs of expert e = active[blockIdx.y]. W2: [E, dim, inter].
template <int RT>
__device__ __forceinline__ void moe_down_impl(const float* hq, const u8* w2, const u8* s2, const int* cnt,
                                              const int* list, const int* active, int experts, i64 rows, i64 dim,
                                              i64 inter, int fmt, float* ye, const i64* err) {
    __shared__ float lut[LUT_SIZE];
    if (err[0] != 0 || (int)blockIdx.y >= cnt[experts]) return;
    if (fmt >= WF_FP8) fill_luts(lut);
    __syncthreads();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpb = blockDim.x >> 5;
    i64 e = active[blockIdx.y];
    int n = cnt[e];
    const u8* w2e = w2 + e * mat_bytes(fmt, dim, inter);
    const u8* s2e = s2 ? s2 + e * scale_bytes(fmt, dim, inter) : s2;
    for (i64 o = (i64)blockIdx.x * wpb + warp; o < dim; o += (i64)gridDim.x * wpb) {
        for (i64 t0 = (i64)blockIdx.z * RT; t0 < n; t0 += (i64)gridDim.z * RT) {
            int nt = n - t0 < RT ? (int)(n - t0) : RT;
            const float* xs[RT];
            int pr[RT];
            float acc[RT];
#pragma unroll
            for (int t = 0; t < RT; ++t) {
                pr[t] = list[e * rows + t0 + (t < nt ? t : 0)];
                xs[t] = hq + (i64)pr[t] * inter;
                acc[t] = 0.0f;
            }
            wdot_any<RT>(fmt, 1, w2e, s2e, o, inter, xs, nt, acc, lut);
#pragma unroll
            for (int t = 0; t < RT; ++t) {
                float v = warp_sum_f(acc[t]);
                if (lane == 0 && t < nt) ye[(i64)pr[t] * dim + o] = v;
            }
        }
    }
}

#define MOE_UP_ARGS                                                                                              \
    const float *xq, const u8 *w1, const u8 *s1, const u8 *w3, const u8 *s3, const float *wts, const int *cnt, \
        const int *list, const int *active, int experts, i64 rows, int k, i64 dim, i64 inter, int fmt,          \
        float limit, float *h, const i64 *err
#define MOE_DOWN_ARGS                                                                                          \
    const float *hq, const u8 *w2, const u8 *s2, const int *cnt, const int *list, const int *active,          \
        int experts, i64 rows, i64 dim, i64 inter, int fmt, float *ye, const i64 *err

// `_r1`: experts with about one pair each (decode): for each pair of the block's expert, the pair's
// input row is staged in shared memory (stage_x; dynamic shared memory of dim, resp. inter floats),
// then each warp takes LIN_OT output features per step (wdot_multi_any). Else LIN_RT pairs per pass.
extern "C" __global__ void __launch_bounds__(256, 2) moe_up_r1(MOE_UP_ARGS) {
    grid_dep_begin();
    extern __shared__ float4 sx[];
    __shared__ float lut[LUT_SIZE];
    if (err[0] != 0 || (int)blockIdx.y >= cnt[experts]) return;
    if (chunk_dot_needs_lut(fmt)) fill_luts(lut);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpb = blockDim.x >> 5;
    i64 e = active[blockIdx.y];
    int n = cnt[e];
    const u8* w1e = w1 + e * mat_bytes(fmt, inter, dim);
    const u8* w3e = w3 + e * mat_bytes(fmt, inter, dim);
    const u8* s1e = s1 ? s1 + e * scale_bytes(fmt, inter, dim) : s1;
    const u8* s3e = s3 ? s3 + e * scale_bytes(fmt, inter, dim) : s3;
    for (i64 t = blockIdx.z; t < n; t += gridDim.z) {
        int p = list[e * rows + t];
        stage_x(xq + (i64)(p / k) * dim, dim, fmt, sx);
        __syncthreads();
        for (i64 o0 = ((i64)blockIdx.x * wpb + warp) * LIN_OT; o0 < inter; o0 += (i64)gridDim.x * wpb * LIN_OT) {
            int no = inter - o0 < LIN_OT ? (int)(inter - o0) : LIN_OT;
            float ag[LIN_OT], au[LIN_OT];
#pragma unroll
            for (int j = 0; j < LIN_OT; ++j) {
                ag[j] = 0.0f;
                au[j] = 0.0f;
            }
            wdot_multi_any<LIN_OT>(fmt, w1e, s1e, o0, no, dim, sx, ag, lut);
            wdot_multi_any<LIN_OT>(fmt, w3e, s3e, o0, no, dim, sx, au, lut);
#pragma unroll
            for (int j = 0; j < LIN_OT; ++j) {
                float g = warp_sum_f(ag[j]);
                float u = warp_sum_f(au[j]);
                if (lane == 0 && j < no) h[(i64)p * inter + o0 + j] = swiglu_f(g, u, limit) * wts[p];
            }
        }
        __syncthreads();  // every warp is done with sx before the next pair's row replaces it
    }
}
extern "C" __global__ void __launch_bounds__(256, 2) moe_up(MOE_UP_ARGS) {
    grid_dep_begin();
    moe_up_impl<LIN_RT>(xq, w1, s1, w3, s3, wts, cnt, list, active, experts, rows, k, dim, inter, fmt, limit, h,
                        err);
}
extern "C" __global__ void __launch_bounds__(256, 2) moe_down_r1(MOE_DOWN_ARGS) {
    grid_dep_begin();
    extern __shared__ float4 sx[];
    __shared__ float lut[LUT_SIZE];
    if (err[0] != 0 || (int)blockIdx.y >= cnt[experts]) return;
    if (chunk_dot_needs_lut(fmt)) fill_luts(lut);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpb = blockDim.x >> 5;
    i64 e = active[blockIdx.y];
    int n = cnt[e];
    const u8* w2e = w2 + e * mat_bytes(fmt, dim, inter);
    const u8* s2e = s2 ? s2 + e * scale_bytes(fmt, dim, inter) : s2;
    for (i64 t = blockIdx.z; t < n; t += gridDim.z) {
        int p = list[e * rows + t];
        stage_x(hq + (i64)p * inter, inter, fmt, sx);
        __syncthreads();
        for (i64 o0 = ((i64)blockIdx.x * wpb + warp) * LIN_OT; o0 < dim; o0 += (i64)gridDim.x * wpb * LIN_OT) {
            int no = dim - o0 < LIN_OT ? (int)(dim - o0) : LIN_OT;
            float acc[LIN_OT];
#pragma unroll
            for (int j = 0; j < LIN_OT; ++j) acc[j] = 0.0f;
            wdot_multi_any<LIN_OT>(fmt, w2e, s2e, o0, no, inter, sx, acc, lut);
#pragma unroll
            for (int j = 0; j < LIN_OT; ++j) {
                float v = warp_sum_f(acc[j]);
                if (lane == 0 && j < no) ye[(i64)p * dim + o0 + j] = v;
            }
        }
        __syncthreads();  // every warp is done with sx before the next pair's row replaces it
    }
}
extern "C" __global__ void __launch_bounds__(256, 2) moe_down(MOE_DOWN_ARGS) {
    grid_dep_begin();
    moe_down_impl<LIN_RT>(hq, w2, s2, cnt, list, active, experts, rows, dim, inter, fmt, ye, err);
}

// ---- FP4 experts on tensor cores, about one pair each (decode; sm_89+) -------------------------
// The one-pair kernels again, with the dot products on f16 mma.sync m16n8k16 tiles (f32
// accumulators): a warp takes MMA_ROWS weight rows, the pair's input row comes act_quant'ed as
// e4m3 codes with f32 scales per 128 columns (quant_rows_e4m3) and is staged in shared memory as
// f16 (exact), and the e2m1 weights become f16 in registers, 3 integer instructions a pair of
// values (e2m1_pair_f16; the e4m3 mma of sm_89 is two f16 HMMA on sm_90 after ptxas unpacks both
// operands, which cost more). Products of the two are exact in f32; the sums differ from the
// CUDA-core kernels' in order only.
//
// A weight scale spans 32 columns of a row, so an mma's sum may only be scaled per row if each of
// its D columns holds one 32-column block. Lane (g, t) loads 16 bytes of rows g and g + 8: the
// whole block t of a 128-column step. Word j of those (columns 8j .. 8j + 8 of the block) feeds
// two mma, whose k slots of lane t are thus block t's; B column n holds x there for the block
// n % 4 and zero elsewhere (lanes with g % 4 = t supply x, the others zeros). So column n of D
// is block n % 4's sum of rows g and g + 8, columns 4–7 repeating 0–3: lanes t = 0, 1 scale row
// g's sums of blocks 2t, 2t + 1 (D columns 2t, 2t + 1) and lanes t = 2, 3 row g + 8's of blocks
// 2t − 4, 2t − 3, each with one scale word, and the step's x scale.
//
// scripts/fp4-expert-bench.cu measures these and the CUDA-core kernels against pure reads of the
// same bytes (docs/performance.md has the figures and the forms that were slower). A block's 4
// warps are 4 / ksplit row groups of ksplit warps splitting the 128-column steps; partial sums are
// added in warp order. Needs dim % 128 == 0 and inter % 128 == 0.
#define FP4_WARPS 4  // warps of a block (cuda/src/ops/moe.rs FP4_R1_WARPS)
#if __CUDA_ARCH__ >= 890
// Nibbles I and I + 4 of w as an f16 pair (low half: nibble I) of e2m1 · 2^-14, given w3 = w << 3.
// A magnitude's 3 bits go to f16 bits 9–11 (two exponent bits and the top mantissa bit: every
// code, the subnormal 0.5 included, scales by 2^-14) and its sign to bit 15; w3 holds each sign 6
// bits above its magnitude's low bit, as f16 does.
template <int I> __device__ __forceinline__ u32 e2m1_pair_f16(u32 w, u32 w3) {
    if (I == 3) return ((w >> 3) & 0x0E000E00u) | (w & 0x80008000u);
    u32 c = (w & (0x00070007u << (4 * I))) | (w3 & (0x00400040u << (4 * I)));
    return c << (9 - 4 * I);
}

// e8m0_to_f32 of the byte in e's f32 exponent field (e = b << 23), without branches: exact for
// b = 0 (2^-127) and NaN for b = 255 (inf − inf).
__device__ __forceinline__ float e8m0_field(u32 e) {
    float f = fmaxf(__uint_as_float(e), 0x1p-127f);
    return (f - f) + f;
}

// A weight load that asks the L2 for the 256 bytes around it (the next steps of the same row: a
// warp's step reads only 64 bytes of each of its rows) and leaves the L1 alone: 28 µs instead of
// 38 for V4-Flash's up projections, measured with scripts/fp4-expert-bench.cu.
__device__ __forceinline__ uint4 ld_weights_ahead(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

// The staged input row (dynamic shared memory, fp4_f16_smem bytes): x as f16 pairs in the order
// the B fragments take them, then 16 zero words (the lanes that supply no x read those), then
// the scales per 128 columns times 2^14 (undoing the weights' f16 scaling; exact).
// Word 16·b + 4j + 2h + r of block b (columns c0 = 32b ..) pairs x[c] and x[c + 4] with
// c = c0 + 8j + 2h + r: the values that e2m1_pair_f16<2h + r> of word j pairs.
struct Fp4Staged {
    u32* x;
    float* scale;
};
__device__ __forceinline__ Fp4Staged fp4_stage(const u8* xq, const float* xs, i64 k, u32* smem) {
    Fp4Staged st{smem, (float*)(smem + k / 2 + 16)};
    // One thread per 8 codes (b, j): its four words are consecutive.
    for (i64 i = threadIdx.x; i < k / 8; i += blockDim.x) {
        uint2 c = ((const uint2*)xq)[i];
        u32 out[4];  // word hr pairs codes hr and hr + 4
        e4m3x4_to_f16x2(__byte_perm(c.x, c.y, 0x5140), &out[0], &out[1]);
        e4m3x4_to_f16x2(__byte_perm(c.x, c.y, 0x7362), &out[2], &out[3]);
        ((uint4*)st.x)[i] = make_uint4(out[0], out[1], out[2], out[3]);
    }
    if (threadIdx.x < 16) st.x[k / 2 + threadIdx.x] = 0;
    for (i64 i = threadIdx.x; i < k / 128; i += blockDim.x) st.scale[i] = xs[i] * 16384.0f;
    return st;
}

// The sum over 128-column steps [q0, q1) of row g (lanes t < 2) or g + 8 (t ≥ 2) of one matrix
// (row starts wa, wb of rows g and g + 8; sc the scale row of this lane's row) with the staged x,
// complete in lanes t = 0 (row g) and t = 2 (row g + 8). The next step's loads are issued before
// this step's mma.
__device__ __forceinline__ float fp4_f16_rows(const u8* wa, const u8* wb, const u8* sc, const Fp4Staged& x, i64 k,
                                              i64 q0, i64 q1) {
    int lane = threadIdx.x & 31, t = lane & 3, g = lane >> 2;
    bool x_lane = (g & 3) == t;
    const uint4* xb = (const uint4*)(x_lane ? x.x + (4 * q0 + t) * 16 : x.x + k / 2);
    int xstep = x_lane ? 16 : 0;  // uint4 a step
    int sh = 16 * (t & 1);
    bool row_g = t < 2;
    const uint4* pa = (const uint4*)(wa + 16 * t) + 4 * q0;
    const uint4* pb = (const uint4*)(wb + 16 * t) + 4 * q0;
    const u32* ps = (const u32*)sc + q0;
    uint4 ca, cb, na, nb;
    u32 cs, ns;
    auto load = [&](uint4& a, uint4& b, u32& s) {
        a = ld_weights_ahead(pa);
        b = ld_weights_ahead(pb);
        s = __ldg(ps);
        pa += 4;
        pb += 4;
        ps += 1;
    };
    float acc = 0.0f;
    if (q0 < q1) load(ca, cb, cs);
    for (i64 q = q0; q < q1; ++q) {
        if (q + 1 < q1) load(na, nb, ns);
        uint4 xv[4] = {xb[0], xb[1], xb[2], xb[3]};
        xb += xstep;
        u32 xw[16] = {xv[0].x, xv[0].y, xv[0].z, xv[0].w, xv[1].x, xv[1].y, xv[1].z, xv[1].w,
                      xv[2].x, xv[2].y, xv[2].z, xv[2].w, xv[3].x, xv[3].y, xv[3].z, xv[3].w};
        u32 wra[4] = {ca.x, ca.y, ca.z, ca.w}, wrb[4] = {cb.x, cb.y, cb.z, cb.w};
        float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            u32 a3 = wra[j] << 3, b3 = wrb[j] << 3;
            mma_f16_16x8x16(d, e2m1_pair_f16<0>(wra[j], a3), e2m1_pair_f16<0>(wrb[j], b3),
                            e2m1_pair_f16<1>(wra[j], a3), e2m1_pair_f16<1>(wrb[j], b3), xw[4 * j], xw[4 * j + 1]);
            mma_f16_16x8x16(d, e2m1_pair_f16<2>(wra[j], a3), e2m1_pair_f16<2>(wrb[j], b3),
                            e2m1_pair_f16<3>(wra[j], a3), e2m1_pair_f16<3>(wrb[j], b3), xw[4 * j + 2], xw[4 * j + 3]);
        }
        u32 sw = cs >> sh;
        float s0 = e8m0_field((sw << 23) & 0x7F800000u), s1 = e8m0_field((sw << 15) & 0x7F800000u);
        float da = row_g ? d[0] : d[2], db = row_g ? d[1] : d[3];
        acc = fmaf(fmaf(da, s0, db * s1), x.scale[q], acc);
        ca = na;
        cb = nb;
        cs = ns;
    }
    return acc + __shfl_xor_sync(FULL_MASK, acc, 1);
}

// The warp's part of a one-pair kernel: its row group (first row r0), rows g and g + 8 clamped to
// n − 1, and its run [q0, q1) of the kd / 128 steps (none past n).
struct Fp4Part {
    i64 r0, ra, rb, q0, q1;
};
__device__ __forceinline__ Fp4Part fp4_part(i64 n, i64 kd, int ksplit) {
    int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
    int groups = (blockDim.x >> 5) / ksplit;
    Fp4Part pt;
    pt.r0 = ((i64)blockIdx.x * groups + warp / ksplit) * MMA_ROWS;
    i64 qn = kd >> 7, per = (qn + ksplit - 1) / ksplit;
    pt.q0 = pt.r0 < n ? (warp % ksplit) * per : 0;
    pt.q1 = pt.r0 < n ? min(qn, pt.q0 + per) : 0;
    pt.ra = min(pt.r0 + g, n - 1);
    pt.rb = min(pt.r0 + g + 8, n - 1);
    return pt;
}

// Writes the warp's sums of NM matrices to part (lanes t = 0, 2), then, after a barrier, calls
// out(o, sums) for each of the block's rows o < n with the sums of its ksplit warps in warp order.
template <int NM, typename Out>
__device__ __forceinline__ void fp4_reduce(float (*part)[FP4_WARPS][MMA_ROWS], const float (&acc)[NM], i64 n, int ksplit,
                                           Out out) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    int groups = (blockDim.x >> 5) / ksplit;
    if ((t & 1) == 0)
#pragma unroll
        for (int m = 0; m < NM; ++m) part[m][warp][g + 4 * t] = acc[m];
    __syncthreads();
    if (threadIdx.x < groups * MMA_ROWS) {
        int q = threadIdx.x / MMA_ROWS, r = threadIdx.x % MMA_ROWS;
        i64 o = ((i64)blockIdx.x * groups + q) * MMA_ROWS + r;
        float v[NM];
#pragma unroll
        for (int m = 0; m < NM; ++m) {
            v[m] = part[m][q * ksplit][r];
            for (int j = 1; j < ksplit; ++j) v[m] += part[m][q * ksplit + j][r];
        }
        if (o < n) out(o, v);
    }
    __syncthreads();
}
#endif

// moe_up_r1 for FP4 weights (fmt) on tensor cores: xq holds the input rows' e4m3 codes, xs their
// scales. Dynamic shared memory: fp4_f16_smem(dim) bytes (cuda/src/ops/moe.rs). A warp sums its
// rows of W1, then of W3 (one matrix at a time: half the registers and code of both at once, and
// faster in scripts/fp4-expert-bench.cu).
extern "C" __global__ void __launch_bounds__(FP4_WARPS * 32, 4) moe_up_fp4_r1(MOE_UP_ARGS, const float* xs, int ksplit) {
    grid_dep_begin();
#if __CUDA_ARCH__ >= 890
    extern __shared__ u32 fp4_smem[];
    __shared__ float part[2][FP4_WARPS][MMA_ROWS];
    if (err[0] != 0 || (int)blockIdx.y >= cnt[experts]) return;
    i64 e = active[blockIdx.y];
    int n = cnt[e];
    Fp4Part pt = fp4_part(inter, dim, ksplit);
    i64 rs = (threadIdx.x & 3) < 2 ? pt.ra : pt.rb;  // the row this lane scales
    const u8* w1e = w1 + e * mat_bytes(WF_FP4, inter, dim);
    const u8* w3e = w3 + e * mat_bytes(WF_FP4, inter, dim);
    const u8* s1e = s1 + e * scale_bytes(WF_FP4, inter, dim) + rs * (dim / 32);
    const u8* s3e = s3 + e * scale_bytes(WF_FP4, inter, dim) + rs * (dim / 32);
    for (i64 t = blockIdx.z; t < n; t += gridDim.z) {
        int p = list[e * rows + t];
        i64 xr = p / k;
        Fp4Staged x = fp4_stage((const u8*)xq + xr * dim, xs + xr * (dim >> 7), dim, fp4_smem);
        __syncthreads();
        float acc[2];
        acc[0] = fp4_f16_rows(w1e + pt.ra * (dim / 2), w1e + pt.rb * (dim / 2), s1e, x, dim, pt.q0, pt.q1);
        acc[1] = fp4_f16_rows(w3e + pt.ra * (dim / 2), w3e + pt.rb * (dim / 2), s3e, x, dim, pt.q0, pt.q1);
        fp4_reduce<2>(part, acc, inter, ksplit,
                      [&](i64 o, const float* v) { h[(i64)p * inter + o] = swiglu_f(v[0], v[1], limit) * wts[p]; });
    }
#endif
}

// moe_down_r1 for FP4 weights (fmt) on tensor cores: hq holds the h rows' e4m3 codes, hs their
// scales. Dynamic shared memory: fp4_f16_smem(inter) bytes.
extern "C" __global__ void __launch_bounds__(FP4_WARPS * 32, 4) moe_down_fp4_r1(MOE_DOWN_ARGS, const float* hs,
                                                                                int ksplit) {
    grid_dep_begin();
#if __CUDA_ARCH__ >= 890
    extern __shared__ u32 fp4_smem[];
    __shared__ float part[1][FP4_WARPS][MMA_ROWS];
    if (err[0] != 0 || (int)blockIdx.y >= cnt[experts]) return;
    i64 e = active[blockIdx.y];
    int n = cnt[e];
    Fp4Part pt = fp4_part(dim, inter, ksplit);
    i64 rs = (threadIdx.x & 3) < 2 ? pt.ra : pt.rb;
    const u8* w2e = w2 + e * mat_bytes(WF_FP4, dim, inter);
    const u8* s2e = s2 + e * scale_bytes(WF_FP4, dim, inter) + rs * (inter / 32);
    for (i64 t = blockIdx.z; t < n; t += gridDim.z) {
        int p = list[e * rows + t];
        Fp4Staged x = fp4_stage((const u8*)hq + (i64)p * inter, hs + (i64)p * (inter >> 7), inter, fp4_smem);
        __syncthreads();
        float acc[1] = {fp4_f16_rows(w2e + pt.ra * (inter / 2), w2e + pt.rb * (inter / 2), s2e, x, inter, pt.q0, pt.q1)};
        fp4_reduce<1>(part, acc, dim, ksplit, [&](i64 o, const float* v) { ye[(i64)p * dim + o] = v[0]; });
    }
#endif
}

// y[r, o] = Σ over the row's experts in ascending order of ye[r·k + t, o] (f32, from 0).
#define COMBINE_GROUP 8
extern "C" __global__ void moe_combine(const float* ye, const int* order, i64 rows, int k, i64 dim, float* y,
                                       const i64* err) {
    grid_dep_begin();
    if (err[0] != 0) return;
    i64 total = rows * dim;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 r = i / dim, o = i % dim;
        float acc = 0.0f;
        // COMBINE_GROUP experts at a time: their order entries, then their rows, each set of
        // loads in flight together (a loop of dependent load pairs cost a decode step ~4 µs).
        for (int t0 = 0; t0 < k; t0 += COMBINE_GROUP) {
            int n = k - t0 < COMBINE_GROUP ? k - t0 : COMBINE_GROUP;
            int ord[COMBINE_GROUP];
            float v[COMBINE_GROUP];
#pragma unroll
            for (int t = 0; t < COMBINE_GROUP; ++t) ord[t] = t < n ? order[r * k + t0 + t] : 0;
#pragma unroll
            for (int t = 0; t < COMBINE_GROUP; ++t) v[t] = t < n ? ye[(r * k + ord[t]) * dim + o] : 0.0f;
#pragma unroll
            for (int t = 0; t < COMBINE_GROUP; ++t)
                if (t < n) acc += v[t];
        }
        y[i] = acc;
    }
}

// Tensor-core paths of moe_up / moe_down for experts with many pairs (common.cuh tc_tile): grid
// (column tiles, experts in use, pair tiles of TC_BM, grid-stride over the expert's pairs). Same
// results as moe_up / moe_down up to summation order.
// Their input (xq, hq) is bf16 when split is 1 (quant_rows_bf16), else f32.
// The tile's rows: pair p = list[e, t0 + i] (tag, −1 past the expert's pairs) and its input row
// base + (p / k)·stride elements of `split`'s size (k = 0: p·stride).
__device__ __forceinline__ void tc_pairs(TcSmem& sm, const int* list, i64 e, i64 rows, int n, i64 t0,
                                         const void* base, i64 stride, int k, int split) {
    if (threadIdx.x < TC_BM) {
        i64 t = t0 + threadIdx.x;
        int p = t < n ? list[e * rows + t] : -1;
        sm.tag[threadIdx.x] = p;
        i64 row = k > 0 ? p / k : p;
        sm.xrow[threadIdx.x] = p >= 0 ? (const u8*)base + row * stride * (split == 1 ? 2 : 4) : nullptr;
    }
    __syncthreads();
}

// moe_up_tc: a tile of TC_BN columns holds TC_BN / 2 features f of W1 and the same of W3, so that
// one thread's accumulators hold both halves of each of its SwiGLU inputs: column c is feature
// f0 + (c / 32)·16 + c % 16 of W1 when (c / 16) is even, else of W3 (tc_col: nt 0, 1 are W1's, nt
// 2, 3 the matching W3's). One set of accumulators instead of two keeps the kernel at two blocks
// per SM.
extern "C" __global__ void __launch_bounds__(256) moe_up_tc(MOE_UP_ARGS, int split) {
    grid_dep_begin();
    __shared__ TcSmem sm;
    extern __shared__ uint4 tc_stages[];
    if (err[0] != 0 || (int)blockIdx.y >= cnt[experts]) return;
    fill_luts(sm.lut);
    i64 e = active[blockIdx.y];
    int n = cnt[e];
    const u8* w1e = w1 + e * mat_bytes(fmt, inter, dim);
    const u8* w3e = w3 + e * mat_bytes(fmt, inter, dim);
    const u8* s1e = s1 ? s1 + e * scale_bytes(fmt, inter, dim) : s1;
    const u8* s3e = s3 ? s3 + e * scale_bytes(fmt, inter, dim) : s3;
    i64 f0 = (i64)blockIdx.x * (TC_BN / 2);
    auto row_of = [&](int c) {
        i64 f = f0 + (c >> 5) * 16 + (c & 15);
        bool third = (c >> 4) & 1;
        return TcWRow{third ? w3e : w1e, third ? s3e : s1e, f < inter ? f : -1};
    };
    for (i64 t0 = (i64)blockIdx.z * TC_BM; t0 < n; t0 += (i64)gridDim.z * TC_BM) {
        tc_pairs(sm, list, e, rows, n, t0, xq, dim, k, split);
        float acc[2][4][4];
        tc_tile_any(fmt, split, sm, (u16*)tc_stages, row_of, dim, acc);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    int m = tc_row(mt, q), c = tc_col(nt, q);
                    i64 f = f0 + (c >> 5) * 16 + (c & 15);
                    int p = sm.tag[m];
                    if (p >= 0 && f < inter)
                        h[(i64)p * inter + f] = swiglu_f(acc[mt][nt][q], acc[mt][nt + 2][q], limit) * wts[p];
                }
        __syncthreads();  // the epilogue reads tag before the next tile rewrites it
    }
}

extern "C" __global__ void __launch_bounds__(256) moe_down_tc(MOE_DOWN_ARGS, int split) {
    grid_dep_begin();
    __shared__ TcSmem sm;
    extern __shared__ uint4 tc_stages[];
    if (err[0] != 0 || (int)blockIdx.y >= cnt[experts]) return;
    fill_luts(sm.lut);
    i64 e = active[blockIdx.y];
    int n = cnt[e];
    const u8* w2e = w2 + e * mat_bytes(fmt, dim, inter);
    const u8* s2e = s2 ? s2 + e * scale_bytes(fmt, dim, inter) : s2;
    i64 o0 = (i64)blockIdx.x * TC_BN;
    auto row_of = [&](int c) { return TcWRow{w2e, s2e, o0 + c < dim ? o0 + c : -1}; };
    for (i64 t0 = (i64)blockIdx.z * TC_BM; t0 < n; t0 += (i64)gridDim.z * TC_BM) {
        tc_pairs(sm, list, e, rows, n, t0, hq, inter, 0, split);
        float acc[2][4][4];
        tc_tile_any(fmt, split, sm, (u16*)tc_stages, row_of, inter, acc);
        tc_epilogue(acc, [&](int m, int c, float v) {
            int p = sm.tag[m];
            if (p >= 0 && o0 + c < dim) ye[(i64)p * dim + o0 + c] = v;
        });
        __syncthreads();  // the epilogue reads tag before the next tile rewrites it
    }
}
