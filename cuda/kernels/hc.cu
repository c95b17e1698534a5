// Manifold-constrained hyper-connections (hal::ops::hc).

// HcPre / HcHead run as three kernels so that a few rows (decode) still fill the device:
// hc_mix_partial (grid: rows × column splits) sums x² and the nm mixing dots over its columns;
// hc_pre_finish / hc_head_finish (one block per row) add the splits (f64), form the mixing
// logits and the weights (Sinkhorn for HcPre); hc_merge (elementwise) forms u = Σ_i p_i · X_i.

// part[(r·splits + s)·(nm + 1) + 0] = Σ x², [.. + 1 + i] = Σ fn[i]·x over columns of split s (f64).
extern "C" __global__ void hc_mix_partial(const float* x, const float* fnw, i64 n, int nm, int splits, double* part) {
    grid_dep_begin();
    __shared__ double red[32];
    i64 r = blockIdx.x;
    int s = blockIdx.y;
    i64 per = (n + splits - 1) / splits, c0 = s * per, c1 = c0 + per < n ? c0 + per : n;
    const float* xr = x + r * n;
    double* out = part + (r * splits + s) * (nm + 1);
    double ss = 0.0;
    // Unrolled loops: the loads of several steps in flight (the sums' order is unchanged).
#pragma unroll 4
    for (i64 c = c0 + threadIdx.x; c < c1; c += blockDim.x) {
        double v = (double)xr[c];
        ss += v * v;
    }
    ss = block_sum_d(ss, red);
    if (threadIdx.x == 0) out[0] = ss;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int i = w; i < nm; i += nw) {
        const float* fr = fnw + (i64)i * n;
        double acc = 0.0;
#pragma unroll 4
        for (i64 c = c0 + lane; c < c1; c += 32) acc += (double)fr[c] * (double)xr[c];
        acc = warp_sum_d(acc);
        if (lane == 0) out[1 + i] = acc;
    }
}

// hc_mix_partial for many rows (nm < 32): grid (row tiles of DOT_TILE, column splits), the same
// part layout; lane nm of each row group sums x² (dot_tile_f64).
extern "C" __global__ void __launch_bounds__(256) hc_mix_tiled(const float* x, const float* fnw, i64 rows, i64 n, int nm,
                                                               int splits, double* part) {
    grid_dep_begin();
    i64 r0 = (i64)blockIdx.x * DOT_TILE;
    int s = blockIdx.y;
    i64 per = (n + splits - 1) / splits, c0 = s * per, c1 = c0 + per < n ? c0 + per : n;
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
// One warp per value (Σ x² first), lanes over the splits. `red` holds nm + 1 doubles.
__device__ void hc_mixes_from(const double* part, int splits, int nm, i64 n, float norm_eps, float* mu, double* red) {
    i64 r = blockIdx.x;
    const double* pr = part + r * splits * (nm + 1);
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int i = w; i <= nm; i += nw) {
        double acc = 0.0;
        // Unrolled: a lane's loads (a decode row has 128 splits) in flight together.
#pragma unroll 4
        for (int s = lane; s < splits; s += 32) acc += pr[s * (nm + 1) + i];
        acc = warp_sum_d(acc);
        if (lane == 0) red[i] = acc;
    }
    __syncthreads();
    float ms = (float)(red[0] / (double)n);
    float rho = (float)(1.0 / sqrt((double)(ms + norm_eps)));
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

// HcPre weights of row r: pre (to `pre`, for hc_merge), post, comb (softmax rows + eps, then
// Sinkhorn normalization). Element (j, k) of comb belongs to thread (j·m + k) mod blockDim; row
// and column sums are taken in index order by every thread that needs them, so the values are
// those of a sequential loop. Dynamic shared memory: (nm + 2·m·m) floats, then nm + 1 doubles.
extern "C" __global__ void hc_pre_finish(const double* part, int splits, const float* base, const float* scale, int m,
                                         i64 n, int iters, float hc_eps, float norm_eps, float* pre, float* post,
                                         float* comb) {
    grid_dep_begin();
    extern __shared__ float shf[];
    int nm = (2 + m) * m, mm = m * m;
    float* mu = shf;
    float* c = shf + nm;
    float* t = c + mm;
    double* red = (double*)(shf + ((nm + 2 * mm + 1) & ~1));
    i64 r = blockIdx.x;
    hc_mixes_from(part, splits, nm, n, norm_eps, mu, red);
    // Warp 0 goes straight on to the comb matrix (the critical path); the others write pre, post.
    int off = blockDim.x > 32 ? 32 : 0;
    for (int i = (int)threadIdx.x - off; i >= 0 && i < m; i += blockDim.x - off) {
        pre[r * m + i] = (float)sigmoid_d(scale[0] * mu[i] + base[i]) + hc_eps;
        post[r * m + i] = 2.0f * (float)sigmoid_d(scale[1] * mu[m + i] + base[m + i]);
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

// HcHead weights of row r into p. Dynamic shared memory: m floats (rounded up to even), then
// m + 1 doubles.
extern "C" __global__ void hc_head_finish(const double* part, int splits, const float* base, const float* scale,
                                          int m, i64 n, float hc_eps, float norm_eps, float* p) {
    grid_dep_begin();
    extern __shared__ float shf[];
    hc_mixes_from(part, splits, m, n, norm_eps, shf, (double*)(shf + ((m + 1) & ~1)));
    for (int i = threadIdx.x; i < m; i += blockDim.x)
        p[blockIdx.x * m + i] = (float)sigmoid_d(scale[0] * shf[i] + base[i]) + hc_eps;
}

// u[r, c] = Σ_i p[r, i] · X[r, i, c] (f64, stream order, rounded once).
extern "C" __global__ void hc_merge(const float* x, const float* p, i64 rows, int m, i64 d, float* u) {
    grid_dep_begin();
    i64 total = rows * d;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 r = i / d, c = i % d;
        double acc = 0.0;
        for (int j = 0; j < m; ++j) acc += (double)p[r * m + j] * (double)x[(r * m + j) * d + c];
        u[i] = (float)acc;
    }
}

// HcPost: out[r, k, c] = post[r, k]·f[r, c] + Σ_j comb[r, j, k]·x[r, j, c] (f64, rounded once).
extern "C" __global__ void hc_post(const float* f, const float* x, const float* post, const float* comb, float* out,
                                   i64 rows, int m, i64 d) {
    grid_dep_begin();
    i64 total = rows * m * d;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 c = i % d, k = (i / d) % m, r = i / ((i64)m * d);
        double acc = (double)post[r * m + k] * (double)f[r * d + c];
        for (int j = 0; j < m; ++j) acc += (double)comb[(r * m + j) * m + k] * (double)x[(r * m + j) * d + c];
        out[i] = (float)acc;
    }
}
