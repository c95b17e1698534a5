// v4rt CUDA kernels — shared prelude, prepended to every kernel family before NVRTC compiles it.
//
// Compiled with --fmad=false (a·b + c is never contracted: the reference rounds each product),
// IEEE division and square root (NVRTC's defaults), and no fast math. Explicit fmaf() is used
// only where a sum is accumulated in a different order from the reference anyway.
//
// Scalar codecs here are bit-for-bit ports of hal/src/dtype.rs and cpu-ref/src/ops/quant.rs.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

#define ROW_NONE 0x7fffffffffffffffLL
#define FULL_MASK 0xffffffffu

// ---- deferred argument errors ------------------------------------------------------------
// err[0] = code (0: none), err[1] = op id, err[2] = row, err[3..5] = values for the message.
// The host (ops/mod.rs) turns them into the cpu-ref message. Only the first error is kept:
// a check kernel does nothing while err[0] != 0, and every kernel that could read or write out
// of bounds on bad values returns at once while err[0] != 0.
#define E_SLOT 1          // v0 = slot, v1 = number of slots
#define E_POS_NEG 2       // v0 = position
#define E_NOT_CONTIG 3    // v0 = slot, v1 = previous row of that slot
#define E_NOT_CONSEC 4    // v0 = slot, v1 = position, v2 = previous row's position
#define E_TOKEN 5         // v0 = token id, v1 = vocab
#define E_GATHER 6        // v0 = index, v1 = rows
#define E_SEES 7          // v0 = position, v1 = entries seen, v2 = capacity
#define E_EMIT_CAP 8      // v0 = position, v1 = entry, v2 = capacity
#define E_CINDEX 9        // v0 = index, v1 = capacity
#define E_EXPERT_RANGE 10 // v0 = expert, v1 = experts
#define E_EXPERT_DUP 11   // v0 = expert
#define E_TID2EID 12      // v0 = token id, v1 = expert, v2 = experts

// ---- programmatic dependent launch (sm_90+) --------------------------------------------------
// Where the device has it, the host launches every kernel with programmatic stream serialization
// (ops::launch), so a kernel's blocks may be scheduled while its predecessor in the stream still
// runs. Every kernel therefore starts with grid_dep_begin(), or grid_dep_trigger() with a
// grid_dep_wait() later (kernels.rs checks the sources): launch_dependents lets the next kernel
// be scheduled once all of this grid's blocks run, and wait blocks until the predecessor grid
// has completed with its writes visible. Completion is transitive (a grid cannot complete before
// its own wait returned), so after the wait a kernel sees every earlier kernel's writes.
// Before the wait a kernel may only compute addresses and load FP8/FP4 weight codes and their
// e8m0 scales: no op has an output of a one-byte dtype (tests/tests/conformance.rs checks every
// op), so only upload/write change them, and those are stream-ordered copies that a
// programmatic launch never overlaps. Loading them early puts
// the weight stream of a GEMV under its predecessors' tails. Any line may be asked of the L2
// before the wait (prefetch_l2): a prefetch returns nothing to the thread, and every store lands
// in the L2, so what it holds is never stale.
// Without the launch attribute, and below sm_90, these instructions are no-ops.
__device__ __forceinline__ void grid_dep_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_dep_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_dep_begin() {
    grid_dep_trigger();
    grid_dep_wait();
}

// Asks the L2 for the 128-byte line holding p, without waiting for it or holding a register.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Asks the L2 for the lines of [p, p + bytes), shared by the block's threads.
__device__ __forceinline__ void prefetch_block_l2(const void* p, i64 bytes) {
    for (i64 b = (i64)threadIdx.x * 128; b < bytes; b += (i64)blockDim.x * 128) prefetch_l2((const char*)p + b);
}

// ---- scalar codecs -------------------------------------------------------------------------

__device__ __forceinline__ float f32_nan() { return __uint_as_float(0x7fc00000u); }

// Exact 2^e (subnormals included; 0 below 2^-149, +inf above 2^127).
__device__ __forceinline__ float exp2i(int e) {
    if (e >= -126 && e <= 127) return __uint_as_float((u32)(e + 127) << 23);
    if (e > 127) return __uint_as_float(0x7f800000u);
    if (e >= -149) return __uint_as_float(1u << (e + 149));
    return 0.0f;
}

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

