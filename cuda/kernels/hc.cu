// Manifold-constrained hyper-connections (hal::ops::hc).

// HcPre / HcHead run as two kernels so that a few rows (decode) still fill the device:
// hc_mix_partial (grid: rows × column splits) sums x² and the nm mixing dots over its columns
// (hc_post_mix_partial first forms those columns from the last sub-layer's HcPost inputs);
// hc_pre_finish / hc_head_finish (one block per row) add the splits (f64), form the mixing
// logits and the weights (Sinkhorn for HcPre), merge the row u = Σ_i p_i · X_i and norm it.

// Terms a lane of warp_batched_sums loads before adding any: MIX_VALS sums (a warp's share of
// V4's 24 mixes or 25 split sums, with 8 warps) × MIX_STEPS of its steps (a decode split has 128
// columns, a decode row 128 splits: 4 steps of 32).
#define MIX_VALS 4
#define MIX_STEPS 4

// For each value i = w, w + nw, ... below `count` of warp w (of nw): Σ term(i, k) over k = k0 + l,
// k0 + l + 32, ... below k1 in lane l, in order of k, then over the warp (warp_sum_d); lane 0 calls
// out(i, sum). A lane issues the loads of MIX_VALS values × MIX_STEPS steps together, so a decode
// row costs one round trip to the L2 rather than one per value.
template <typename Term, typename Out>
__device__ __forceinline__ void warp_batched_sums(int count, i64 k0, i64 k1, Term term, Out out) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int i0 = w; i0 < count; i0 += MIX_VALS * nw) {
        double acc[MIX_VALS];
#pragma unroll
        for (int v = 0; v < MIX_VALS; ++v) acc[v] = 0.0;
        for (i64 kb = k0 + lane; kb < k1; kb += 32 * MIX_STEPS) {
            double t[MIX_VALS][MIX_STEPS];
#pragma unroll
            for (int v = 0; v < MIX_VALS; ++v)
#pragma unroll
                for (int u = 0; u < MIX_STEPS; ++u) {
                    int i = i0 + v * nw;
                    i64 k = kb + 32 * u;
                    t[v][u] = i < count && k < k1 ? term(i, k) : 0.0;
                }
#pragma unroll
            for (int v = 0; v < MIX_VALS; ++v)
#pragma unroll
                for (int u = 0; u < MIX_STEPS; ++u) acc[v] += t[v][u];
        }
#pragma unroll
        for (int v = 0; v < MIX_VALS; ++v) {
            double sum = warp_sum_d(acc[v]);
            int i = i0 + v * nw;
            if (lane == 0 && i < count) out(i, sum);
        }
    }
}

// part[(r·splits + s)·(nm + 1) + 0] = Σ x², [.. + 1 + i] = Σ fn[i]·x over the columns c0 .. c1 of
// split s of row r (f64; the dots by warp_batched_sums), with x[c] at xs[c − xoff].
__device__ __forceinline__ void mix_split_sums(const float* xs, i64 xoff, const float* fnw, i64 n, int nm, int splits,
                                               i64 c0, i64 c1, double* part, double* red) {
    i64 r = blockIdx.x;
    int s = blockIdx.y;
    double* out = part + (r * splits + s) * (nm + 1);
    // A product of two floats is exact in f64, so only the order of each sum fixes its value.
    warp_batched_sums(
        nm, c0, c1, [&](int i, i64 c) { return (double)fnw[(i64)i * n + c] * (double)xs[c - xoff]; },
        [&](int i, double sum) { out[1 + i] = sum; });
    double ss = 0.0;
#pragma unroll 4
    for (i64 c = c0 + threadIdx.x; c < c1; c += blockDim.x) {
        double v = (double)xs[c - xoff];
        ss += v * v;
    }
    ss = block_sum_d(ss, red);
    if (threadIdx.x == 0) out[0] = ss;
}

// The column split c0 .. c1 of block (r, s) over a row of n columns.
__device__ __forceinline__ void split_columns(i64 n, int splits, i64* c0, i64* c1) {
    i64 per = (n + splits - 1) / splits;
    *c0 = blockIdx.y * per;
    *c1 = *c0 + per < n ? *c0 + per : n;
}

