// QuantSim (quant_rows in the prelude) and the Hadamard rotation (hal::ops::quant).

// In place, one block per row: x ← fl32((H·x) / sqrt(n)) with f64 butterflies. `scratch` is null
// when the n doubles fit in dynamic shared memory, else a global [rows, n] f64 buffer.
extern "C" __global__ void hadamard_rows(float* x, int n, double* scratch) {
    grid_dep_begin();
    extern __shared__ double shd[];
    i64 r = blockIdx.x;
    double* v = scratch ? scratch + r * n : shd;
    float* xr = x + r * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) v[i] = (double)xr[i];
    hadamard_block(v, n);
    double scale = 1.0 / sqrt((double)n);
    for (int i = threadIdx.x; i < n; i += blockDim.x) xr[i] = (float)(v[i] * scale);
}