// Round to nearest even; NaN keeps its sign and top mantissa bits with the quiet bit set
// (hal::dtype::f32_to_bf16, i.e. half's bf16::from_f32). A carry out of the mantissa rounds into
// the exponent, so values past bf16's largest finite one become ±inf.
__device__ __forceinline__ u16 f32_to_bf16(float x) {
    u32 u = __float_as_uint(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (u16)((u >> 16) | 0x40u);
    return (u16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// x as its nearest bf16, widened back (what a bf16 KV cache holds for x).
__device__ __forceinline__ float bf16_round(float x) { return bf16_to_f32(f32_to_bf16(x)); }

// KV cache elements (hal::ops conventions): the cache type C is float (f32 cache) or u16 (bf16
// cache: a store keeps the nearest-even bf16, a load widens exactly). Kernels that touch a cache
// are templates on C with one entry point per type, NAME and NAME_bf16 (ops::cache_kernel picks).
__device__ __forceinline__ float cache_load(const float* p) { return *p; }
__device__ __forceinline__ float cache_load(const u16* p) { return bf16_to_f32(*p); }
__device__ __forceinline__ void cache_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void cache_store(u16* p, float v) { *p = f32_to_bf16(v); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
    u32 s = ((u32)h & 0x8000u) << 16;
    u32 e = ((u32)h >> 10) & 0x1Fu;
    u32 m = (u32)h & 0x3FFu;
    if (e == 0) {
        float v = (float)m * exp2i(-24);
        return s ? -v : v;
    }
    if (e == 31) return __uint_as_float(m == 0 ? (s | 0x7f800000u) : (s | 0x7fc00000u | (m << 13)));
    return __uint_as_float(s | ((e + 112u) << 23) | (m << 13));
}

__device__ __forceinline__ float e4m3_to_f32(u8 code) {
    int e = (code >> 3) & 0xF;
    int m = code & 7;
    if (e == 0xF && m == 7) return f32_nan();
    float mag = (e == 0) ? (float)m * (1.0f / 512.0f) : (1.0f + (float)m / 8.0f) * exp2i(e - 7);
    return (code & 0x80) ? -mag : mag;
}

// Round to nearest even, saturating at ±448, NaN → 0x7F (hal::dtype::f32_to_e4m3).
__device__ __forceinline__ u8 f32_to_e4m3(float x) {
    if (isnan(x)) return 0x7F;
    u32 bits = __float_as_uint(x);
    u8 sign = (u8)((bits >> 24) & 0x80);
    float a = __uint_as_float(bits & 0x7FFFFFFFu);
    if (a >= 448.0f) return sign | 0x7E;
    if (a < 1.0f / 64.0f) return sign | (u8)rintf(a * 512.0f);
    u32 ab = __float_as_uint(a);
    int ex = (int)(ab >> 23) - 127;
    u32 frac = ab & 0x7FFFFFu;
    u32 q = frac >> 20, rest = frac & 0xFFFFFu;
    if (rest > 0x80000u || (rest == 0x80000u && (q & 1u))) q += 1;
    if (q == 8) { q = 0; ex += 1; }
    u32 code = ((u32)(ex + 7) << 3) | q;
    if (code > 0x7E) code = 0x7E;
    return sign | (u8)code;
}

__device__ __forceinline__ float e8m0_to_f32(u8 b) { return b == 0xFF ? f32_nan() : exp2i((int)b - 127); }

__device__ __forceinline__ float e2m1_to_f32(u8 code) {
    int c = code & 7;
    float v = c < 2 ? 0.5f * (float)c : (1.0f + 0.5f * (float)(c & 1)) * exp2i((c >> 1) - 1);
    return (code & 8) ? -v : v;
}

// hal::dtype::f32_to_e2m1: midpoint thresholds, ties to the even code, saturating at ±6.
__device__ __forceinline__ u8 f32_to_e2m1(float x) {
    u8 sign = signbit(x) ? 8 : 0;
    float a = fabsf(x);
    int mag = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
    return sign | (u8)mag;
}

// Rust's f32::clamp: NaN passes through.
__device__ __forceinline__ float clamp_nan(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// ceil(log2 v) read off the bits of a positive f32 (subnormal v counts as 2^-126).
__device__ __forceinline__ int log2_ceil_bits(float v) {
    u32 b = __float_as_uint(v);
    int e = (int)((b >> 23) & 0xFFu);
    return e - 127 + ((b & 0x7FFFFFu) != 0 ? 1 : 0);
}

#define FMT_FP8 0
#define FMT_FP4 1
#define FP8_AMAX_FLOOR __uint_as_float(0x38d1b717u) /* 1e-4f */
#define FP4_AMAX_FLOOR __uint_as_float(0x01c00000u) /* 6 * 2^-126 */
#define INV_448 __uint_as_float(0x3b124925u)        /* fl32(1/448) */
#define INV_6 __uint_as_float(0x3e2aaaabu)          /* fl32(1/6) */

// The scale 2^k of a block with this amax (NaN-free max of |x|, not yet floored).
__device__ __forceinline__ float quant_scale(float amax, int fmt) {
    if (fmt == FMT_FP8) return exp2i(log2_ceil_bits(fmaxf(amax, FP8_AMAX_FLOOR) * INV_448));
    return exp2i(log2_ceil_bits(fmaxf(amax, FP4_AMAX_FLOOR) * INV_6));
}

// The e4m3 code of v in a block of scale s.
__device__ __forceinline__ u8 quant_code_e4m3(float v, float s) { return f32_to_e4m3(clamp_nan(v / s, -448.0f, 448.0f)); }

// f32_to_e4m3(clamp_nan(x, ±448)) of lo and hi, lo in the low byte: one instruction on sm_89+.
// With x = v · (1/s) for a power-of-two scale s (1/s exact, so the product rounds the same real
// number as v / s) it is quant_code_e4m3(v, s) of two values; scripts/check-e4m3-cvt.cu checks
// both claims on every f32 on a GPU.
__device__ __forceinline__ u32 e4m3x2_sat(float lo, float hi) {
#if __CUDA_ARCH__ >= 890
    u16 r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return (u32)f32_to_e4m3(clamp_nan(lo, -448.0f, 448.0f)) | ((u32)f32_to_e4m3(clamp_nan(hi, -448.0f, 448.0f)) << 8);
#endif
}

// One value through quantize-then-dequantize with scale s.
__device__ __forceinline__ float quant_value(float v, float s, int fmt) {
    if (fmt == FMT_FP8) return e4m3_to_f32(quant_code_e4m3(v, s)) * s;
    return e2m1_to_f32(f32_to_e2m1(clamp_nan(v / s, -6.0f, 6.0f))) * s;
}

// Orderable key of Rust's f32::total_cmp, as an unsigned integer (larger key = larger value;
// positive NaN above +inf, negative NaN below -inf).
__device__ __forceinline__ u32 total_key(float f) {
    int b = __float_as_int(f);
    b ^= (int)(((u32)(b >> 31)) >> 1);
    return (u32)b ^ 0x80000000u;
}

// (key descending, index ascending) as one u64 to maximize.
__device__ __forceinline__ u64 rank_code(float f, u32 idx) {
    return ((u64)total_key(f) << 32) | (u64)(0xFFFFFFFFu - idx);
}

__device__ __forceinline__ double sigmoid_d(float z) { return 1.0 / (1.0 + exp(-(double)z)); }

// ---- warp / block reductions -------------------------------------------------------------

__device__ __forceinline__ float warp_max_f(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum_f(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ i64 warp_min_i64(i64 v) {
    for (int o = 16; o > 0; o >>= 1) {
        i64 w = __shfl_xor_sync(FULL_MASK, v, o);
        v = w < v ? w : v;
    }
    return v;
}

// The RMSNorm factor fl32(1 / sqrt(fl32(ss / n) + eps)) from a row's f64 sum of squares `ss` over
// n elements: the mean rounded to f32, + eps in f32, the reciprocal square root rounded once
// (RmsNorm, ρ of the mHC mixes, the compressor's entry norm).
__device__ __forceinline__ float rms_from_sum(double ss, i64 n, float eps) {
    float ms = (float)(ss / (double)n);
    return (float)(1.0 / sqrt((double)(ms + eps)));
}

// Sum over the block (every thread gets the result). `sh` holds 32 doubles.
__device__ double block_sum_d(double v, double* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        double t = lane < nw ? sh[lane] : 0.0;
        t = warp_sum_d(t);
        if (lane == 0) sh[0] = t;
    }
    __syncthreads();
    return sh[0];
}

// Max over the block, NaN-ignoring like f32::max (every thread gets the result).
__device__ float block_max_f(float v, float* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max_f(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float t = lane < nw ? sh[lane] : __uint_as_float(0xff800000u);
        t = warp_max_f(t);
        if (lane == 0) sh[0] = t;
    }
    __syncthreads();
    return sh[0];
}

__device__ i64 block_min_i64(i64 v, i64* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_min_i64(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        i64 t = lane < nw ? sh[lane] : ROW_NONE;
        t = warp_min_i64(t);
        if (lane == 0) sh[0] = t;
    }
    __syncthreads();
    return sh[0];
}

__device__ __forceinline__ void report_error(i64* err, int code, int op, i64 row, i64 v0, i64 v1, i64 v2) {
    if (err[0] != 0) return;
    err[1] = op;
    err[2] = row;
    err[3] = v0;
    err[4] = v1;
    err[5] = v2;
    __threadfence();
    err[0] = code;
}

// ---- the row convention (cpu-ref ops::place_rows) ------------------------------------------

// Error code of row r under the slot/position convention (0 if fine); fills v[0..3].
__device__ int place_error(const int* slots, const int* pos, int r, int num_slots, i64* v) {
    int s = slots[r], p = pos[r];
    if (s < 0 || s >= num_slots) { v[0] = s; v[1] = num_slots; v[2] = 0; return E_SLOT; }
    if (p < 0) { v[0] = p; v[1] = 0; v[2] = 0; return E_POS_NEG; }
    if (r > 0 && slots[r - 1] == s) {
        if ((i64)pos[r - 1] + 1 != (i64)p) { v[0] = s; v[1] = p; v[2] = pos[r - 1]; return E_NOT_CONSEC; }
    } else {
        for (int q = r - 2; q >= 0; --q) {
            if (slots[q] == s) { v[0] = s; v[1] = q; v[2] = 0; return E_NOT_CONTIG; }
        }
    }
    return 0;
}

#define CHECK_NONE 0
#define CHECK_SEES 1     // (p + 1) / a > b
#define CHECK_EMIT 2     // (p + 1) % a == 0 and p / a >= b
#define CHECK_INDICES 3  // idx[r, 0..idx_cols] each −1 or in [0, b)

__device__ int extra_error(int mode, const int* pos, int r, i64 a, i64 b, const int* idx, int idx_cols, i64* v) {
    i64 p = pos[r];
    if (mode == CHECK_SEES) {
        i64 n = (p + 1) / a;
        if (n > b) { v[0] = p; v[1] = n; v[2] = b; return E_SEES; }
    } else if (mode == CHECK_EMIT) {
        if ((p + 1) % a == 0 && p / a >= b) { v[0] = p; v[1] = p / a; v[2] = b; return E_EMIT_CAP; }
    } else if (mode == CHECK_INDICES) {
        for (int t = 0; t < idx_cols; ++t) {
            int j = idx[(i64)r * idx_cols + t];
            if (j != -1 && (j < 0 || (i64)j >= b)) { v[0] = j; v[1] = b; v[2] = 0; return E_CINDEX; }
        }
    }
    return 0;
}

// By one block: reports the lowest row breaking the convention; if none, the lowest row failing
// the op's extra check (the order in which cpu-ref finds them).
__device__ void check_rows_block(const int* slots, const int* pos, int rows, int num_slots, int op, int mode, i64 a,
                                 i64 b, const int* idx, int idx_cols, i64* err) {
    __shared__ i64 sh[32];
    if (err[0] != 0) return;
    i64 m0 = ROW_NONE, m1 = ROW_NONE;
    i64 v[3];
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        if (m0 == ROW_NONE && place_error(slots, pos, r, num_slots, v) != 0) m0 = r;
        if (m1 == ROW_NONE && mode != CHECK_NONE && mode != CHECK_INDICES &&
            extra_error(mode, pos, r, a, b, idx, idx_cols, v) != 0)
            m1 = r;
    }
    if (mode == CHECK_INDICES) {
        // Over every index at once, not row by row: a decode row holds the top-k (512) indices.
        i64 total = (i64)rows * idx_cols;
        for (i64 e = threadIdx.x; e < total; e += blockDim.x) {
            int j = idx[e];
            if (j != -1 && (j < 0 || (i64)j >= b)) {
                i64 r = e / idx_cols;
                m1 = r < m1 ? r : m1;
            }
        }
    }
    m0 = block_min_i64(m0, sh);
    m1 = block_min_i64(m1, sh);
    if (threadIdx.x == 0) {
        if (m0 != ROW_NONE) {
            int code = place_error(slots, pos, (int)m0, num_slots, v);
            report_error(err, code, op, m0, v[0], v[1], v[2]);
        } else if (m1 != ROW_NONE) {
            int code = extra_error(mode, pos, (int)m1, a, b, idx, idx_cols, v);
            report_error(err, code, op, m1, v[0], v[1], v[2]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(1024) check_rows(const int* slots, const int* pos, int rows, int num_slots, int op, int mode,
                                      i64 a, i64 b, const int* idx, int idx_cols, i64* err) {
    grid_dep_begin();
    check_rows_block(slots, pos, rows, num_slots, op, mode, a, b, idx, idx_cols, err);
}

// The same check as one more block of the kernel it guards, when that kernel only reads the
// cache and its other blocks bound every slot, position and index they use themselves, so that
// it need not wait for the check: such a kernel takes ROWS_CHECK_PARAMS last and begins with
// ROWS_CHECK_BLOCK, which runs the check in the last x block of its grid (for y = z = 0) and
// returns there (chk_rows 0: no check, no extra block). Its error word is `i64* err`. A bad row is reported as by check_rows;
// the kernels after this one see the error and do nothing, as after check_rows.
#define ROWS_CHECK_PARAMS int chk_rows, int chk_op, int chk_mode, i64 chk_a, i64 chk_b, const int *chk_idx, int chk_cols
#define ROWS_CHECK_BLOCK(slots, pos, num_slots, err)                                                             \
    if (chk_rows > 0 && blockIdx.x == gridDim.x - 1) {                                                          \
        if (blockIdx.y == 0 && blockIdx.z == 0)                                                                 \
            check_rows_block(slots, pos, chk_rows, num_slots, chk_op, chk_mode, chk_a, chk_b, chk_idx, chk_cols, \
                             err);                                                                              \
        return;                                                                                                 \
    }

// One block. Reports the lowest i with v[i] outside [0, bound) as `code` (v0 = value, v1 = bound).
extern "C" __global__ void __launch_bounds__(1024) check_range(const int* vals, i64 n, i64 bound, int op, int code, i64* err) {
    grid_dep_begin();
    __shared__ i64 sh[32];
    if (err[0] != 0) return;
    i64 m = ROW_NONE;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
        i64 x = vals[i];
        if (x < 0 || x >= bound) { m = i; break; }
    }
    m = block_min_i64(m, sh);
    if (threadIdx.x == 0 && m != ROW_NONE) report_error(err, code, op, m, vals[m], bound, 0);
}

// ---- f64 dots of row tiles (many rows against a few dozen weight rows) -------------------------

// The products of f32 values are exact in f64 and summed in f64, as cpu-ref does; only the order
// differs (each thread sums its dots column by column). A block of 256 threads multiplies 32 rows
// of x against 32 rows of w, staging 32 columns of each in shared memory, so that every loaded
// weight serves 32 rows (one warp per dot re-read the weights once per row: the gate of a
// 4096-row prefill read 4 GiB of them).
#define DOT_TILE 32

// Thread (ty, tx) = (tid / 32, tid % 32) gets in acc[j] the dot over columns [c0, c1) of x row
// 4·ty + j with w row tx (x, w: row starts, row stride n; rows past xr / wr read as zeros). Lane
// `sq` (−1: none) dots x with itself instead: Σ x². Needs blockDim.x == 256.
__device__ void dot_tile_f64(const float* x, int xr, const float* w, int wr, i64 n, int sq, i64 c0, i64 c1,
                             double* acc) {
    // Widened to f64 once as staged: f32 → f64 conversions run at a quarter of the f64 FMA rate.
    __shared__ double xs[DOT_TILE][DOT_TILE + 1];
    __shared__ double ws[DOT_TILE][DOT_TILE + 1];
    int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[j] = 0.0;
    for (i64 c = c0; c < c1; c += DOT_TILE) {
        i64 col = c + tx;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int row = ty * 4 + j;
            xs[row][tx] = row < xr && col < c1 ? (double)x[row * n + col] : 0.0;
            ws[row][tx] = row < wr && col < c1 ? (double)w[row * n + col] : 0.0;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < DOT_TILE; ++kk) {
            double wv = ws[tx][kk];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                double xv = xs[ty * 4 + j][kk];
                acc[j] = fma(xv, tx == sq ? xv : wv, acc[j]);
            }
        }
        __syncthreads();
    }
}

// ---- block quantization (act_quant / QuantSim), in place or out of place ---------------------

// One warp per (row, block) of `block` values among the first `qdims` of each row (a short last
// block is its own block), warps gw0, gw0 + stride, ...: put(i, x, s) receives element i =
// row·dim + column, its value x and its block's scale s (quant_value(x, s, fmt) is the
// quantize-dequantized value); lane 0 then calls at_block(row, block index, s).
template <typename Put, typename AtBlock>
__device__ __forceinline__ void quant_row_blocks_by(const float* src, i64 rows, i64 dim, i64 qdims, int block, int fmt,
                                                    i64 gw0, i64 stride, Put put, AtBlock at_block) {
    int lane = threadIdx.x & 31;
    i64 nb = (qdims + block - 1) / block;
    i64 warps = rows * nb;
    for (i64 gw = gw0; gw < warps; gw += stride) {
        i64 r = gw / nb, b = gw % nb;
        i64 start = b * block;
        i64 len = qdims - start < block ? qdims - start : block;
        const float* xs = src + r * dim + start;
        float amax = 0.0f;
        for (i64 i = lane; i < len; i += 32) amax = fmaxf(amax, fabsf(xs[i]));
        amax = warp_max_f(amax);
        float s = quant_scale(amax, fmt);
        for (i64 i = lane; i < len; i += 32) put(r * dim + start + i, xs[i], s);
        if (lane == 0) at_block(r, b, s);
    }
}

// quant_row_blocks_by over the warps of the whole grid (grid-stride).
template <typename Put, typename AtBlock>
__device__ __forceinline__ void quant_row_blocks(const float* src, i64 rows, i64 dim, i64 qdims, int block, int fmt,
                                                 Put put, AtBlock at_block) {
    quant_row_blocks_by(src, rows, dim, qdims, block, fmt, ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5,
                        ((i64)gridDim.x * blockDim.x) >> 5, put, at_block);
}

// quant_row_blocks into dst, which may equal src. Values past qdims are copied when dst != src.
extern "C" __global__ void quant_rows(const float* src, float* dst, i64 rows, i64 dim, i64 qdims, int block,
                                      int fmt) {
    grid_dep_begin();
    quant_row_blocks(src, rows, dim, qdims, block, fmt, [&](i64 i, float v, float s) { dst[i] = quant_value(v, s, fmt); },
                     [](i64, i64, float) {});
    if (src == dst || qdims >= dim) return;
    i64 tail = dim - qdims, n = rows * tail;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < n; t += (i64)gridDim.x * blockDim.x) {
        i64 i = (t / tail) * dim + qdims + t % tail;
        dst[i] = src[i];
    }
}

// bf16 bits of f, rounded to nearest even (NaN stays NaN).
__device__ __forceinline__ u32 bf16_rn_bits(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7F800000u) == 0x7F800000u) return (u >> 16) | ((u & 0xFFFFu) ? 0x40u : 0u);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

// act_quant (FP8 blocks of `block`) of src [rows, dim] into bf16 dst [rows, dim]: the same values
// quant_rows writes, which bf16 holds exactly (e4m3 × power of two), for the tensor-core tiles.
extern "C" __global__ void quant_rows_bf16(const float* src, u16* dst, i64 rows, i64 dim, int block) {
    grid_dep_begin();
    quant_row_blocks(src, rows, dim, dim, block, FMT_FP8,
                     [&](i64 i, float v, float s) { dst[i] = (u16)bf16_rn_bits(quant_value(v, s, FMT_FP8)); },
                     [](i64, i64, float) {});
}

// act_quant (FP8 blocks of `block`, dim % block == 0) of src [rows, dim] as e4m3 codes
// codes [rows, dim] and their scales [rows, dim / block] (value = code × scale), for the FP8
// tensor-core GEMV (linear_fp8_r1), and, unless `vals` is null, the values quant_rows writes
// into vals [rows, dim] (a decode step feeds the FFN norm's row to both kinds of consumer).
extern "C" __global__ void quant_rows_e4m3(const float* src, u8* codes, float* scales, float* vals, i64 rows, i64 dim,
                                           int block) {
    grid_dep_begin();
    i64 nb = dim / block;
    quant_row_blocks(
        src, rows, dim, dim, block, FMT_FP8,
        [&](i64 i, float v, float s) {
            u8 q = quant_code_e4m3(v, s);
            codes[i] = q;
            if (vals) vals[i] = e4m3_to_f32(q) * s;
        },
        [&](i64 r, i64 b, float s) { scales[r * nb + b] = s; });
}

// ---- Hadamard (Sylvester, natural order) over n = power of two doubles, by one block ---------

// v holds the n values; on return v holds H·v (unnormalized). Same butterflies, same order of
// operations per element as cpu-ref, so the doubles are bit-identical.
__device__ void hadamard_block(double* v, int n) {
    __syncthreads();
    for (int h = 1; h < n; h <<= 1) {
        for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
            int j = (t / h) * 2 * h + (t % h);
            double a = v[j], b = v[j + h];
            v[j] = a + b;
            v[j + h] = a - b;
        }
        __syncthreads();
    }
}

// RoPE (cos, sin) of one angle: θ = fl32(pos · freq), cos/sin in double rounded to f32.
__device__ __forceinline__ void rope_cs(float posf, float freq, float* c, float* s) {
    float theta = posf * freq;
    *c = (float)cos((double)theta);
    *s = (float)sin((double)theta);
}

// One interleaved RoPE pair (a, b) rotated by (c, s): forward (a·c − b·s, a·s + b·c), inverse
// the conjugate (a·c + b·s, b·c − a·s), each term rounded in f32 (Rope, RmsNorm's RoPE, the
// compressor's entries).
__device__ __forceinline__ void rope_rotate(float* a, float* b, float c, float s, bool inverse) {
    float x = *a, y = *b;
    if (inverse) {
        *a = x * c + y * s;
        *b = y * c - x * s;
    } else {
        *a = x * c - y * s;
        *b = x * s + y * c;
    }
}

// ---- weight-format dot products (Linear, GroupedLinear, MoE experts) -----------------------

#define WF_F32 0
#define WF_BF16 1
#define WF_FP8 2
#define WF_FP4 3
// Rows of x that one warp multiplies with each weight row it reads (multi-row kernels; the
// single-row variants use 1).
#define LIN_RT 4

// Bytes of one [n, k] matrix in format fmt, and of its scales.
__device__ __forceinline__ i64 mat_bytes(int fmt, i64 n, i64 k) {
    return fmt == WF_F32 ? n * k * 4 : fmt == WF_BF16 ? n * k * 2 : fmt == WF_FP8 ? n * k : n * (k / 2);
}
__device__ __forceinline__ i64 scale_bytes(int fmt, i64 n, i64 k) {
    return fmt == WF_FP8 ? ((n + 127) / 128) * ((k + 127) / 128) : fmt == WF_FP4 ? n * (k / 32) : 0;
}

// Fills the decode tables in shared memory: lut[0..256) e4m3, lut[256..272) e2m1 (call from every
// thread, then __syncthreads).
#define LUT_SIZE 272
__device__ __forceinline__ void fill_luts(float* lut) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) lut[i] = e4m3_to_f32((u8)i);
    for (int i = threadIdx.x; i < 16; i += blockDim.x) lut[256 + i] = e2m1_to_f32((u8)i);
}

