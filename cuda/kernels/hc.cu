// Manifold-constrained hyper-connections (hal::ops::hc), one block per row for HcPre/HcHead.

// Mixing logits μ_i = dot(fn[i], x̄) · ρ of one row into mu[0..nm) (shared), every thread waits.
__device__ void hc_mixes(const float* xr, i64 n, const float* fnw, int nm, float norm_eps, float* mu, double* red) {
    double ss = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
        double v = (double)xr[i];
        ss += v * v;
    }
    ss = block_sum_d(ss, red);
    float ms = (float)(ss / (double)n);
    float rho = (float)(1.0 / sqrt((double)(ms + norm_eps)));
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int i = w; i < nm; i += nw) {
        const float* fr = fnw + (i64)i * n;
        double acc = 0.0;
        for (i64 c = lane; c < n; c += 32) acc += (double)fr[c] * (double)xr[c];
        acc = warp_sum_d(acc);
        if (lane == 0) mu[i] = (float)acc * rho;
    }
    __syncthreads();
}

// u[c] = Σ_i p_i · X_i[c] (f64, stream order), p in shared memory.
__device__ void hc_merge(const float* xr, const float* p, int m, i64 d, float* ur) {
    for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
        double acc = 0.0;
        for (int i = 0; i < m; ++i) acc += (double)p[i] * (double)xr[(i64)i * d + c];
        ur[c] = (float)acc;
    }
}

// HcPre. Dynamic shared memory: (nm + m + m·m) floats.
extern "C" __global__ void __launch_bounds__(1024) hc_pre(const float* x, const float* fnw, const float* base, const float* scale, int m,
                                  i64 d, int iters, float hc_eps, float norm_eps, float* u, float* post, float* comb) {
    extern __shared__ float shf[];
    __shared__ double red[32];
    int nm = (2 + m) * m;
    float* mu = shf;
    float* pre = shf + nm;
    float* c = pre + m;
    i64 r = blockIdx.x, n = (i64)m * d;
    const float* xr = x + r * n;
    hc_mixes(xr, n, fnw, nm, norm_eps, mu, red);
    if (threadIdx.x == 0) {
        for (int i = 0; i < m; ++i) pre[i] = (float)sigmoid_d(scale[0] * mu[i] + base[i]) + hc_eps;
        for (int i = 0; i < m; ++i) post[r * m + i] = 2.0f * (float)sigmoid_d(scale[1] * mu[m + i] + base[m + i]);
        for (int i = 0; i < m * m; ++i) c[i] = scale[2] * mu[2 * m + i] + base[2 * m + i];
        // Row softmax + eps.
        for (int j = 0; j < m; ++j) {
            float* row = c + j * m;
            float mx = __uint_as_float(0xff800000u);
            for (int k = 0; k < m; ++k) mx = fmaxf(mx, row[k]);
            double sum = 0.0;
            for (int k = 0; k < m; ++k) sum += exp((double)(row[k] - mx));
            for (int k = 0; k < m; ++k) row[k] = (float)(exp((double)(row[k] - mx)) / sum) + hc_eps;
        }
        // Column normalization, then iters − 1 × (row, column).
        for (int it = 0; it < iters || it == 0; ++it) {
            if (it > 0) {
                for (int j = 0; j < m; ++j) {
                    double s = 0.0;
                    for (int k = 0; k < m; ++k) s += (double)c[j * m + k];
                    float sf = (float)s + hc_eps;
                    for (int k = 0; k < m; ++k) c[j * m + k] /= sf;
                }
            }
            for (int k = 0; k < m; ++k) {
                double s = 0.0;
                for (int j = 0; j < m; ++j) s += (double)c[j * m + k];
                float sf = (float)s + hc_eps;
                for (int j = 0; j < m; ++j) c[j * m + k] /= sf;
            }
        }
        for (int i = 0; i < m * m; ++i) comb[r * m * m + i] = c[i];
    }
    __syncthreads();
    hc_merge(xr, pre, m, d, u + r * d);
}

// HcHead. Dynamic shared memory: 2·m floats.
extern "C" __global__ void __launch_bounds__(1024) hc_head(const float* x, const float* fnw, const float* base, const float* scale, int m,
                                   i64 d, float hc_eps, float norm_eps, float* u) {
    extern __shared__ float shf[];
    __shared__ double red[32];
    float* mu = shf;
    float* p = shf + m;
    i64 r = blockIdx.x, n = (i64)m * d;
    const float* xr = x + r * n;
    hc_mixes(xr, n, fnw, m, norm_eps, mu, red);
    if (threadIdx.x == 0) {
        for (int i = 0; i < m; ++i) p[i] = (float)sigmoid_d(scale[0] * mu[i] + base[i]) + hc_eps;
    }
    __syncthreads();
    hc_merge(xr, p, m, d, u + r * d);
}

// HcPost: out[r, k, c] = post[r, k]·f[r, c] + Σ_j comb[r, j, k]·x[r, j, c] (f64, rounded once).
extern "C" __global__ void hc_post(const float* f, const float* x, const float* post, const float* comb, float* out,
                                   i64 rows, int m, i64 d) {
    i64 total = rows * m * d;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 c = i % d, k = (i / d) % m, r = i / ((i64)m * d);
        double acc = (double)post[r * m + k] * (double)f[r * d + c];
        for (int j = 0; j < m; ++j) acc += (double)comb[(r * m + j) * m + k] * (double)x[(r * m + j) * d + c];
        out[i] = (float)acc;
    }
}