// HcPost of one element: post[r, k]·f[r, c] + Σ_j comb[r, j, k]·x[r, j, c] (f64, rounded once).
__device__ __forceinline__ float hc_post_at(const float* f, const float* x, const float* post, const float* comb, i64 r,
                                            int m, i64 d, int k, i64 c) {
    double acc = (double)post[r * m + k] * (double)f[r * d + c];
    for (int j = 0; j < m; ++j) acc += (double)comb[(r * m + j) * m + k] * (double)x[(r * m + j) * d + c];
    return (float)acc;
}

// The mixing sums of row r over split s (mix_split_sums), one block each.
extern "C" __global__ void hc_mix_partial(const float* x, const float* fnw, i64 n, int nm, int splits, double* part) {
    grid_dep_begin();
    __shared__ double red[32];
    i64 c0, c1;
    split_columns(n, splits, &c0, &c1);
    mix_split_sums(x + blockIdx.x * n, 0, fnw, n, nm, splits, c0, c1, part, red);
}

// hc_mix_partial after the last sub-layer's HcPost (HcPre / HcHead `after_post`): the block
// first forms its columns of X = HcPost(f, x_prev, post, comb), writes them to xout (the next
// residual) and keeps them in shared memory (dynamic, the split's c1 − c0 floats), then sums
// over those. Meanwhile the mixing weights of its columns are on their way to L1, so the sums
// do not wait on them after the barrier.
extern "C" __global__ void hc_post_mix_partial(const float* f, const float* x_prev, const float* post,
                                               const float* comb, float* xout, const float* fnw, i64 n, int m,
                                               int nm, int splits, double* part) {
    grid_dep_begin();
    extern __shared__ float sx[];
    __shared__ double red[32];
    i64 r = blockIdx.x, d = n / m, c0, c1;
    split_columns(n, splits, &c0, &c1);
    for (i64 c = c0 + threadIdx.x; c < c1; c += blockDim.x) {
        for (int i = 0; i < nm; ++i) asm volatile("prefetch.global.L1 [%0];" ::"l"(fnw + (i64)i * n + c));
        float v = hc_post_at(f, x_prev, post, comb, r, m, d, (int)(c / d), c % d);
        xout[r * n + c] = v;
        sx[c - c0] = v;
    }
    __syncthreads();
    mix_split_sums(sx, c0, fnw, n, nm, splits, c0, c1, part, red);
}

// hc_mix_partial for many rows (nm < 32): grid (row tiles of DOT_TILE, column splits), the same
// part layout; lane nm of each row group sums x² (dot_tile_f64).
extern "C" __global__ void __launch_bounds__(256) hc_mix_tiled(const float* x, const float* fnw, i64 rows, i64 n, int nm,
                                                               int splits, double* part) {
    grid_dep_begin();
    i64 r0 = (i64)blockIdx.x * DOT_TILE;
    int s = blockIdx.y;
    i64 c0, c1;
    split_columns(n, splits, &c0, &c1);
    int xr = (int)(rows - r0 < DOT_TILE ? rows - r0 : DOT_TILE);
    double acc[4];
    dot_tile_f64(x + r0 * n, xr, fnw, nm, n, nm, c0, c1, acc);
    int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    if (tx > nm) return;
#pragma unroll
    for (int j = 0; j < 4; ++j)
        if (ty * 4 + j < xr) part[((r0 + ty * 4 + j) * splits + s) * (nm + 1) + (tx == nm ? 0 : 1 + tx)] = acc[j];
}