// Lane partial sums acc[t] += Σ_{i ≡ lane (mod 32)} W[o, i] · xs[t][i] for t < nt, with W an
// [n, k] matrix at `w` in format FMT (scales at `sc`) dequantized on the fly. f32 FMA.
// Scalar path: any k, any alignment.
template <int FMT, int RT>
__device__ __forceinline__ void wdot(const u8* w, const u8* sc, i64 o, i64 k, const float* const* xs, int nt,
                                     float* acc, const float* lut) {
    int lane = threadIdx.x & 31;
    if (FMT == WF_F32) {
        const float* wr = (const float*)w + o * k;
        for (i64 i = lane; i < k; i += 32) {
            float wv = wr[i];
#pragma unroll
            for (int t = 0; t < RT; ++t)
                if (t < nt) acc[t] = fmaf(wv, xs[t][i], acc[t]);
        }
    } else if (FMT == WF_BF16) {
        const u16* wr = (const u16*)w + o * k;
        for (i64 i = lane; i < k; i += 32) {
            float wv = bf16_to_f32(wr[i]);
#pragma unroll
            for (int t = 0; t < RT; ++t)
                if (t < nt) acc[t] = fmaf(wv, xs[t][i], acc[t]);
        }
    } else if (FMT == WF_FP8) {
        const u8* wr = w + o * k;
        const u8* sr = sc + (o >> 7) * ((k + 127) >> 7);
        for (i64 i = lane; i < k; i += 32) {
            float wv = lut[wr[i]] * e8m0_to_f32(sr[i >> 7]);
#pragma unroll
            for (int t = 0; t < RT; ++t)
                if (t < nt) acc[t] = fmaf(wv, xs[t][i], acc[t]);
        }
    } else {
        i64 kb = k / 2;
        const u8* wr = w + o * kb;
        const u8* sr = sc + o * (k / 32);
        for (i64 j = lane; j < kb; j += 32) {
            u8 b = wr[j];
            float s = e8m0_to_f32(sr[j >> 4]);
            float w0 = lut[256 + (b & 15)] * s, w1 = lut[256 + (b >> 4)] * s;
#pragma unroll
            for (int t = 0; t < RT; ++t)
                if (t < nt) {
                    acc[t] = fmaf(w0, xs[t][2 * j], acc[t]);
                    acc[t] = fmaf(w1, xs[t][2 * j + 1], acc[t]);
                }
        }
    }
}

