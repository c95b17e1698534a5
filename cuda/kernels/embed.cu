// Embedding lookup, stream expansion, broadcast add, row gather (hal::ops::embed).

#define TABLE_F32 0
#define TABLE_BF16 1
#define TABLE_F16 2

// out[r, :] = f32(table[ids[r], :]). Bad ids were reported by check_range; they are skipped.
extern "C" __global__ void embed_rows(const int* ids, const void* table, int dtype, i64 vocab, i64 dim, i64 rows,
                                      float* out, const i64* err) {
    grid_dep_begin();
    if (err[0] != 0) return;
    i64 total = rows * dim;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 r = i / dim, c = i % dim;
        i64 id = ids[r];
        if (id < 0 || id >= vocab) continue;
        i64 off = id * dim + c;
        float v;
        if (dtype == TABLE_F32) v = ((const float*)table)[off];
        else if (dtype == TABLE_BF16) v = bf16_to_f32(((const u16*)table)[off]);
        else v = f16_to_f32(((const u16*)table)[off]);
        out[i] = v;
    }
}

// out[r, s, :] = x[r, :] for s < mult.
extern "C" __global__ void hc_expand(const float* x, float* out, i64 rows, i64 mult, i64 dim) {
    grid_dep_begin();
    i64 total = rows * mult * dim;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 c = i % dim, r = i / (mult * dim);
        out[i] = x[r * dim + c];
    }
}

// out[r, j] = a[r, j] + b[r / per, j].
extern "C" __global__ void add_bcast(const float* a, const float* b, float* out, i64 rows, i64 per, i64 width) {
    grid_dep_begin();
    i64 total = rows * width;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 r = i / width, j = i % width;
        out[i] = a[i] + b[(r / per) * width + j];
    }
}

// out[i, :] = x[idx[i], :]. Bad indices were reported by check_range; they are skipped.
extern "C" __global__ void gather_rows(const float* x, const int* idx, float* out, i64 rows, i64 width, i64 out_rows,
                                       const i64* err) {
    grid_dep_begin();
    if (err[0] != 0) return;
    i64 total = out_rows * width;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 o = i / width, c = i % width;
        i64 k = idx[o];
        if (k < 0 || k >= rows) continue;
        out[i] = x[k * width + c];
    }
}
