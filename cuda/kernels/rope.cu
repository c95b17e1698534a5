// Rotary position embedding, interleaved pairs on the last rope_dim dims (hal::ops::rope).

// In place over x [rows, heads, head_dim]. Negative positions were reported by check_range.
extern "C" __global__ void rope(const float* freqs, const int* pos, float* x, i64 rows, i64 heads, i64 hd, i64 rd,
                                int inverse, const i64* err) {
    grid_dep_begin();
    if (err[0] != 0) return;
    i64 half = rd / 2;
    i64 total = rows * heads * half;
    i64 nope = hd - rd;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
        i64 i = t % half, rh = t / half, r = rh / heads;
        int p = pos[r];
        if (p < 0) continue;
        float c, s;
        rope_cs((float)p, freqs[i], &c, &s);
        float* pair = x + rh * hd + nope + 2 * i;
        rope_rotate(pair, pair + 1, c, s, inverse != 0);
    }
}