// 2 × the e2m1 values of the eight nibbles of `wd` (nibble h → v[h]; 0, ±1, ±2, ±3, ±4, ±6, ±8,
// ±12: small integers, exact; code 8 gives −0), in about 3 integer instructions a value. (Shifts
// of a constant table and an int→float conversion took 8, one on a slow pipe, and bounded the FP4
// expert GEMV.) Byte permutes look the magnitudes (bits 0–2 of a nibble) up in two
// 8-entry tables holding the high and the low byte of their bf16 patterns, the sign bits (bit 3)
// are gathered into the high bytes, and a third permute pairs two values as bf16x2, which widen to
// f32 exactly. Selectors keep bit 3 of each nibble clear (bit 3 would replicate signs).
#define E2M1_X2_HI_0_3 0x40403F00u  // high bytes of bf16(0, 1, 2, 3)
#define E2M1_X2_HI_4_7 0x41414040u  // high bytes of bf16(4, 6, 8, 12)
#define E2M1_X2_LO_0_3 0x40008000u  // low bytes of bf16(0, 1, 2, 3)
#define E2M1_X2_LO_4_7 0x4000C080u  // low bytes of bf16(4, 6, 8, 12)
__device__ __forceinline__ void e2m1_x2_word(u32 wd, float* v) {
    u32 w4 = wd << 4;  // byte j's top bit: the sign of nibble 2j (wd's own: of nibble 2j + 1)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        u32 mag = (half ? wd >> 16 : wd) & 0x7777u;
        u32 sign = __byte_perm(wd, w4, half ? 0x3726u : 0x1504u) & 0x80808080u;
        u32 hi = __byte_perm(E2M1_X2_HI_0_3, E2M1_X2_HI_4_7, mag) | sign;
        u32 lo = __byte_perm(E2M1_X2_LO_0_3, E2M1_X2_LO_4_7, mag);
        u32 p01 = __byte_perm(lo, hi, 0x5140u), p23 = __byte_perm(lo, hi, 0x7362u);
        v[4 * half] = __uint_as_float(p01 << 16);
        v[4 * half + 1] = __uint_as_float(p01 & 0xFFFF0000u);
        v[4 * half + 2] = __uint_as_float(p23 << 16);
        v[4 * half + 3] = __uint_as_float(p23 & 0xFFFF0000u);
    }
}