// Mixing logits μ_i = (Σ_s dot_i) · ρ of row r into mu[0..nm) (shared); every thread waits.
// The split sums (Σ x² first) by warp_batched_sums. `red` holds nm + 1 doubles.
__device__ void hc_mixes_from(const double* part, int splits, int nm, i64 n, float norm_eps, float* mu, double* red) {
    i64 r = blockIdx.x;
    const double* pr = part + r * splits * (nm + 1);
    warp_batched_sums(
        nm + 1, 0, splits, [&](int i, i64 s) { return pr[s * (nm + 1) + i]; }, [&](int i, double sum) { red[i] = sum; });
    __syncthreads();
    float rho = rms_from_sum(red[0], n, norm_eps);
    for (int i = threadIdx.x; i < nm; i += blockDim.x) mu[i] = (float)red[1 + i] * rho;
    __syncthreads();
}

// The comb matrix (m×m, m·m ≤ 32) of one row from its mixing logits `mu`, by one warp: element e
// in lane e, row softmax + eps, then Sinkhorn normalization (a column pass, then iters − 1 ×
// (row, column)). Row and column sums are gathered by shuffles in index order and added in f64,
// the values of a sequential loop. M = m known at compile time (4, V4's hc_mult) unrolls the
// sums, so a pass's shuffles issue together instead of one dependent round each: the passes are
// the kernel's critical path (40 of them at 20 iterations).
template <int M>
__device__ __forceinline__ void hc_comb_warp(const float* mu, const float* scale, const float* base, int m_rt,
                                             int iters, float hc_eps, float* comb) {
    const int m = M > 0 ? M : m_rt;
    int e = threadIdx.x & 31, mm = m * m;
    bool own = e < mm;
    int j = own ? e / m : 0, k = own ? e % m : 0;
    float v = own ? scale[2] * mu[2 * m + e] + base[2 * m + e] : 0.0f;
    float mx = __uint_as_float(0xff800000u);
#pragma unroll
    for (int q = 0; q < m; ++q) mx = fmaxf(mx, __shfl_sync(FULL_MASK, v, j * m + q));
    double sum = 0.0;
#pragma unroll
    for (int q = 0; q < m; ++q) sum += exp((double)(__shfl_sync(FULL_MASK, v, j * m + q) - mx));
    v = (float)(exp((double)(v - mx)) / sum) + hc_eps;
    for (int it = 0; it < iters || it == 0; ++it) {
        for (int pass = it > 0 ? 0 : 1; pass < 2; ++pass) {
            int first = pass == 0 ? j * m : k, step = pass == 0 ? 1 : m;
            double sd = 0.0;
#pragma unroll
            for (int q = 0; q < m; ++q) sd += (double)__shfl_sync(FULL_MASK, v, first + q * step);
            v = v / ((float)sd + hc_eps);
        }
    }
    if (own) comb[e] = v;
}

// Σ v over the threads first .. blockDim − 1 of the block (first and blockDim multiples of 32), in
// warp order; every one of them gets it. Named barrier 1, so warps below `first` may be elsewhere.
__device__ double tail_sum_d(double v, double* sh, int first) {
    int lane = threadIdx.x & 31, w = ((int)threadIdx.x - first) >> 5, nw = ((int)blockDim.x - first) >> 5;
    v = warp_sum_d(v);
    if (lane == 0) sh[w] = v;
    asm volatile("bar.sync 1, %0;" ::"r"((int)blockDim.x - first) : "memory");
    double s = 0.0;
    for (int i = 0; i < nw; ++i) s += sh[i];
    return s;
}