#if __CUDA_ARCH__ >= 890
// The f16 values (exact; a NaN code gives a NaN) of the four e4m3 codes of `wd` as two pairs:
// *h01 holds bytes 0 and 1 (byte 0's value in the low half), *h23 bytes 2 and 3.
__device__ __forceinline__ void e4m3x4_to_f16x2(u32 wd, u32* h01, u32* h23) {
    asm("{\n.reg .b16 lo, hi;\nmov.b32 {lo, hi}, %2;\ncvt.rn.f16x2.e4m3x2 %0, lo;\ncvt.rn.f16x2.e4m3x2 %1, hi;\n}"
        : "=r"(*h01), "=r"(*h23)
        : "r"(wd));
}
#endif

// The e4m3 values of the four bytes of `wd` (byte b → v[b]). sm_89 and later convert in hardware
// (e4m3 pair → f16 pair → f32, each step exact; a NaN code gives a NaN): one shared-memory table
// read per value kept the L1 busier than HBM in the one-row GEMV. Older GPUs read `lut`
// (fill_luts).
__device__ __forceinline__ void e4m3_word(u32 wd, float* v, const float* lut) {
#if __CUDA_ARCH__ >= 890
    u32 h01, h23;
    e4m3x4_to_f16x2(wd, &h01, &h23);
    u16 h[4] = {(u16)(h01 & 0xFFFFu), (u16)(h01 >> 16), (u16)(h23 & 0xFFFFu), (u16)(h23 >> 16)};
#pragma unroll
    for (int b = 0; b < 4; ++b) asm("cvt.f32.f16 %0, %1;" : "=f"(v[b]) : "h"(h[b]));
#else
#pragma unroll
    for (int b = 0; b < 4; ++b) v[b] = lut[(wd >> (8 * b)) & 0xFFu];
#endif
}

// Whether chunk_dot reads `lut` (fill_luts) for weights of format fmt: FP8 below sm_89. The
// one-row kernels fill it only then.
__device__ __forceinline__ bool chunk_dot_needs_lut(int fmt) {
#if __CUDA_ARCH__ >= 890
    return false;
#else
    return fmt == WF_FP8;
#endif
}

// Elements of one 16-byte weight chunk of format fmt (Chunk<FMT>::E where the format is a template
// argument).
__device__ constexpr int chunk_elems(int fmt) { return fmt == WF_F32 ? 4 : fmt == WF_BF16 ? 8 : fmt == WF_FP8 ? 16 : 32; }
template <int FMT> struct Chunk { static const int E = chunk_elems(FMT); };

// a + W[o, i0 .. i0 + E) · xv[0 .. E) for one 16-byte chunk q of the weight row and the E
// matching x values in registers. FP8/FP4: the chunk lies in one scale block, so the unscaled
// products are summed first and the power-of-two scale applied once (exact scaling: the same sum
// as scaling every product).
template <int FMT>
__device__ __forceinline__ float chunk_dot(uint4 q, const float* xv, float s, float a, const float* lut) {
    u32 words[4] = {q.x, q.y, q.z, q.w};
    if (FMT == WF_F32) {
#pragma unroll
        for (int m = 0; m < 4; ++m) a = fmaf(__uint_as_float(words[m]), xv[m], a);
    } else if (FMT == WF_BF16) {
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            a = fmaf(__uint_as_float(words[m] << 16), xv[2 * m], a);
            a = fmaf(__uint_as_float(words[m] & 0xFFFF0000u), xv[2 * m + 1], a);
        }
    } else if (FMT == WF_FP8) {
        float p = 0.0f;
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            float wv[4];
            e4m3_word(words[m], wv, lut);
#pragma unroll
            for (int b = 0; b < 4; ++b) p = fmaf(wv[b], xv[4 * m + b], p);
        }
        a = fmaf(p, s, a);
    } else {
        // Products with 2·e2m1 (small integers, exact); the 1/2 goes into the scale.
        float p = 0.0f;
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            float wv[8];
            e2m1_x2_word(words[m], wv);
#pragma unroll
            for (int h = 0; h < 8; ++h) p = fmaf(wv[h], xv[8 * m + h], p);
        }
        a = fmaf(p, 0.5f * s, a);
    }
    return a;
}

// The E x values of one chunk, from 16-byte aligned memory into registers.
template <int FMT>
__device__ __forceinline__ void chunk_x(const float* xp, float* xv) {
#pragma unroll
    for (int m = 0; m < Chunk<FMT>::E / 4; ++m) {
        float4 v = ((const float4*)xp)[m];
        xv[4 * m] = v.x;
        xv[4 * m + 1] = v.y;
        xv[4 * m + 2] = v.z;
        xv[4 * m + 3] = v.w;
    }
}

// acc[t] += W[o, i0 .. i0 + E) · xs[t][i0 .. i0 + E) for one 16-byte chunk q of the weight row.
template <int FMT, int RT>
__device__ __forceinline__ void chunk_fma(uint4 q, i64 i0, float s, const float* const* xs, int nt, float* acc,
                                         const float* lut) {
#pragma unroll
    for (int t = 0; t < RT; ++t) {
        if (t >= nt) break;
        float xv[Chunk<FMT>::E];
        chunk_x<FMT>(xs[t] + i0, xv);
        acc[t] = chunk_dot<FMT>(q, xv, s, acc[t], lut);
    }
}

template <int FMT>
__device__ __forceinline__ float chunk_scale(const u8* sc, i64 o, i64 k, i64 i0) {
    if (FMT == WF_FP8) return e8m0_to_f32(sc[(o >> 7) * ((k + 127) >> 7) + (i0 >> 7)]);
    if (FMT == WF_FP4) return e8m0_to_f32(sc[o * (k / 32) + (i0 >> 5)]);
    return 1.0f;
}

// Vector path: each lane reads 16 bytes of the weight row (two chunks in flight per step) and the
// matching float4s of x. Needs k % 32 == 0 (16-byte aligned weight rows in every format) and
// 16-byte aligned x rows.
template <int FMT, int RT>
__device__ __forceinline__ void wdot_vec(const u8* w, const u8* sc, i64 o, i64 k, const float* const* xs, int nt,
                                         float* acc, const float* lut) {
    const int E = Chunk<FMT>::E;
    int lane = threadIdx.x & 31;
    i64 row_bytes = FMT == WF_F32 ? k * 4 : FMT == WF_BF16 ? k * 2 : FMT == WF_FP8 ? k : k / 2;
    const uint4* wr = (const uint4*)(w + o * row_bytes);
    i64 chunks = k / E;
    for (i64 c = lane; c < chunks; c += 64) {
        bool two = c + 32 < chunks;
        uint4 qa = __ldg(wr + c);
        uint4 qb = two ? __ldg(wr + c + 32) : qa;
        float sa = chunk_scale<FMT>(sc, o, k, c * E);
        float sb = two ? chunk_scale<FMT>(sc, o, k, (c + 32) * E) : sa;
        chunk_fma<FMT, RT>(qa, c * E, sa, xs, nt, acc, lut);
        if (two) chunk_fma<FMT, RT>(qb, (c + 32) * E, sb, xs, nt, acc, lut);
    }
}

// Weight rows of one warp's m16n8k32 tiles in the one-row tensor-core kernels (the mma's M).
#define MMA_ROWS 16

// d[0..3] += A·B for one mma.sync tile of `shape` ("m16n8k16.row.col.f32.f16.f16.f32", ...) with
// f32 accumulators: A's fragment in a0..a3, B's in b0, b1 (PTX ISA fragment layouts).
#define MMA_SYNC_F32(shape, d, a0, a1, a2, a3, b0, b1)                                                   \
    asm volatile("mma.sync.aligned." shape " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"     \
                 : "+f"((d)[0]), "+f"((d)[1]), "+f"((d)[2]), "+f"((d)[3])                              \
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1))

#if __CUDA_ARCH__ >= 890
// d += A·B for one m16n8k32 e4m3 tile (f32 accumulators): a0/a2 row g, a1/a3 row g + 8, columns
// 4t.. and 16 + 4t..; b0/b1 rows 4t.. and 16 + 4t.. of column g (PTX ISA, mma.m16n8k32 layouts).
__device__ __forceinline__ void mma_e4m3_16x8x32(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    MMA_SYNC_F32("m16n8k32.row.col.f32.e4m3.e4m3.f32", d, a0, a1, a2, a3, b0, b1);
}

// d += A·B for one m16n8k16 f16 tile (f32 accumulators): a0/a2 row g, a1/a3 row g + 8, columns
// 2t.. and 8 + 2t..; b0/b1 rows 2t.. and 8 + 2t.. of column g (PTX ISA, mma.m16n8k16 layouts).
__device__ __forceinline__ void mma_f16_16x8x16(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    MMA_SYNC_F32("m16n8k16.row.col.f32.f16.f16.f32", d, a0, a1, a2, a3, b0, b1);
}
#endif

// Weight rows per warp step in the one-row (decode) kernels.
#define LIN_OT 4

// The one-row GEMV's x row in shared memory. Lane c multiplies weight chunk c with the F = E/4
// float4s of x that the chunk spans (F = 8 for FP4: 128 bytes per lane), so the lanes of a warp
// read x 16 bytes per line across up to 32 lines at a time: read from global memory that kept the
// L1 busier than HBM. The copy is swizzled: float4 m of chunk c sits at c·F + (m ^ ((c·F/8) % F)),
// so that the float4 m of 8 consecutive chunks (a quarter warp's request) lies in 8 distinct
// 16-byte bank groups.
__device__ __forceinline__ i64 staged_slot(i64 c, int m, int f) { return c * f + (m ^ (int)((c * f / 8) % f)); }

// Copies x[0 .. k) (k % 32 == 0, 16-byte aligned) into sx (k floats) for weights of format fmt.
// Every thread calls it; the caller synchronizes before reading.
__device__ __forceinline__ void stage_x(const float* x, i64 k, int fmt, float4* sx) {
    int f = chunk_elems(fmt) / 4;
    for (i64 j = threadIdx.x; j < k / 4; j += blockDim.x) sx[staged_slot(j / f, (int)(j % f), f)] = ((const float4*)x)[j];
}

// The E x values of chunk c from the staged copy, into registers.
template <int FMT>
__device__ __forceinline__ void chunk_x_staged(const float4* sx, i64 c, float* xv) {
    const int F = Chunk<FMT>::E / 4;
#pragma unroll
    for (int m = 0; m < F; ++m) {
        float4 v = sx[staged_slot(c, m, F)];
        xv[4 * m] = v.x;
        xv[4 * m + 1] = v.y;
        xv[4 * m + 2] = v.z;
        xv[4 * m + 3] = v.w;
    }
}

// acc[j] += W[o0 + j, chunks of this warp] · x for OT weight rows o0 .. o0 + no (no ≤ OT) at once,
// this warp being part `part` of `parts` warps that split the row's 16-byte chunks in interleaved
// slabs of 32 (lane c of slab b takes chunk 32·b + c). Each step loads two of the lane's chunks
// of all OT rows (2·OT independent 16-byte loads in flight per lane: a decode GEMV is bound by
// bytes in flight), then adds them in chunk order; each x chunk is read once for the OT rows.
// x: the row staged by stage_x. Needs k % 32 == 0.
template <int FMT, int OT>
__device__ __forceinline__ void wdot_vec_split(const u8* w, const u8* sc, i64 o0, int no, i64 k, const float4* sx,
                                               float* acc, const float* lut, int part, int parts) {
    const int E = Chunk<FMT>::E;
    int lane = threadIdx.x & 31;
    i64 row_bytes = FMT == WF_F32 ? k * 4 : FMT == WF_BF16 ? k * 2 : FMT == WF_FP8 ? k : k / 2;
    i64 chunks = k / E, slab = 32 * (i64)parts;
    for (i64 c = (i64)part * 32 + lane; c < chunks; c += 2 * slab) {
        i64 cs[2] = {c, c + slab < chunks ? c + slab : -1};
        uint4 q[2][OT];
#pragma unroll
        for (int u = 0; u < 2; ++u)
#pragma unroll
            for (int j = 0; j < OT; ++j) {
                i64 o = o0 + (j < no ? j : 0);
                if (cs[u] >= 0) q[u][j] = __ldg((const uint4*)(w + o * row_bytes) + cs[u]);
            }
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            if (cs[u] < 0) break;
            float xv[E];
            chunk_x_staged<FMT>(sx, cs[u], xv);
#pragma unroll
            for (int j = 0; j < OT; ++j) {
                i64 o = o0 + (j < no ? j : 0);
                acc[j] = chunk_dot<FMT>(q[u][j], xv, chunk_scale<FMT>(sc, o, k, cs[u] * E), acc[j], lut);
            }
        }
    }
}

template <int OT>
__device__ __forceinline__ void wdot_split_any(int fmt, const u8* w, const u8* sc, i64 o0, int no, i64 k,
                                               const float4* x, float* acc, const float* lut, int part, int parts) {
    switch (fmt) {
        case WF_F32: wdot_vec_split<WF_F32, OT>(w, sc, o0, no, k, x, acc, lut, part, parts); break;
        case WF_BF16: wdot_vec_split<WF_BF16, OT>(w, sc, o0, no, k, x, acc, lut, part, parts); break;
        case WF_FP8: wdot_vec_split<WF_FP8, OT>(w, sc, o0, no, k, x, acc, lut, part, parts); break;
        default: wdot_vec_split<WF_FP4, OT>(w, sc, o0, no, k, x, acc, lut, part, parts); break;
    }
}

// wdot_vec_split by one warp over the whole row.
template <int OT>
__device__ __forceinline__ void wdot_multi_any(int fmt, const u8* w, const u8* sc, i64 o0, int no, i64 k,
                                               const float4* x, float* acc, const float* lut) {
    wdot_split_any<OT>(fmt, w, sc, o0, no, k, x, acc, lut, 0, 1);
}