// Steps 5 and 6 of HcPre (and HcHead) for the block's row r, by the threads first .. blockDim − 1:
// u[c] = Σ_i p[i] · X[r, i, c] (f64, stream order, rounded once), then y[r, c] = w[c] · (u[c] · ρ_u)
// with ρ_u from Σ u² (RmsNorm's order of rounding). Each thread keeps its u values in `stash`
// (d floats of shared memory, or null: y's row) and reads back only its own, so the one barrier
// is the sum's. The weights are prefetched into L1 before it, so the second pass waits on no
// L2 round trip. `sh` holds a double per warp. Four columns per thread step where the rows
// allow 16-byte accesses.
__device__ __forceinline__ void hc_merge_norm_row(const float* x, const float* p, int m, i64 d, const float* w,
                                                  float eps, float* y, float* stash, int first, double* sh) {
    i64 r = blockIdx.x;
    const float* xr = x + r * m * d;
    float* yr = y + r * d;
    float* st = stash ? stash : yr;
    int tid = (int)threadIdx.x - first, nt = (int)blockDim.x - first;
    bool vec = d % 4 == 0 && (((unsigned long long)x | (unsigned long long)y | (unsigned long long)w |
                               (unsigned long long)st) & 15) == 0;
    i64 step = vec ? 4 : 1;
    double ss = 0.0;
#pragma unroll 2
    for (i64 c = tid * step; c < d; c += nt * step) {
        asm volatile("prefetch.global.L1 [%0];" ::"l"(w + c));
        double acc[4] = {0.0, 0.0, 0.0, 0.0};
        for (int j = 0; j < m; ++j) {
            double pj = (double)p[j];
            if (vec) {
                float4 v = *(const float4*)(xr + j * d + c);
                acc[0] += pj * (double)v.x;
                acc[1] += pj * (double)v.y;
                acc[2] += pj * (double)v.z;
                acc[3] += pj * (double)v.w;
            } else {
                acc[0] += pj * (double)xr[j * d + c];
            }
        }
        float u[4] = {(float)acc[0], (float)acc[1], (float)acc[2], (float)acc[3]};
        if (vec) {
#pragma unroll
            for (int e = 0; e < 4; ++e) ss += (double)u[e] * (double)u[e];
            *(float4*)(st + c) = make_float4(u[0], u[1], u[2], u[3]);
        } else {
            ss += (double)u[0] * (double)u[0];
            st[c] = u[0];
        }
    }
    float f = rms_from_sum(tail_sum_d(ss, sh, first), d, eps);
#pragma unroll 2
    for (i64 c = tid * step; c < d; c += nt * step) {
        if (vec) {
            float4 u = *(const float4*)(st + c), wv = *(const float4*)(w + c);
            *(float4*)(yr + c) = make_float4(wv.x * (u.x * f), wv.y * (u.y * f), wv.z * (u.z * f), wv.w * (u.w * f));
        } else {
            yr[c] = w[c] * (st[c] * f);
        }
    }
}