template <int RT>
__device__ __forceinline__ void wdot_any(int fmt, int vec, const u8* w, const u8* sc, i64 o, i64 k,
                                         const float* const* xs, int nt, float* acc, const float* lut) {
    if (vec) {
        switch (fmt) {
            case WF_F32: wdot_vec<WF_F32, RT>(w, sc, o, k, xs, nt, acc, lut); break;
            case WF_BF16: wdot_vec<WF_BF16, RT>(w, sc, o, k, xs, nt, acc, lut); break;
            case WF_FP8: wdot_vec<WF_FP8, RT>(w, sc, o, k, xs, nt, acc, lut); break;
            default: wdot_vec<WF_FP4, RT>(w, sc, o, k, xs, nt, acc, lut); break;
        }
        return;
    }
    switch (fmt) {
        case WF_F32: wdot<WF_F32, RT>(w, sc, o, k, xs, nt, acc, lut); break;
        case WF_BF16: wdot<WF_BF16, RT>(w, sc, o, k, xs, nt, acc, lut); break;
        case WF_FP8: wdot<WF_FP8, RT>(w, sc, o, k, xs, nt, acc, lut); break;
        default: wdot<WF_FP4, RT>(w, sc, o, k, xs, nt, acc, lut); break;
    }
}

// ---- tensor-core tiles (sm_80+): an f32-class GEMM on bf16 mma ----------------------------------
// Y[m, c] = Σ_i X[m, i]·W_c[i] for a tile of TC_BM rows × TC_BN weight rows. The caller maps each
// tile column c to one weight row (TcWRow: matrix, scales, row index), so one tile can hold rows
// of two matrices (moe_up_tc interleaves W1 and W3) and keep the accumulators of one.
// W is FP8/FP4 with its power-of-two scale folded into the value, or BF16: exact in bf16 (for
// scales ≥ 2^-118, below which the product leaves bf16's normal range).
// X enters as SPLIT bf16 terms whose sum is x exactly. SPLIT 1: X is stored in bf16 (act_quant'ed
// inputs: e4m3 value × power of two, which bf16 holds, written so by quant_rows_bf16); SPLIT 3: X
// is any f32, split in the tile. Products of bf16 values are exact in the
// f32 accumulators, so the result differs from the f32 FMA kernels only in summation order.
// Needs k % TC_BK == 0 and 16-byte aligned rows of X and W.
#define TC_BM 64
#define TC_BN 128
#define TC_BK 32
// Padded row (80 bytes): the eight 16-byte rows an ldmatrix phase reads fall in distinct banks.
#define TC_LD (TC_BK + 8)

// The tile's row table and dequantization tables (static shared memory).
struct TcSmem {
    const u8* xrow[TC_BM];     // row starts of the tile, bf16 (SPLIT 1) or f32 (null: a zero row)
    int tag[TC_BM];            // caller's per-row tag (pair index in the MoE kernels)
    float lut[LUT_SIZE];
};

// The operand stages live in dynamic shared memory (tc_stage_bytes): two stages, each the bf16
// weight slice [TC_BN][TC_LD] then the SPLIT bf16 input slices [TC_BM][TC_LD]. While the warps
// multiply one stage the next slice is stored into the other, so a k step needs one barrier.
template <int SPLIT> struct TcStage {
    static const int ELEMS = (TC_BN + SPLIT * TC_BM) * TC_LD;
    u16 (*w)[TC_LD];
    u16 (*x)[TC_BM][TC_LD];
    __device__ __forceinline__ TcStage(u16* base, int s)
        : w((u16(*)[TC_LD])(base + s * ELEMS)), x((u16(*)[TC_BM][TC_LD])(base + s * ELEMS + TC_BN * TC_LD)) {}
};

// One weight row of a tile column: row o of the [n, k] matrix at w with scales sc; o < 0: zeros.
struct TcWRow {
    const u8* w;
    const u8* sc;
    i64 o;
};

__device__ __forceinline__ u32 pack2(float lo, float hi) {
    return (__float_as_uint(lo) >> 16) | (__float_as_uint(hi) & 0xFFFF0000u);
}

// Staged global loads of one TC_BK slice of the weight tile (issued before the previous slice's
// mma so that they are in flight meanwhile). FP8/FP4: thread t stages half t % 2 of tile column
// t / 2; BF16: quarter t % 4 of columns t / 4 and t / 4 + 64 (TcRows::r).
struct TcW {
    uint4 q[2];
    float s;
};
struct TcRows {
    TcWRow r[2];
};

template <int FMT, typename RowOf>
__device__ __forceinline__ TcRows tc_rows(RowOf row_of) {
    TcRows t;
    if (FMT == WF_BF16) {
        t.r[0] = row_of((int)threadIdx.x >> 2);
        t.r[1] = row_of(((int)threadIdx.x >> 2) + TC_BN / 2);
    } else {
        t.r[0] = row_of((int)threadIdx.x >> 1);
        t.r[1] = t.r[0];
    }
    return t;
}

template <int FMT>
__device__ __forceinline__ void tc_load_w(const TcRows& rows, i64 k, i64 kb, TcW& t) {
    int tid = threadIdx.x;
    t.q[0] = make_uint4(0, 0, 0, 0);
    t.q[1] = t.q[0];
    t.s = 0.0f;
    const TcWRow& r = rows.r[0];
    if (FMT == WF_FP8) {
        if (r.o >= 0) {
            t.q[0] = __ldg((const uint4*)(r.w + r.o * k + kb + (tid & 1) * 16));
            t.s = e8m0_to_f32(r.sc[(r.o >> 7) * ((k + 127) >> 7) + (kb >> 7)]);
        }
    } else if (FMT == WF_FP4) {
        if (r.o >= 0) {
            uint2 v = __ldg((const uint2*)(r.w + r.o * (k / 2) + kb / 2 + (tid & 1) * 8));
            t.q[0] = make_uint4(v.x, v.y, 0, 0);
            t.s = e8m0_to_f32(r.sc[r.o * (k / 32) + kb / 32]);
        }
    } else {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const TcWRow& rj = rows.r[j];
            if (rj.o >= 0) t.q[j] = __ldg((const uint4*)(rj.w + (rj.o * k + kb + (tid & 3) * 8) * 2));
        }
    }
}

// Dequantizes the staged slice into bf16 (FP8 in hardware from sm_89, FP4 by byte permutes; see
// e4m3_word / e2m1_x2_word) and stores it in the weight tile.
template <int FMT>
__device__ __forceinline__ void tc_store_w(u16 (*ws)[TC_LD], const TcW& t, const float* lut) {
    int tid = threadIdx.x;
    if (FMT == WF_BF16) {
#pragma unroll
        for (int j = 0; j < 2; ++j) *(uint4*)&ws[(tid >> 2) + j * (TC_BN / 2)][(tid & 3) * 8] = t.q[j];
        return;
    }
    u32 words[4] = {t.q[0].x, t.q[0].y, t.q[0].z, t.q[0].w};
    float v[16];
    if (FMT == WF_FP8) {
#pragma unroll
        for (int m = 0; m < 4; ++m) e4m3_word(words[m], &v[4 * m], lut);
#pragma unroll
        for (int i = 0; i < 16; ++i) v[i] *= t.s;
    } else {
#pragma unroll
        for (int m = 0; m < 2; ++m) e2m1_x2_word(words[m], &v[8 * m]);
        float s = 0.5f * t.s;  // e2m1_x2_word gives 2·e2m1
#pragma unroll
        for (int i = 0; i < 16; ++i) v[i] *= s;
    }
    u32 out[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = pack2(v[2 * i], v[2 * i + 1]);
    u16* dst = &ws[tid >> 1][(tid & 1) * 16];
    *(uint4*)dst = make_uint4(out[0], out[1], out[2], out[3]);
    *(uint4*)(dst + 8) = make_uint4(out[4], out[5], out[6], out[7]);
}

// X slice: 64 rows × 32 values; bf16 (SPLIT 1): 256 uint4, one per thread; f32: 512, two per
// thread.
template <int SPLIT>
__device__ __forceinline__ void tc_load_x(const u8* const* xrow, i64 kb, uint4* v) {
#pragma unroll
    for (int j = 0; j < (SPLIT == 1 ? 1 : 2); ++j) {
        int idx = threadIdx.x + j * 256;
        const u8* p = xrow[SPLIT == 1 ? idx >> 2 : idx >> 3];
        i64 off = SPLIT == 1 ? (kb + (idx & 3) * 8) * 2 : (kb + (idx & 7) * 4) * 4;
        v[j] = p ? *(const uint4*)(p + off) : make_uint4(0, 0, 0, 0);
    }
}

template <int SPLIT>
__device__ __forceinline__ void tc_store_x(u16 (*xs)[TC_BM][TC_LD], const uint4* v) {
    if (SPLIT == 1) {
        *(uint4*)&xs[0][threadIdx.x >> 2][(threadIdx.x & 3) * 8] = v[0];
        return;
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        int idx = threadIdx.x + j * 256;
        float f[4] = {__uint_as_float(v[j].x), __uint_as_float(v[j].y), __uint_as_float(v[j].z),
                      __uint_as_float(v[j].w)};
        u32 parts[SPLIT][4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            float r = f[c];
#pragma unroll
            for (int s = 0; s < SPLIT; ++s) {
                u32 b = bf16_rn_bits(r);
                parts[s][c] = b;
                float bv = __uint_as_float(b << 16);
                r = (bv - bv != 0.0f) ? 0.0f : r - bv;  // inf/NaN: carried by the first term alone
            }
        }
#pragma unroll
        for (int s = 0; s < SPLIT; ++s)
            *(uint2*)&xs[s][idx >> 3][(idx & 7) * 4] =
                make_uint2(parts[s][0] | (parts[s][1] << 16), parts[s][2] | (parts[s][3] << 16));
    }
}

__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    MMA_SYNC_F32("m16n8k16.row.col.f32.bf16.bf16.f32", c, a[0], a[1], a[2], a[3], b0, b1);
#else
    __trap();  // the host never launches the tensor-core kernels below sm_80
#endif
}

// Four 8×8 bf16 matrices from shared memory, lanes 8j … 8j + 7 giving the row addresses of matrix
// j: r[j] holds row lane / 4, columns 2·(lane % 4) and + 1 of matrix j (the mma fragment layout).
// TRANS: r[j] holds rows 2·(lane % 4) and + 1 of column lane / 4 instead, the B fragment of an
// mma whose k runs down the rows (keys stored row-major, summed over keys).
template <bool TRANS = false> __device__ __forceinline__ void ldmatrix_x4(u32* r, const u16* p) {
#if __CUDA_ARCH__ >= 800
    u32 a = (u32)__cvta_generic_to_shared(p);
    if constexpr (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
#else
    __trap();
#endif
}

// 16 bytes global → shared without a register round trip (sm_80+), src_bytes (0 or 16) of them
// read from src and the rest zero-filled: with 0 nothing is read (src must still be a global
// address). Complete after cp_async_wait with at most PENDING newer groups outstanding, then
// visible to the warp after __syncwarp.
__device__ __forceinline__ void cp_async16_zfill(void* smem_dst, const void* src, u32 src_bytes) {
#if __CUDA_ARCH__ >= 800
    u32 a = (u32)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(src), "r"(src_bytes));
#else
    __trap();
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int PENDING> __device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
#endif
}

// acc[mt][nt][4]: warp (wm, wn) = (warp / 4, warp % 4) owns rows wm·32 + mt·16 (+ g, + 8 + g) and
// tile columns wn·32 + nt·8 (+ 2t, + 2t + 1), g = lane / 4, t = lane % 4 (the mma C layout).
// row_of(c) gives tile column c's weight row (TcWRow); `stages` is the dynamic shared memory.
template <int FMT, int SPLIT, typename RowOf>
__device__ void tc_tile(TcSmem& sm, u16* stages, RowOf row_of, i64 k, float (*acc)[4][4]) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int wm = warp >> 2, wn = warp & 3;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[mt][nt][q] = 0.0f;
    TcRows rows = tc_rows<FMT>(row_of);
    TcW wr;
    uint4 xv[2];
    tc_load_w<FMT>(rows, k, 0, wr);
    tc_load_x<SPLIT>(sm.xrow, 0, xv);
    {
        TcStage<SPLIT> st(stages, 0);
        tc_store_w<FMT>(st.w, wr, sm.lut);
        tc_store_x<SPLIT>(st.x, xv);
    }
    __syncthreads();
    // ldmatrix row addresses: A matrices (rows 0–7, 8–15) × (k, k + 8); B matrices
    // (columns nt·8 … + 7 for two nt) × (k, k + 8).
    int a_row = wm * 32 + (lane & 15), a_col = (lane >> 4) * 8;
    int bm = lane >> 3;
    int b_row = wn * 32 + (bm >> 1) * 8 + (lane & 7), b_col = (bm & 1) * 8;
    // The tile's live rows form a prefix (callers fill xrow in order): a warp skips the mma of
    // its 16-row halves past it, which leaves the tensor cores to the warps with work (an
    // expert's last pair tile is often less than half full).
    bool live[2] = {sm.xrow[wm * 32] != nullptr, sm.xrow[wm * 32 + 16] != nullptr};
    int cur = 0;
    for (i64 kb = 0; kb < k; kb += TC_BK) {
        bool more = kb + TC_BK < k;
        if (more) {
            tc_load_w<FMT>(rows, k, kb + TC_BK, wr);
            tc_load_x<SPLIT>(sm.xrow, kb + TC_BK, xv);
        }
        TcStage<SPLIT> st(stages, cur);
#pragma unroll
        for (int ks = 0; ks < TC_BK; ks += 16) {
            u32 b[4][2];
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                u32 r[4];
                ldmatrix_x4(r, &st.w[b_row + np * 16][b_col + ks]);
                b[2 * np][0] = r[0];
                b[2 * np][1] = r[1];
                b[2 * np + 1][0] = r[2];
                b[2 * np + 1][1] = r[3];
            }
#pragma unroll
            for (int s = 0; s < SPLIT; ++s)
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    if (!live[mt]) continue;
                    u32 a[4];
                    ldmatrix_x4(a, &st.x[s][a_row + mt * 16][a_col + ks]);
#pragma unroll
                    for (int nt = 0; nt < 4; ++nt) mma_bf16(acc[mt][nt], a, b[nt][0], b[nt][1]);
                }
        }
        if (more) {
            TcStage<SPLIT> nx(stages, cur ^ 1);
            tc_store_w<FMT>(nx.w, wr, sm.lut);
            tc_store_x<SPLIT>(nx.x, xv);
        }
        __syncthreads();
        cur ^= 1;
    }
}

// tc_tile for a runtime (fmt, split): FP8, FP4 or BF16 weights; split 1 or 3.
template <typename RowOf>
__device__ void tc_tile_any(int fmt, int split, TcSmem& sm, u16* stages, RowOf row_of, i64 k, float (*acc)[4][4]) {
    if (split == 1) {
        if (fmt == WF_FP8) tc_tile<WF_FP8, 1>(sm, stages, row_of, k, acc);
        else if (fmt == WF_FP4) tc_tile<WF_FP4, 1>(sm, stages, row_of, k, acc);
        else tc_tile<WF_BF16, 1>(sm, stages, row_of, k, acc);
    } else {
        if (fmt == WF_FP8) tc_tile<WF_FP8, 3>(sm, stages, row_of, k, acc);
        else if (fmt == WF_FP4) tc_tile<WF_FP4, 3>(sm, stages, row_of, k, acc);
        else tc_tile<WF_BF16, 3>(sm, stages, row_of, k, acc);
    }
}

// The tile-relative row m and column c of accumulator element acc[mt][nt][q] of this thread.
__device__ __forceinline__ int tc_row(int mt, int q) {
    int lane = threadIdx.x & 31, wm = (threadIdx.x >> 5) >> 2;
    return wm * 32 + mt * 16 + (lane >> 2) + (q >> 1) * 8;
}
__device__ __forceinline__ int tc_col(int nt, int q) {
    int lane = threadIdx.x & 31, wn = (threadIdx.x >> 5) & 3;
    return wn * 32 + nt * 8 + 2 * (lane & 3) + (q & 1);
}

// Calls f(m, c, v) for every accumulator element v of this thread (tile-relative row m and
// column c).
template <typename F>
__device__ __forceinline__ void tc_epilogue(float (*acc)[4][4], F f) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int q = 0; q < 4; ++q) f(tc_row(mt, q), tc_col(nt, q), acc[mt][nt][q]);
}