// HcPre weights of row r: post, comb (softmax rows + eps, then Sinkhorn normalization) and pre,
// with which the block merges the row and norms it into y (hc_merge_norm_row). Element (j, k) of
// comb belongs to thread (j·m + k) mod blockDim; row and column sums are taken in index order by
// every thread that needs them, so the values are those of a sequential loop. Needs blockDim.x ≥
// 64. Dynamic shared memory: (nm + 2·m·m + m) floats (padded to 8 bytes), nm + 1 doubles, then,
// with `stashed`, the row's n / m merged values (from a 16-byte boundary).
extern "C" __global__ void hc_pre_finish(const double* part, int splits, const float* base, const float* scale, int m,
                                         i64 n, int iters, float hc_eps, float norm_eps, const float* x,
                                         const float* norm_w, int stashed, float* y, float* post, float* comb) {
    grid_dep_begin();
    extern __shared__ float shf[];
    __shared__ double warp_sums[32];
    int nm = (2 + m) * m, mm = m * m;
    float* mu = shf;
    float* c = shf + nm;
    float* t = c + mm;
    float* pre = t + mm;
    int floats = (nm + 2 * mm + m + 1) & ~1;
    double* red = (double*)(shf + floats);
    float* stash = stashed ? shf + ((floats + 2 * (nm + 1) + 3) & ~3) : nullptr;
    i64 r = blockIdx.x;
    hc_mixes_from(part, splits, nm, n, norm_eps, mu, red);
    // Warp 0 goes straight on to the comb matrix (the critical path); the others form pre and
    // post, wait for each other (named barrier 1) and merge the row meanwhile.
    for (int i = (int)threadIdx.x - 32; i >= 0 && i < m; i += blockDim.x - 32) {
        pre[i] = (float)sigmoid_d(scale[0] * mu[i] + base[i]) + hc_eps;
        post[r * m + i] = 2.0f * (float)sigmoid_d(scale[1] * mu[m + i] + base[m + i]);
    }
    if (threadIdx.x >= 32) {
        asm volatile("bar.sync 1, %0;" ::"r"(blockDim.x - 32) : "memory");
        hc_merge_norm_row(x, pre, m, n / m, norm_w, norm_eps, y, stash, 32, warp_sums);
    }
    if (mm <= 32) {
        if (threadIdx.x < 32) {
            if (m == 4)
                hc_comb_warp<4>(mu, scale, base, m, iters, hc_eps, comb + r * mm);
            else
                hc_comb_warp<0>(mu, scale, base, m, iters, hc_eps, comb + r * mm);
        }
        return;
    }
    for (int e = threadIdx.x; e < mm; e += blockDim.x) c[e] = scale[2] * mu[2 * m + e] + base[2 * m + e];
    __syncthreads();
    // Row softmax + eps.
    for (int e = threadIdx.x; e < mm; e += blockDim.x) {
        const float* row = c + (e / m) * m;
        float mx = __uint_as_float(0xff800000u);
        for (int k = 0; k < m; ++k) mx = fmaxf(mx, row[k]);
        double sum = 0.0;
        for (int k = 0; k < m; ++k) sum += exp((double)(row[k] - mx));
        t[e] = (float)(exp((double)(c[e] - mx)) / sum) + hc_eps;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < mm; e += blockDim.x) c[e] = t[e];
    __syncthreads();
    // Column normalization, then iters − 1 × (row, column).
    for (int it = 0; it < iters || it == 0; ++it) {
        for (int pass = it > 0 ? 0 : 1; pass < 2; ++pass) {
            for (int e = threadIdx.x; e < mm; e += blockDim.x) {
                int j = e / m, k = e % m;
                double s = 0.0;
                if (pass == 0)
                    for (int q = 0; q < m; ++q) s += (double)c[j * m + q];
                else
                    for (int q = 0; q < m; ++q) s += (double)c[q * m + k];
                float sf = (float)s + hc_eps;
                t[e] = c[e] / sf;
            }
            __syncthreads();
            for (int e = threadIdx.x; e < mm; e += blockDim.x) c[e] = t[e];
            __syncthreads();
        }
    }
    for (int e = threadIdx.x; e < mm; e += blockDim.x) comb[r * mm + e] = c[e];
}

// HcHead weights p of row r, and the row merged with them and normed into y (hc_merge_norm_row).
// Dynamic shared memory: 2·m floats, m + 1 doubles, then, with `stashed`, the row's n / m merged
// values (from a 16-byte boundary).
extern "C" __global__ void hc_head_finish(const double* part, int splits, const float* base, const float* scale,
                                          int m, i64 n, float hc_eps, float norm_eps, const float* x,
                                          const float* norm_w, int stashed, float* y) {
    grid_dep_begin();
    extern __shared__ float shf[];
    __shared__ double warp_sums[32];
    float* p = shf + m;
    double* red = (double*)(shf + 2 * m);
    hc_mixes_from(part, splits, m, n, norm_eps, shf, red);
    for (int i = threadIdx.x; i < m; i += blockDim.x) p[i] = (float)sigmoid_d(scale[0] * shf[i] + base[i]) + hc_eps;
    __syncthreads();
    float* stash = stashed ? shf + ((2 * m + 2 * (m + 1) + 3) & ~3) : nullptr;
    hc_merge_norm_row(x, p, m, n / m, norm_w, norm_eps, y, stash, 0, warp_sums);
}

// HcPost: out[r, k, c] = post[r, k]·f[r, c] + Σ_j comb[r, j, k]·x[r, j, c] (hc_post_at).
extern "C" __global__ void hc_post(const float* f, const float* x, const float* post, const float* comb, float* out,
                                   i64 rows, int m, i64 d) {
    grid_dep_begin();
    i64 total = rows * m * d;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x)
        out[i] = hc_post_at(f, x, post, comb, i / ((i64)m * d), m, d, (int)((i / d) % m), i % d);
}
