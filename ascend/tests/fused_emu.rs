//! The CANN emulator's fused DeepSeek-V4 ops (`cann-emu/src/fused.rs`, contract
//! `docs/ascend-fused.md`), driven through the production loader with the raw two-phase aclnn
//! API (`api().fused`), independently of the backend's use of them.
//!
//! * Results: small hand-computed cases (exact, or within one ulp where the answer is not
//!   representable), and random cases against f64 references written here from the doc's
//!   formulas. Tolerances: a BF16/FP16 output is within one ulp of its dtype of the f64
//!   reference, an FP32 output within one f32 ulp; indices are exact.
//! * Phase-1 validation: one test per rule family, each checking the documented status code
//!   (161001 NULL, 161002 invalid) and that the message names the argument.
//! * SoC gating: `aclnnMhcPre` is refused on the 910B profile and runs on the 950 profile
//!   (in a child process: the profile is read once per process).
//! * Device-data faults surface at synchronize (507015): metadata generated for other
//!   parameters, missing metadata, a block id outside the key tensor, a position beyond the
//!   block table. Those run on a private stream so the backend's own stream stays healthy.

mod common;

use std::ffi::{c_char, CString};
use std::ptr;

use common::{assert_child_ok, f32_bytes, i32_bytes, run_child, Rng, CHILD_ENV};
use hal::backend::Backend;
use hal::{DType, Error, Op, Tensor};
use v4rt_ascend::loader::SearchConfig;
use v4rt_ascend::runtime::{DeviceBuffer, Stream};
use v4rt_ascend::sys::{self, aclOpExecutor, aclTensor, AclnnLaunchFn};
use v4rt_ascend::{AscendBackend, AscendStorage};

type Desc = *mut aclTensor;
const NULL: Desc = ptr::null_mut();
const P_NULL: i32 = sys::ACLNN_ERR_PARAM_NULLPTR;
const P_INVALID: i32 = sys::ACLNN_ERR_PARAM_INVALID;

fn backend() -> AscendBackend {
    common::use_emulator();
    AscendBackend::open(&SearchConfig::from_env(), 0)
        .unwrap_or_else(|e| panic!("emulated backend did not come up: {e}"))
}

fn acl_dtype(d: DType) -> sys::aclDataType {
    match d {
        DType::F32 => sys::ACL_FLOAT,
        DType::BF16 => sys::ACL_BF16,
        DType::F16 => sys::ACL_FLOAT16,
        DType::I32 => sys::ACL_INT32,
        other => panic!("no aclDataType mapping for {other} in this test"),
    }
}

/// Rounds `v` to `d` and encodes it (the test's inputs are exactly the rounded values).
fn encode(d: DType, v: &[f64]) -> Vec<u8> {
    match d {
        DType::F32 => f32_bytes(&v.iter().map(|&x| x as f32).collect::<Vec<_>>()),
        DType::BF16 => v.iter().flat_map(|&x| hal::dtype::f32_to_bf16(x as f32).to_le_bytes()).collect(),
        DType::F16 => v.iter().flat_map(|&x| half::f16::from_f32(x as f32).to_bits().to_le_bytes()).collect(),
        DType::I32 => i32_bytes(&v.iter().map(|&x| x as i32).collect::<Vec<_>>()),
        other => panic!("no encoder for {other}"),
    }
}

/// `v` as stored in `d` (what the op sees).
fn rounded(d: DType, v: &[f64]) -> Vec<f64> {
    hal::dtype::decode_to_f32(d, &encode(d, v)).into_iter().map(f64::from).collect()
}

/// One ulp of `d` at `x` (normal range).
fn ulp(d: DType, x: f64) -> f64 {
    let mantissa = match d {
        DType::BF16 => 7,
        DType::F16 => 10,
        DType::F32 => 23,
        other => panic!("no ulp for {other}"),
    };
    let x = x.abs().max(f64::MIN_POSITIVE);
    2f64.powi(x.log2().floor() as i32 - mantissa)
}

/// `got` within one ulp of `d` of the f64 reference `want`, elementwise.
fn assert_ulp(what: &str, d: DType, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= ulp(d, w), "{what}[{i}]: got {g}, want {w} (± one {d} ulp = {})", ulp(d, w));
    }
}

/// Device tensors, their descriptors and workspaces for one test; descriptors are destroyed
/// on drop.
struct Fx {
    be: AscendBackend,
    data: Vec<(Desc, Tensor)>,
    workspaces: Vec<DeviceBuffer>,
    strings: Vec<CString>,
}

impl Fx {
    fn new() -> Fx {
        let be = backend();
        be.runtime().bind(0).unwrap();
        Fx { be, data: Vec::new(), workspaces: Vec::new(), strings: Vec::new() }
    }

    fn api(&self) -> &v4rt_ascend::loader::Api {
        self.be.runtime().api()
    }

    fn fused(&self) -> sys::FusedOps {
        let f = self.api().fused;
        assert!(f.missing().is_empty(), "the emulator exports every fused op: {:?} missing", f.missing());
        f
    }

    /// A descriptor over `t` with explicit `shape` and `strides` (elements).
    fn describe(&mut self, t: Tensor, d: DType, shape: &[i64], strides: &[i64]) -> Desc {
        let ptr = t.storage().as_any().downcast_ref::<AscendStorage>().expect("ascend tensor").device_ptr();
        let storage = [t.shape().iter().product::<usize>() as i64];
        // SAFETY: arrays valid for the call; the data pointer is a device address ACL records.
        let desc = unsafe {
            (self.api().nnop.aclCreateTensor)(
                shape.as_ptr(),
                shape.len() as u64,
                acl_dtype(d),
                strides.as_ptr(),
                0,
                sys::ACL_FORMAT_ND,
                storage.as_ptr(),
                1,
                ptr.as_raw(),
            )
        };
        assert!(!desc.is_null(), "aclCreateTensor: {}", self.be.runtime().recent_error());
        self.data.push((desc, t));
        desc
    }

    /// Uploads `vals` rounded to `d`, as a contiguous tensor of `shape`.
    fn input(&mut self, d: DType, shape: &[i64], vals: &[f64]) -> Desc {
        assert_eq!(vals.len() as i64, shape.iter().product::<i64>(), "values for {shape:?}");
        let dims: Vec<usize> = shape.iter().map(|&s| s as usize).collect();
        let t = self.be.upload(&dims, d, &encode(d, vals)).unwrap();
        self.describe(t, d, shape, &contiguous(shape))
    }

    fn ints(&mut self, shape: &[i64], vals: &[i32]) -> Desc {
        self.input(DType::I32, shape, &vals.iter().map(|&v| v as f64).collect::<Vec<_>>())
    }

    /// A fresh (NaN-poisoned) output tensor.
    fn output(&mut self, d: DType, shape: &[i64]) -> Desc {
        let dims: Vec<usize> = shape.iter().map(|&s| s as usize).collect();
        let t = self.be.alloc(&dims, d).unwrap();
        self.describe(t, d, shape, &contiguous(shape))
    }

    /// A fresh output viewed with explicit `strides` over just enough storage.
    fn strided(&mut self, d: DType, shape: &[i64], strides: &[i64]) -> Desc {
        let elems = 1 + shape.iter().zip(strides).map(|(&n, &s)| (n - 1) * s).sum::<i64>();
        let t = self.be.alloc(&[elems as usize], d).unwrap();
        self.describe(t, d, shape, strides)
    }

    /// An output whose two trailing dims are transposed (non-contiguous unless one is 1).
    fn transposed(&mut self, d: DType, shape: &[i64]) -> Desc {
        let r = shape.len();
        let mut strides = contiguous(shape);
        strides[r - 1] = shape[r - 2];
        strides[r - 2] = 1;
        self.strided(d, shape, &strides)
    }

    /// A C string kept alive for the test.
    fn cstr(&mut self, s: &str) -> *mut c_char {
        self.strings.push(CString::new(s).unwrap());
        self.strings.last().unwrap().as_ptr() as *mut c_char
    }

    /// The values behind a descriptor (after all work issued on the backend's stream).
    fn get(&self, d: Desc) -> Vec<f64> {
        let (_, t) = self.data.iter().find(|(x, _)| *x == d).expect("descriptor of this fixture");
        let bytes = self.be.download(t).unwrap();
        match t.dtype() {
            // Exact for every i32 (an f32 detour is not).
            DType::I32 => bytes.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64).collect(),
            dt => hal::dtype::decode_to_f32(dt, &bytes).into_iter().map(f64::from).collect(),
        }
    }

    fn recent(&self) -> String {
        self.be.runtime().recent_error()
    }

    /// Phase 2 of a successful phase 1 on `stream` (the backend's when `None`), with a fresh
    /// workspace of the size asked for; returns the launch status.
    fn launch(
        &mut self,
        (code, ws, ex): (i32, u64, *mut aclOpExecutor),
        launch: AclnnLaunchFn,
        stream: Option<&Stream>,
    ) -> i32 {
        assert_eq!(code, 0, "phase 1: {}", self.recent());
        let w = self.be.pool().alloc(ws.max(1) as usize).unwrap();
        let raw = stream.map_or(self.be.stream().raw(), |s| s.raw());
        // SAFETY: the executor phase 1 returned, a live workspace of its size, a live stream.
        let status = unsafe { launch(w.ptr().as_raw(), ws, ex, raw) };
        self.workspaces.push(w);
        status
    }

    /// Expects phase 1 to fail with `code` and a message containing each of `needles`.
    fn refused(&self, (code, _, _): (i32, u64, *mut aclOpExecutor), want: i32, needles: &[&str]) {
        let msg = self.recent();
        assert_eq!(code, want, "status (message: {msg})");
        for n in needles {
            assert!(msg.contains(n), "message should name {n:?}: {msg}");
        }
    }

    /// A private stream whose faults do not poison the backend's stream; the backend's queued
    /// uploads are finished first (they are ordered on the backend's stream only).
    fn private_stream(&self) -> std::sync::Arc<Stream> {
        self.be.synchronize().unwrap();
        Stream::new(self.be.runtime().clone(), 0).unwrap()
    }
}

impl Drop for Fx {
    fn drop(&mut self) {
        let _ = self.be.synchronize();
        for (d, _) in &self.data {
            // SAFETY: live descriptors created by this fixture, destroyed once.
            unsafe { (self.api().nnop.aclDestroyTensor)(*d) };
        }
    }
}

fn contiguous(shape: &[i64]) -> Vec<i64> {
    (0..shape.len()).map(|i| shape[i + 1..].iter().product()).collect()
}

/// Expects a device fault at `stream`'s synchronize whose message contains each of `needles`.
fn faults(stream: &Stream, needles: &[&str]) {
    match stream.synchronize() {
        Err(Error::Device { code, message, .. }) => {
            assert_eq!(code, sys::ACL_ERROR_RT_AICORE_EXCEPTION as i64, "{message}");
            for n in needles {
                assert!(message.contains(n), "fault message should contain {n:?}: {message}");
            }
        }
        other => panic!("expected a kernel fault at synchronize, got {other:?}"),
    }
}

fn randoms(rng: &mut Rng, n: usize, scale: f64) -> Vec<f64> {
    rng.f32s(n, scale as f32).into_iter().map(f64::from).collect()
}

// ---------------------------------------------------------------- MhcPost

struct MhcPost {
    x: Desc,
    h_res: Desc,
    h_out: Desc,
    h_post: Desc,
    out: Desc,
}

impl MhcPost {
    fn phase1(&self, fx: &Fx) -> (i32, u64, *mut aclOpExecutor) {
        let (mut ws, mut ex) = (0u64, ptr::null_mut());
        // SAFETY: descriptors of the fixture (or NULL) and valid out-pointers.
        let code = unsafe {
            (fx.fused().MhcPost.unwrap().get_workspace_size)(
                self.x,
                self.h_res,
                self.h_out,
                self.h_post,
                self.out,
                &mut ws,
                &mut ex,
            )
        };
        (code, ws, ex)
    }
}

/// `out[t,k] = hPost[t,k]·hOut[t] + Σ_j hRes[t,j,k]·x[t,j]`, in f64.
fn mhc_post_ref(t: usize, n: usize, d: usize, x: &[f64], res: &[f64], hout: &[f64], post: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(t * n * d);
    for tt in 0..t {
        for k in 0..n {
            for dd in 0..d {
                let mut v = post[tt * n + k] * hout[tt * d + dd];
                for j in 0..n {
                    v += res[(tt * n + j) * n + k] * x[(tt * n + j) * d + dd];
                }
                out.push(v);
            }
        }
    }
    out
}

/// The hand-computed case: row j of hRes is the source stream.
fn mhc_post_by_hand(fx: &mut Fx) {
    let x = fx.input(DType::BF16, &[1, 2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let h_res = fx.input(DType::F32, &[1, 2, 2], &[0.5, 0.25, 0.5, 0.75]);
    let h_out = fx.input(DType::BF16, &[1, 2], &[10.0, 20.0]);
    let h_post = fx.input(DType::F32, &[1, 2], &[1.0, 0.5]);
    let out = fx.output(DType::BF16, &[1, 2, 2]);
    let call = MhcPost { x, h_res, h_out, h_post, out };
    let p1 = call.phase1(fx);
    assert_eq!(fx.launch(p1, fx.fused().MhcPost.unwrap().launch, None), 0, "{}", fx.recent());
    // out[0] = 1·[10,20] + 0.5·[1,2] + 0.5·[3,4]; out[1] = 0.5·[10,20] + 0.25·[1,2] + 0.75·[3,4].
    assert_eq!(fx.get(out), [12.0, 23.0, 7.5, 13.5]);
}

#[test]
fn mhc_post_by_hand_and_random() {
    let mut fx = Fx::new();
    mhc_post_by_hand(&mut fx);
    let mut rng = Rng::new(11);
    for (d_ty, t, n, d) in [(DType::BF16, 5, 4, 24), (DType::F16, 3, 3, 16)] {
        let x = rounded(d_ty, &randoms(&mut rng, t * n * d, 2.0));
        let res = rounded(DType::F32, &randoms(&mut rng, t * n * n, 1.0));
        let hout = rounded(d_ty, &randoms(&mut rng, t * d, 2.0));
        let post = rounded(DType::F32, &randoms(&mut rng, t * n, 1.0));
        let (ti, ni, di) = (t as i64, n as i64, d as i64);
        let call = MhcPost {
            x: fx.input(d_ty, &[ti, ni, di], &x),
            h_res: fx.input(DType::F32, &[ti, ni, ni], &res),
            h_out: fx.input(d_ty, &[ti, di], &hout),
            h_post: fx.input(DType::F32, &[ti, ni], &post),
            out: fx.output(d_ty, &[ti, ni, di]),
        };
        let p1 = call.phase1(&fx);
        assert_eq!(fx.launch(p1, fx.fused().MhcPost.unwrap().launch, None), 0);
        assert_ulp("mhc_post out", d_ty, &fx.get(call.out), &mhc_post_ref(t, n, d, &x, &res, &hout, &post));
    }
}

// ---------------------------------------------------------------- MhcPre

struct MhcPre {
    x: Desc,
    phi: Desc,
    alpha: Desc,
    bias: Desc,
    gamma: Desc,
    norm_eps: f64,
    hc_eps: f64,
    h_in: Desc,
    h_post: Desc,
    h_res: Desc,
    inv_rms: Desc,
    h_mix: Desc,
    h_pre: Desc,
}

impl MhcPre {
    fn phase1(&self, fx: &Fx) -> (i32, u64, *mut aclOpExecutor) {
        let (mut ws, mut ex) = (0u64, ptr::null_mut());
        let f = fx.fused().MhcPre.unwrap();
        // SAFETY: descriptors of the fixture (or NULL) and valid out-pointers.
        let code = unsafe {
            (f.get_workspace_size)(
                self.x,
                self.phi,
                self.alpha,
                self.bias,
                self.gamma,
                self.norm_eps,
                self.hc_eps,
                self.h_in,
                self.h_post,
                self.h_res,
                self.inv_rms,
                self.h_mix,
                self.h_pre,
                &mut ws,
                &mut ex,
            )
        };
        (code, ws, ex)
    }
}

/// A small MhcPre call (T=3, n=2, D=8), inputs random, with or without the optionals;
/// returns the call and its f64 reference outputs (hIn, hPost, hRes, invRms, hMix, hPre).
fn mhc_pre_case(fx: &mut Fx, optionals: bool) -> (MhcPre, [Vec<f64>; 6]) {
    let (t, n, d) = (3usize, 2usize, 8usize);
    let (nd, mix) = (n * d, n * n + 2 * n);
    let mut rng = Rng::new(if optionals { 21 } else { 22 });
    let x = rounded(DType::BF16, &randoms(&mut rng, t * nd, 3.0));
    let phi = rounded(DType::F32, &randoms(&mut rng, mix * nd, 0.5));
    let alpha = rounded(DType::F32, &[0.7, 1.3, 0.4]);
    let bias = rounded(DType::F32, &randoms(&mut rng, mix, 0.5));
    let gamma = if optionals {
        rounded(DType::F32, &randoms(&mut rng, nd, 0.5).iter().map(|g| 1.0 + g).collect::<Vec<_>>())
    } else {
        vec![1.0; nd]
    };
    let (norm_eps, hc_eps) = (1e-6, 1e-4);
    // Reference, term by term from the doc.
    let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
    let mut want: [Vec<f64>; 6] = Default::default();
    for tt in 0..t {
        let xr = &x[tt * nd..(tt + 1) * nd];
        let rho = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / nd as f64 + norm_eps).sqrt();
        let mu: Vec<f64> =
            (0..mix).map(|r| (0..nd).map(|c| phi[r * nd + c] * xr[c] * gamma[c]).sum::<f64>() * rho).collect();
        let pre: Vec<f64> = (0..n).map(|i| sig(alpha[0] * mu[i] + bias[i]) + hc_eps).collect();
        want[0].extend((0..d).map(|dd| (0..n).map(|i| pre[i] * xr[i * d + dd]).sum::<f64>()));
        want[1].extend((0..n).map(|i| 2.0 * sig(alpha[1] * mu[n + i] + bias[n + i])));
        want[2].extend((0..n * n).map(|jk| alpha[2] * mu[2 * n + jk] + bias[2 * n + jk]));
        want[3].push(rho);
        want[4].extend_from_slice(&mu);
        want[5].extend_from_slice(&pre);
    }
    let (ti, ni, di) = (t as i64, n as i64, d as i64);
    let (ndi, mixi) = (nd as i64, mix as i64);
    let call = MhcPre {
        x: fx.input(DType::BF16, &[ti, ni, di], &x),
        phi: fx.input(DType::F32, &[mixi, ndi], &phi),
        alpha: fx.input(DType::F32, &[3], &alpha),
        bias: fx.input(DType::F32, &[mixi], &bias),
        gamma: if optionals { fx.input(DType::F32, &[ndi], &gamma) } else { NULL },
        norm_eps,
        hc_eps,
        h_in: fx.output(DType::BF16, &[ti, di]),
        h_post: fx.output(DType::F32, &[ti, ni]),
        h_res: fx.output(DType::F32, &[ti, ni, ni]),
        inv_rms: if optionals { fx.output(DType::F32, &[ti]) } else { NULL },
        h_mix: if optionals { fx.output(DType::F32, &[ti, mixi]) } else { NULL },
        h_pre: if optionals { fx.output(DType::F32, &[ti, ni]) } else { NULL },
    };
    (call, want)
}

#[test]
fn mhc_pre_is_refused_on_910b() {
    let mut fx = Fx::new();
    let (call, _) = mhc_pre_case(&mut fx, true);
    let p1 = call.phase1(&fx);
    fx.refused(p1, P_INVALID, &["aclnnMhcPre is not supported on Ascend910B"]);
}

#[test]
fn mhc_pre_runs_on_950_and_fused_ops_are_accepted_there() {
    assert_child_ok(&run_child("soc950", &[("V4RT_EMU_SOC", "Ascend950PR")]));
}

/// MhcPre numerics and validation, on the 950 profile (child process).
fn mhc_pre_on_950() {
    let mut fx = Fx::new();
    for optionals in [true, false] {
        let (call, want) = mhc_pre_case(&mut fx, optionals);
        let p1 = call.phase1(&fx);
        assert_eq!(fx.launch(p1, fx.fused().MhcPre.unwrap().launch, None), 0, "{}", fx.recent());
        assert_ulp("hIn", DType::BF16, &fx.get(call.h_in), &want[0]);
        assert_ulp("hPost", DType::F32, &fx.get(call.h_post), &want[1]);
        assert_ulp("hRes", DType::F32, &fx.get(call.h_res), &want[2]);
        if optionals {
            assert_ulp("invRms", DType::F32, &fx.get(call.inv_rms), &want[3]);
            assert_ulp("hMix", DType::F32, &fx.get(call.h_mix), &want[4]);
            assert_ulp("hPre", DType::F32, &fx.get(call.h_pre), &want[5]);
        }
    }
    // Validation still applies on the 950: phi must be [n² + 2n, n·D].
    let (mut call, _) = mhc_pre_case(&mut fx, false);
    call.phi = fx.input(DType::F32, &[8, 15], &[0.0; 120]);
    let p1 = call.phase1(&fx);
    fx.refused(p1, P_INVALID, &["phi", "[8, 16]"]);
    let (mut call, _) = mhc_pre_case(&mut fx, false);
    call.h_post = NULL;
    let p1 = call.phase1(&fx);
    fx.refused(p1, P_NULL, &["hPost"]);
}

// ---------------------------------------------------------------- LightningIndexer

struct Indexer {
    query: Desc,
    key: Desc,
    weights: Desc,
    seq_q: Desc,
    seq_k: Desc,
    table: Desc,
    layout_q: *mut c_char,
    layout_k: *mut c_char,
    k: i64,
    mode: i64,
    return_values: bool,
    indices: Desc,
    values: Desc,
}

impl Indexer {
    fn phase1(&self, fx: &Fx) -> (i32, u64, *mut aclOpExecutor) {
        let (mut ws, mut ex) = (0u64, ptr::null_mut());
        let f = fx.fused().LightningIndexer.unwrap();
        // SAFETY: descriptors and C strings of the fixture (or NULL), valid out-pointers.
        let code = unsafe {
            (f.get_workspace_size)(
                self.query,
                self.key,
                self.weights,
                self.seq_q,
                self.seq_k,
                self.table,
                self.layout_q,
                self.layout_k,
                self.k,
                self.mode,
                i64::MAX,
                0,
                self.return_values,
                self.indices,
                self.values,
                &mut ws,
                &mut ex,
            )
        };
        (code, ws, ex)
    }
}

/// The hand-computed case: one batch of two queries over three keys in two blocks of 2 (the
/// table maps positions 0-1 to block 1, position 2 to block 0). Returns the call.
fn indexer_by_hand(fx: &mut Fx, table: &[i32]) -> Indexer {
    // key blocks: block 0 = [s2, unused], block 1 = [s0, s1]; s0 = [1,0], s1 = [0,1], s2 = [1,1].
    let key = fx.input(DType::BF16, &[2, 2, 1, 2], &[1.0, 1.0, 99.0, 99.0, 1.0, 0.0, 0.0, 1.0]);
    Indexer {
        query: fx.input(DType::BF16, &[2, 1, 2], &[2.0, 1.0, 1.0, -1.0]),
        key,
        weights: fx.input(DType::BF16, &[2, 1], &[1.0, 2.0]),
        seq_q: fx.ints(&[1], &[2]),
        seq_k: fx.ints(&[1], &[3]),
        table: fx.ints(&[1, 2], table),
        layout_q: fx.cstr("TND"),
        layout_k: fx.cstr("PA_BSND"),
        k: 3,
        mode: 3,
        return_values: true,
        indices: fx.output(DType::I32, &[2, 1, 3]),
        values: fx.output(DType::F32, &[2, 1, 3]),
    }
}

fn check_indexer_by_hand(fx: &mut Fx) {
    let call = indexer_by_hand(fx, &[1, 0]);
    let p1 = call.phase1(fx);
    assert_eq!(fx.launch(p1, fx.fused().LightningIndexer.unwrap().launch, None), 0, "{}", fx.recent());
    // Query 0 sees s < 3 − 2 + 0 + 1 = 2: scores s0 = ReLU(2) = 2, s1 = 1; one slot padded.
    // Query 1 sees all three: s0 = 2·ReLU(1) = 2, s1 = 2·ReLU(−1) = 0, s2 = 2·ReLU(0) = 0 (tie:
    // the lower position first).
    assert_eq!(fx.get(call.indices), [0.0, 1.0, -1.0, 0.0, 1.0, 2.0]);
    assert_eq!(fx.get(call.values), [2.0, 1.0, f64::NEG_INFINITY, 2.0, 0.0, 0.0]);
}

#[test]
fn lightning_indexer_by_hand() {
    let mut fx = Fx::new();
    check_indexer_by_hand(&mut fx);
    // returnValues = false: sparseValuesOut may be NULL and only the indices are written.
    let mut call = indexer_by_hand(&mut fx, &[1, 0]);
    call.return_values = false;
    call.values = NULL;
    let p1 = call.phase1(&fx);
    assert_eq!(fx.launch(p1, fx.fused().LightningIndexer.unwrap().launch, None), 0, "{}", fx.recent());
    assert_eq!(fx.get(call.indices), [0.0, 1.0, -1.0, 0.0, 1.0, 2.0]);
}

/// Independent reference: (indices, values) rows of K for the given batches.
#[allow(clippy::too_many_arguments)]
fn indexer_ref(
    q: &[f64],
    w: &[f64],
    keys: &[Vec<Vec<f64>>],
    ends: &[usize],
    key_lens: &[usize],
    heads: usize,
    d: usize,
    k: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (mut idx, mut val) = (Vec::new(), Vec::new());
    let mut start = 0;
    for (b, &end) in ends.iter().enumerate() {
        let (s1, s2) = ((end - start) as i64, key_lens[b] as i64);
        for (i, t) in (start..end).enumerate() {
            let visible = (s2 - s1 + i as i64 + 1).clamp(0, s2) as usize;
            let mut scored: Vec<(f64, usize)> = (0..visible)
                .map(|s| {
                    let sc = (0..heads)
                        .map(|g| {
                            w[t * heads + g]
                                * (0..d).map(|c| q[(t * heads + g) * d + c] * keys[b][s][c]).sum::<f64>().max(0.0)
                        })
                        .sum::<f64>();
                    (sc, s)
                })
                .collect();
            scored.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
            for j in 0..k {
                match scored.get(j) {
                    Some(&(sc, s)) => {
                        idx.push(s as f64);
                        val.push(sc);
                    }
                    None => {
                        idx.push(-1.0);
                        val.push(f64::NEG_INFINITY);
                    }
                }
            }
        }
        start = end;
    }
    (idx, val)
}

#[test]
fn lightning_indexer_random_batches() {
    let mut fx = Fx::new();
    let mut rng = Rng::new(31);
    // Two batches (3 and 2 queries; 7 and 1 keys), 3 heads, D = 16, blocks of 4 shuffled.
    let (heads, d, bs, k) = (3usize, 16usize, 4usize, 5usize);
    let (ends, key_lens) = ([3usize, 5], [7usize, 1]);
    let t = 5;
    let blocks = 4;
    let table = [[2i32, 0], [3, 1]];
    let kv = rounded(DType::BF16, &randoms(&mut rng, blocks * bs * d, 1.0));
    let keys: Vec<Vec<Vec<f64>>> = (0..2)
        .map(|b| {
            (0..key_lens[b])
                .map(|s| {
                    let (blk, row) = (table[b][s / bs] as usize, s % bs);
                    kv[(blk * bs + row) * d..(blk * bs + row + 1) * d].to_vec()
                })
                .collect()
        })
        .collect();
    let q = rounded(DType::BF16, &randoms(&mut rng, t * heads * d, 1.0));
    let w = rounded(DType::BF16, &randoms(&mut rng, t * heads, 1.0));
    let (want_idx, want_val) = indexer_ref(&q, &w, &keys, &ends, &key_lens, heads, d, k);
    let (ti, hi, di) = (t as i64, heads as i64, d as i64);
    let call = Indexer {
        query: fx.input(DType::BF16, &[ti, hi, di], &q),
        key: fx.input(DType::BF16, &[blocks as i64, bs as i64, 1, di], &kv),
        weights: fx.input(DType::BF16, &[ti, hi], &w),
        seq_q: fx.ints(&[2], &[3, 5]),
        seq_k: fx.ints(&[2], &[7, 1]),
        table: fx.ints(&[2, 2], &[2, 0, 3, 1]),
        layout_q: fx.cstr("TND"),
        layout_k: fx.cstr("PA_BSND"),
        k: k as i64,
        mode: 3,
        return_values: true,
        indices: fx.output(DType::I32, &[ti, 1, k as i64]),
        values: fx.output(DType::F32, &[ti, 1, k as i64]),
    };
    let p1 = call.phase1(&fx);
    assert_eq!(fx.launch(p1, fx.fused().LightningIndexer.unwrap().launch, None), 0, "{}", fx.recent());
    assert_eq!(fx.get(call.indices), want_idx);
    let got = fx.get(call.values);
    for (i, (&g, &w)) in got.iter().zip(&want_val).enumerate() {
        if w.is_infinite() {
            assert_eq!(g, w, "values[{i}]");
        } else {
            assert!((g - w).abs() <= ulp(DType::F32, w), "values[{i}]: {g} vs {w}");
        }
    }
}

#[test]
fn lightning_indexer_validation() {
    let mut fx = Fx::new();
    // NULL where required → 161001.
    let mut call = indexer_by_hand(&mut fx, &[1, 0]);
    call.table = NULL;
    fx.refused(call.phase1(&fx), P_NULL, &["blockTableOptional"]);
    let mut call = indexer_by_hand(&mut fx, &[1, 0]);
    call.values = NULL;
    fx.refused(call.phase1(&fx), P_NULL, &["sparseValuesOut", "returnValues"]);
    let mut call = indexer_by_hand(&mut fx, &[1, 0]);
    call.layout_q = ptr::null_mut();
    fx.refused(call.phase1(&fx), P_NULL, &["layoutQueryOptional"]);
    // Layout strings and modes.
    let mut call = indexer_by_hand(&mut fx, &[1, 0]);
    call.layout_q = fx.cstr("BSND");
    fx.refused(call.phase1(&fx), P_INVALID, &["layoutQueryOptional", "BSND"]);
    let mut call = indexer_by_hand(&mut fx, &[1, 0]);
    call.layout_k = fx.cstr("TND");
    fx.refused(call.phase1(&fx), P_INVALID, &["layoutKeyOptional"]);
    let mut call = indexer_by_hand(&mut fx, &[1, 0]);
    call.mode = 0;
    fx.refused(call.phase1(&fx), P_INVALID, &["sparseMode 0"]);
    let mut call = indexer_by_hand(&mut fx, &[1, 0]);
    call.k = 0;
    fx.refused(call.phase1(&fx), P_INVALID, &["sparseCount"]);
    // Dtypes: INT32 indices, FP32 values, key = query.
    let mut call = indexer_by_hand(&mut fx, &[1, 0]);
    call.indices = fx.output(DType::F32, &[2, 1, 3]);
    fx.refused(call.phase1(&fx), P_INVALID, &["sparseIndicesOut", "dtype"]);
    let mut call = indexer_by_hand(&mut fx, &[1, 0]);
    call.key = fx.input(DType::F16, &[2, 2, 1, 2], &[0.0; 8]);
    fx.refused(call.phase1(&fx), P_INVALID, &["key", "differs from query"]);
    let mut call = indexer_by_hand(&mut fx, &[1, 0]);
    call.seq_q = fx.input(DType::F32, &[1], &[2.0]);
    fx.refused(call.phase1(&fx), P_INVALID, &["actualSeqLengthsQueryOptional"]);
    // Shapes: block table rows = batches, indices [T, 1, K], key [blocks, bs, 1, D].
    let mut call = indexer_by_hand(&mut fx, &[1, 0]);
    call.table = fx.ints(&[2, 2], &[1, 0, 1, 0]);
    fx.refused(call.phase1(&fx), P_INVALID, &["blockTableOptional", "2 rows for 1 batches"]);
    let mut call = indexer_by_hand(&mut fx, &[1, 0]);
    call.indices = fx.output(DType::I32, &[2, 1, 4]);
    fx.refused(call.phase1(&fx), P_INVALID, &["sparseIndicesOut", "[2, 1, 3]"]);
    let mut call = indexer_by_hand(&mut fx, &[1, 0]);
    call.key = fx.input(DType::BF16, &[1, 2, 2, 2], &[0.0; 8]);
    fx.refused(call.phase1(&fx), P_INVALID, &["key", "[1, 2, 1, 2]"]);
    // Contiguity.
    let mut call = indexer_by_hand(&mut fx, &[1, 0]);
    call.indices = fx.strided(DType::I32, &[2, 1, 3], &[6, 3, 1]);
    let p1 = call.phase1(&fx);
    fx.refused(p1, P_INVALID, &["sparseIndicesOut", "non-contiguous"]);
}

#[test]
fn lightning_indexer_bad_block_ids_fault_at_synchronize() {
    let mut fx = Fx::new();
    let launch = fx.fused().LightningIndexer.unwrap().launch;
    // Block id 5 of a 2-block key tensor.
    let call = indexer_by_hand(&mut fx, &[1, 5]);
    let s = fx.private_stream();
    let p1 = call.phase1(&fx);
    assert_eq!(fx.launch(p1, launch, Some(&s)), 0, "phase 2 cannot see device data");
    faults(&s, &["aclnnLightningIndexer", "batch 0", "key index 2", "block id 5"]);
    // A key length beyond the table (3 keys, a one-block table of blockSize 2).
    let mut call = indexer_by_hand(&mut fx, &[1, 0]);
    call.table = fx.ints(&[1, 1], &[1]);
    let s = fx.private_stream();
    let p1 = call.phase1(&fx);
    assert_eq!(fx.launch(p1, launch, Some(&s)), 0);
    faults(&s, &["aclnnLightningIndexer", "batch 0", "key index 2", "beyond the block table"]);
    // The backend's own stream is unaffected.
    check_indexer_by_hand(&mut fx);
}

// ---------------------------------------------------------------- SparseFlashMla(+Metadata)

const D: usize = 512;

struct Metadata {
    cu_q: Desc,
    heads_q: i64,
    heads_kv: i64,
    head_dim: i64,
    batch: i64,
    cmp_ratio: i64,
    win_left: i64,
    layout_q: *mut c_char,
    layout_kv: *mut c_char,
    has_ori: bool,
    has_cmp: bool,
    meta: Desc,
}

impl Metadata {
    fn phase1(&self, fx: &Fx) -> (i32, u64, *mut aclOpExecutor) {
        let (mut ws, mut ex) = (0u64, ptr::null_mut());
        let f = fx.fused().SparseFlashMlaMetadata.unwrap();
        let n = NULL as *const aclTensor;
        // SAFETY: descriptors and C strings of the fixture (or NULL), valid out-pointers.
        let code = unsafe {
            (f.get_workspace_size)(
                self.cu_q,
                n,
                n,
                n,
                n,
                n,
                n,
                n,
                n,
                self.heads_q,
                self.heads_kv,
                self.head_dim,
                self.batch,
                1,
                64,
                self.cmp_ratio,
                0,
                0,
                self.win_left,
                0,
                self.layout_q,
                self.layout_kv,
                self.has_ori,
                self.has_cmp,
                self.meta,
                &mut ws,
                &mut ex,
            )
        };
        (code, ws, ex)
    }
}

struct Mla {
    q: Desc,
    ori_kv: Desc,
    cmp_kv: Desc,
    ori_idx: Desc,
    cmp_idx: Desc,
    ori_table: Desc,
    cmp_table: Desc,
    cu_q: Desc,
    sinks: Desc,
    meta: Desc,
    scale: f64,
    cmp_ratio: i64,
    win_left: i64,
    layout_q: *mut c_char,
    layout_kv: *mut c_char,
    topk_value_mode: i64,
    out: Desc,
}

impl Mla {
    fn phase1(&self, fx: &Fx) -> (i32, u64, *mut aclOpExecutor) {
        let (mut ws, mut ex) = (0u64, ptr::null_mut());
        let f = fx.fused().SparseFlashMla.unwrap();
        let n = NULL as *const aclTensor;
        // SAFETY: descriptors and C strings of the fixture (or NULL), valid out-pointers.
        let code = unsafe {
            (f.get_workspace_size)(
                self.q,
                self.ori_kv,
                self.cmp_kv,
                self.ori_idx,
                self.cmp_idx,
                self.ori_table,
                self.cmp_table,
                self.cu_q,
                n,
                n,
                n,
                n,
                n,
                n,
                n,
                n,
                self.sinks,
                self.meta,
                self.scale,
                self.cmp_ratio,
                0,
                0,
                self.win_left,
                0,
                self.layout_q,
                self.layout_kv,
                self.topk_value_mode,
                false,
                self.out,
                NULL,
                &mut ws,
                &mut ex,
            )
        };
        (code, ws, ex)
    }

    /// The metadata call matching this one's parameters (`heads_q` heads, `batch` batches).
    fn metadata(&self, fx: &mut Fx, heads_q: i64, batch: i64) -> Metadata {
        Metadata {
            cu_q: self.cu_q,
            heads_q,
            heads_kv: 1,
            head_dim: D as i64,
            batch,
            cmp_ratio: self.cmp_ratio,
            win_left: self.win_left,
            layout_q: fx.cstr("TND"),
            layout_kv: fx.cstr("PA_BSND"),
            has_ori: !self.ori_kv.is_null(),
            has_cmp: !self.cmp_kv.is_null(),
            meta: self.meta,
        }
    }
}

fn unit(i: usize, scale: f64) -> Vec<f64> {
    let mut v = vec![0.0; D];
    v[i] = scale;
    v
}

/// The hand-computed case: one query, two heads, q = 0 (all logits 0); ori key k0 = e0 at
/// position 0, cmp key k1 = 2·e1 at position 3 (blockSize 2, cmp table [[1, 0]] → block 0,
/// row 1); every other kv row is 100s so a wrong lookup shows. Head 0 has sink 0, head 1 a
/// sink of −1e4 (no weight): o₀ = (k0 + k1)/3, o₁ = (k0 + k1)/2.
fn mla_by_hand(fx: &mut Fx, cmp_table: &[i32]) -> Mla {
    let filler = vec![100.0; D];
    let ori_kv: Vec<f64> = [unit(0, 1.0), filler.clone(), filler.clone(), filler.clone()].concat();
    let cmp_kv: Vec<f64> = [filler.clone(), unit(1, 2.0), filler.clone(), filler].concat();
    Mla {
        q: fx.input(DType::BF16, &[1, 2, D as i64], &[0.0; 2 * D]),
        ori_kv: fx.input(DType::BF16, &[1, 4, 1, D as i64], &ori_kv),
        cmp_kv: fx.input(DType::BF16, &[2, 2, 1, D as i64], &cmp_kv),
        ori_idx: fx.ints(&[1, 1, 2], &[0, -1]),
        cmp_idx: fx.ints(&[1, 1, 2], &[-1, 3]),
        ori_table: fx.ints(&[1, 1], &[0]),
        cmp_table: fx.ints(&[1, 2], cmp_table),
        cu_q: fx.ints(&[2], &[0, 1]),
        sinks: fx.input(DType::F32, &[2], &[0.0, -1e4]),
        meta: fx.output(DType::I32, &[1024]),
        scale: 0.5,
        cmp_ratio: 4,
        win_left: 127,
        layout_q: fx.cstr("TND"),
        layout_kv: fx.cstr("PA_BSND"),
        topk_value_mode: 0,
        out: fx.output(DType::BF16, &[1, 2, D as i64]),
    }
}

/// Metadata then the main op, both on `stream` (in stream order, no synchronize between).
fn run_mla(fx: &mut Fx, call: &Mla, meta: &Metadata, stream: Option<&Stream>) {
    let f = fx.fused();
    let p1 = meta.phase1(fx);
    assert_eq!(fx.launch(p1, f.SparseFlashMlaMetadata.unwrap().launch, stream), 0, "{}", fx.recent());
    let p1 = call.phase1(fx);
    assert_eq!(fx.launch(p1, f.SparseFlashMla.unwrap().launch, stream), 0, "{}", fx.recent());
}

#[test]
fn sparse_flash_mla_by_hand() {
    let mut fx = Fx::new();
    let call = mla_by_hand(&mut fx, &[1, 0]);
    let meta = call.metadata(&mut fx, 2, 1);
    run_mla(&mut fx, &call, &meta, None);
    let got = fx.get(call.out);
    let mut want = vec![0.0; 2 * D];
    (want[0], want[1]) = (1.0 / 3.0, 2.0 / 3.0);
    (want[D], want[D + 1]) = (0.5, 1.0);
    assert_ulp("attnOut", DType::BF16, &got, &want);
    // The metadata is device data: a magic word, then the digest.
    assert_eq!(fx.get(meta.meta)[0] as i64, 0x5346_4D44);
}

/// Independent reference of the attention for one query/head over its key list.
fn attention_ref(q: &[f64], keys: &[Vec<f64>], scale: f64, sink: f64) -> Vec<f64> {
    if keys.is_empty() {
        return vec![0.0; D];
    }
    let logits: Vec<f64> = keys.iter().map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() * scale).collect();
    let m = logits.iter().fold(sink, |a, &b| a.max(b));
    let denom: f64 = logits.iter().map(|l| (l - m).exp()).sum::<f64>() + (sink - m).exp();
    (0..D).map(|c| keys.iter().zip(&logits).map(|(k, l)| (l - m).exp() * k[c]).sum::<f64>() / denom).collect()
}

#[test]
fn sparse_flash_mla_random_batches() {
    let mut fx = Fx::new();
    let mut rng = Rng::new(41);
    // 4 tokens in 2 batches (1 + 3), 3 heads; ori: 2 blocks of 4; cmp: 3 blocks of 2.
    let (t, heads) = (4usize, 3usize);
    let batch_of = [0usize, 1, 1, 1];
    let ori_tables = [[1i32, 0], [0, 1]];
    let cmp_tables = [[2i32, 0], [1, 2]];
    let ori_kv = rounded(DType::BF16, &randoms(&mut rng, 2 * 4 * D, 1.0));
    let cmp_kv = rounded(DType::BF16, &randoms(&mut rng, 3 * 2 * D, 1.0));
    let ori_idx: Vec<i32> = vec![0, 5, -1, 7, 3, -1, -1, -1, 2, 1, 0, 4, 6, 6, -1, 1];
    let cmp_idx: Vec<i32> = vec![3, -1, 0, -1, -1, -1, 1, 2, 0, 2, -1, 3];
    let (ko, kc) = (4usize, 3usize);
    let q = rounded(DType::BF16, &randoms(&mut rng, t * heads * D, 1.0));
    let sinks = rounded(DType::F32, &[0.3, -2.0, 1.5]);
    let scale = 1.0 / (D as f64).sqrt() * 4.0;
    let row = |kv: &[f64], bs: usize, table: &[i32; 2], p: usize| {
        let r = table[p / bs] as usize * bs + p % bs;
        kv[r * D..(r + 1) * D].to_vec()
    };
    let mut want = Vec::new();
    for tt in 0..t {
        let b = batch_of[tt];
        let mut keys: Vec<Vec<f64>> = Vec::new();
        keys.extend(
            ori_idx[tt * ko..(tt + 1) * ko]
                .iter()
                .filter(|&&p| p != -1)
                .map(|&p| row(&ori_kv, 4, &ori_tables[b], p as usize)),
        );
        keys.extend(
            cmp_idx[tt * kc..(tt + 1) * kc]
                .iter()
                .filter(|&&p| p != -1)
                .map(|&p| row(&cmp_kv, 2, &cmp_tables[b], p as usize)),
        );
        for h in 0..heads {
            want.extend(attention_ref(&q[(tt * heads + h) * D..(tt * heads + h + 1) * D], &keys, scale, sinks[h]));
        }
    }
    let (ti, hi, di) = (t as i64, heads as i64, D as i64);
    let call = Mla {
        q: fx.input(DType::BF16, &[ti, hi, di], &q),
        ori_kv: fx.input(DType::BF16, &[2, 4, 1, di], &ori_kv),
        cmp_kv: fx.input(DType::BF16, &[3, 2, 1, di], &cmp_kv),
        ori_idx: fx.ints(&[ti, 1, ko as i64], &ori_idx),
        cmp_idx: fx.ints(&[ti, 1, kc as i64], &cmp_idx),
        ori_table: fx.ints(&[2, 2], &ori_tables.concat()),
        cmp_table: fx.ints(&[2, 2], &cmp_tables.concat()),
        cu_q: fx.ints(&[3], &[0, 1, 4]),
        sinks: fx.input(DType::F32, &[hi], &sinks),
        meta: fx.output(DType::I32, &[1024]),
        scale,
        cmp_ratio: 4,
        win_left: 127,
        layout_q: fx.cstr("TND"),
        layout_kv: fx.cstr("PA_BSND"),
        topk_value_mode: 0,
        out: fx.output(DType::BF16, &[ti, hi, di]),
    };
    let meta = call.metadata(&mut fx, hi, 2);
    run_mla(&mut fx, &call, &meta, None);
    assert_ulp("attnOut", DType::BF16, &fx.get(call.out), &want);

    // Ori only, no sinks, and a token whose every index is −1 (zeros).
    let mut ori_only = call;
    ori_only.cmp_kv = NULL;
    ori_only.cmp_idx = NULL;
    ori_only.cmp_table = NULL;
    ori_only.sinks = NULL;
    let idx: Vec<i32> = vec![-1, -1, -1, -1, 1, 2, -1, -1, 0, 0, 0, 0, 3, -1, 2, -1];
    ori_only.ori_idx = fx.ints(&[ti, 1, ko as i64], &idx);
    ori_only.meta = fx.output(DType::I32, &[1024]);
    ori_only.out = fx.output(DType::BF16, &[ti, hi, di]);
    let mut want = Vec::new();
    for tt in 0..t {
        let keys: Vec<Vec<f64>> = idx[tt * ko..(tt + 1) * ko]
            .iter()
            .filter(|&&p| p != -1)
            .map(|&p| row(&ori_kv, 4, &ori_tables[batch_of[tt]], p as usize))
            .collect();
        for h in 0..heads {
            want.extend(attention_ref(
                &q[(tt * heads + h) * D..(tt * heads + h + 1) * D],
                &keys,
                scale,
                f64::NEG_INFINITY,
            ));
        }
    }
    let meta = ori_only.metadata(&mut fx, hi, 2);
    run_mla(&mut fx, &ori_only, &meta, None);
    let got = fx.get(ori_only.out);
    assert!(got[..heads * D].iter().all(|&v| v == 0.0), "no keys → zeros");
    assert_ulp("attnOut (ori only)", DType::BF16, &got, &want);
}

#[test]
fn sparse_flash_mla_validation() {
    let mut fx = Fx::new();
    // Documented limits on the metadata op: numHeadsKv = 1, headDim = 512, numHeadsQ ∈ [1, 128].
    let call = mla_by_hand(&mut fx, &[1, 0]);
    for (field, value, needle) in
        [("kv", 2, "numHeadsKv 2"), ("dim", 256, "headDim 256"), ("q", 129, "numHeadsQ 129"), ("q", 0, "numHeadsQ 0")]
    {
        let mut m = call.metadata(&mut fx, 2, 1);
        match field {
            "kv" => m.heads_kv = value,
            "dim" => m.head_dim = value,
            _ => m.heads_q = value,
        }
        fx.refused(m.phase1(&fx), P_INVALID, &[needle]);
    }
    let mut m = call.metadata(&mut fx, 2, 1);
    m.meta = NULL;
    fx.refused(m.phase1(&fx), P_NULL, &["metaData"]);
    let mut m = call.metadata(&mut fx, 2, 1);
    m.meta = fx.output(DType::I32, &[512]);
    fx.refused(m.phase1(&fx), P_INVALID, &["metaData", "[1024]"]);
    let mut m = call.metadata(&mut fx, 2, 1);
    m.layout_kv = ptr::null_mut();
    fx.refused(m.phase1(&fx), P_NULL, &["layoutKv"]);
    let mut m = call.metadata(&mut fx, 2, 1);
    m.batch = 3;
    fx.refused(m.phase1(&fx), P_INVALID, &["cuSeqlensQOptional", "[4]"]);
    // The same limits on the main op, from the shapes.
    let mut c = mla_by_hand(&mut fx, &[1, 0]);
    c.q = fx.input(DType::BF16, &[1, 2, 256], &[0.0; 512]);
    fx.refused(c.phase1(&fx), P_INVALID, &["q", "headDim 256"]);
    let mut c = mla_by_hand(&mut fx, &[1, 0]);
    c.q = fx.input(DType::BF16, &[1, 129, D as i64], &vec![0.0; 129 * D]);
    fx.refused(c.phase1(&fx), P_INVALID, &["q", "numHeadsQ 129"]);
    let mut c = mla_by_hand(&mut fx, &[1, 0]);
    c.ori_kv = fx.input(DType::BF16, &[1, 2, 2, D as i64], &vec![0.0; 4 * D]);
    fx.refused(c.phase1(&fx), P_INVALID, &["oriKvOptional", "[1, 2, 1, 512]"]);
    // Dtypes.
    let mut c = mla_by_hand(&mut fx, &[1, 0]);
    c.q = fx.input(DType::F32, &[1, 2, D as i64], &[0.0; 2 * D]);
    fx.refused(c.phase1(&fx), P_INVALID, &["q", "dtype"]);
    let mut c = mla_by_hand(&mut fx, &[1, 0]);
    c.sinks = fx.input(DType::BF16, &[2], &[0.0; 2]);
    fx.refused(c.phase1(&fx), P_INVALID, &["sinksOptional"]);
    let mut c = mla_by_hand(&mut fx, &[1, 0]);
    c.out = fx.output(DType::F16, &[1, 2, D as i64]);
    fx.refused(c.phase1(&fx), P_INVALID, &["attnOutOut", "differs from q"]);
    // ori and cmp come as whole (kv, indices, block table) triples; at least one.
    let mut c = mla_by_hand(&mut fx, &[1, 0]);
    c.cmp_idx = NULL;
    fx.refused(
        c.phase1(&fx),
        P_INVALID,
        &["cmpKvOptional", "given: cmpKvOptional, cmpBlockTableOptional; NULL: cmpSparseIndicesOptional"],
    );
    let mut c = mla_by_hand(&mut fx, &[1, 0]);
    (c.ori_kv, c.ori_idx, c.ori_table, c.cmp_kv, c.cmp_idx, c.cmp_table) = (NULL, NULL, NULL, NULL, NULL, NULL);
    fx.refused(c.phase1(&fx), P_INVALID, &["neither ori"]);
    // Block table rows = batches (cuSeqlensQ has B + 1 entries).
    let mut c = mla_by_hand(&mut fx, &[1, 0]);
    c.ori_table = fx.ints(&[2, 1], &[0, 0]);
    fx.refused(c.phase1(&fx), P_INVALID, &["oriBlockTableOptional", "2 rows for 1 batches"]);
    // Required tensors, layouts, modes.
    let mut c = mla_by_hand(&mut fx, &[1, 0]);
    c.cu_q = NULL;
    fx.refused(c.phase1(&fx), P_NULL, &["cuSeqlensQOptional"]);
    let mut c = mla_by_hand(&mut fx, &[1, 0]);
    c.layout_q = fx.cstr("BSND");
    fx.refused(c.phase1(&fx), P_INVALID, &["layoutQ", "BSND"]);
    let mut c = mla_by_hand(&mut fx, &[1, 0]);
    c.layout_kv = ptr::null_mut();
    fx.refused(c.phase1(&fx), P_NULL, &["layoutKv"]);
    let mut c = mla_by_hand(&mut fx, &[1, 0]);
    c.topk_value_mode = 1;
    fx.refused(c.phase1(&fx), P_INVALID, &["topkValueMode"]);
    // Contiguity.
    let mut c = mla_by_hand(&mut fx, &[1, 0]);
    c.ori_table = fx.transposed(DType::I32, &[1, 1]);
    assert_eq!(c.phase1(&fx).0, 0, "a [1, 1] view is contiguous whatever its strides: {}", fx.recent());
    let mut c = mla_by_hand(&mut fx, &[1, 0]);
    c.out = fx.transposed(DType::BF16, &[1, 2, D as i64]);
    fx.refused(c.phase1(&fx), P_INVALID, &["attnOutOut", "non-contiguous"]);
}

#[test]
fn sparse_flash_mla_metadata_is_checked_at_synchronize() {
    let mut fx = Fx::new();
    let launch = fx.fused().SparseFlashMla.unwrap().launch;
    // Metadata generated for 4 heads, used by a 2-head call: both phase 1s and launches pass
    // (the metadata is device data), the main kernel faults.
    let call = mla_by_hand(&mut fx, &[1, 0]);
    let meta = call.metadata(&mut fx, 4, 1);
    let s = fx.private_stream();
    run_mla(&mut fx, &call, &meta, Some(&s));
    faults(&s, &["aclnnSparseFlashMla", "metadataOptional", "numHeadsQ 4 (metadata) vs 2 (this call)"]);
    // Metadata for ori + cmp, used without cmp keys.
    let call = mla_by_hand(&mut fx, &[1, 0]);
    let meta = call.metadata(&mut fx, 2, 1);
    let mut ori_only = mla_by_hand(&mut fx, &[1, 0]);
    (ori_only.cmp_kv, ori_only.cmp_idx, ori_only.cmp_table, ori_only.meta) = (NULL, NULL, NULL, call.meta);
    let s = fx.private_stream();
    let p1 = meta.phase1(&fx);
    assert_eq!(fx.launch(p1, fx.fused().SparseFlashMlaMetadata.unwrap().launch, Some(&s)), 0);
    let p1 = ori_only.phase1(&fx);
    assert_eq!(fx.launch(p1, launch, Some(&s)), 0);
    faults(&s, &["hasCmpKv 1 (metadata) vs 0 (this call)"]);
    // Never-written metadata (the allocation's poison): no magic word.
    let call = mla_by_hand(&mut fx, &[1, 0]);
    let s = fx.private_stream();
    let p1 = call.phase1(&fx);
    assert_eq!(fx.launch(p1, launch, Some(&s)), 0);
    faults(&s, &["not written by aclnnSparseFlashMlaMetadata"]);
    // No metadata at all: accepted by phase 1, a fault when the kernel runs.
    let mut call = mla_by_hand(&mut fx, &[1, 0]);
    call.meta = NULL;
    let s = fx.private_stream();
    let p1 = call.phase1(&fx);
    assert_eq!(fx.launch(p1, launch, Some(&s)), 0);
    faults(&s, &["metadataOptional is NULL"]);
}

#[test]
fn sparse_flash_mla_bad_block_ids_fault_at_synchronize() {
    let mut fx = Fx::new();
    // cmp position 3 → cmpBlockTable[0, 1] = 7, outside the 2 cmp blocks.
    let call = mla_by_hand(&mut fx, &[1, 7]);
    let meta = call.metadata(&mut fx, 2, 1);
    let s = fx.private_stream();
    run_mla(&mut fx, &call, &meta, Some(&s));
    faults(&s, &["aclnnSparseFlashMla", "cmp: batch 0, key index 3", "block id 7"]);
    // An ori index beyond the one-block table (blockSize 4).
    let mut call = mla_by_hand(&mut fx, &[1, 0]);
    call.ori_idx = fx.ints(&[1, 1, 2], &[0, 4]);
    let meta = call.metadata(&mut fx, 2, 1);
    let s = fx.private_stream();
    run_mla(&mut fx, &call, &meta, Some(&s));
    faults(&s, &["ori: batch 0, key index 4", "beyond the block table"]);
    // The backend's stream still works.
    let call = mla_by_hand(&mut fx, &[1, 0]);
    let meta = call.metadata(&mut fx, 2, 1);
    run_mla(&mut fx, &call, &meta, None);
    assert!(fx.get(call.out)[0] > 0.3);
}

// ---------------------------------------------------------------- MhcPost validation

#[test]
fn mhc_post_validation() {
    let mut fx = Fx::new();
    let good = |fx: &mut Fx| MhcPost {
        x: fx.input(DType::BF16, &[1, 2, 2], &[0.0; 4]),
        h_res: fx.input(DType::F32, &[1, 2, 2], &[0.0; 4]),
        h_out: fx.input(DType::BF16, &[1, 2], &[0.0; 2]),
        h_post: fx.input(DType::F32, &[1, 2], &[0.0; 2]),
        out: fx.output(DType::BF16, &[1, 2, 2]),
    };
    assert_eq!(good(&mut fx).phase1(&fx).0, 0);
    let mut c = good(&mut fx);
    c.x = NULL;
    fx.refused(c.phase1(&fx), P_NULL, &["x is nullptr"]);
    let mut c = good(&mut fx);
    c.x = fx.input(DType::F32, &[1, 2, 2], &[0.0; 4]);
    fx.refused(c.phase1(&fx), P_INVALID, &["x: dtype"]);
    let mut c = good(&mut fx);
    c.h_res = fx.input(DType::BF16, &[1, 2, 2], &[0.0; 4]);
    fx.refused(c.phase1(&fx), P_INVALID, &["hRes: dtype"]);
    let mut c = good(&mut fx);
    c.h_out = fx.input(DType::F16, &[1, 2], &[0.0; 2]);
    fx.refused(c.phase1(&fx), P_INVALID, &["hOut", "differs from x"]);
    let mut c = good(&mut fx);
    c.h_res = fx.input(DType::F32, &[1, 2, 3], &[0.0; 6]);
    fx.refused(c.phase1(&fx), P_INVALID, &["hRes", "[1, 2, 2]"]);
    let mut c = good(&mut fx);
    c.h_post = fx.input(DType::F32, &[2], &[0.0; 2]);
    fx.refused(c.phase1(&fx), P_INVALID, &["hPost", "[1, 2]"]);
    let mut c = good(&mut fx);
    c.out = fx.transposed(DType::BF16, &[1, 2, 2]);
    fx.refused(c.phase1(&fx), P_INVALID, &["out", "non-contiguous"]);
}

// ---------------------------------------------------------------- child processes

/// Entry point of the child processes above (does nothing in a normal run).
#[test]
fn child_entry() {
    let Ok(scenario) = std::env::var(CHILD_ENV) else { return };
    match scenario.as_str() {
        "soc950" => {
            let fx = Fx::new();
            assert_eq!(fx.be.runtime().soc_name().as_deref(), Some("Ascend950PR"));
            drop(fx);
            mhc_pre_on_950();
            // The other fused ops are accepted on the 950 too.
            let mut fx = Fx::new();
            mhc_post_by_hand(&mut fx);
            check_indexer_by_hand(&mut fx);
            let call = mla_by_hand(&mut fx, &[1, 0]);
            let meta = call.metadata(&mut fx, 2, 1);
            run_mla(&mut fx, &call, &meta, None);
            assert!((fx.get(call.out)[0] - 1.0 / 3.0).abs() < 2e-3);
        }
        "version" => {
            // Which fused kernels the backend picks for a given reported CANN version.
            let want = std::env::var("WANT").expect("WANT");
            let fx = Fx::new();
            let be = &fx.be;
            let ver = std::env::var("V4RT_EMU_CANN_VERSION").expect("V4RT_EMU_CANN_VERSION");
            assert!(be.info().device.contains(&format!("CANN {ver}")), "{}", be.info().device);
            let indexer = Op::IndexerTopK(hal::ops::IndexerTopK {
                rows: 2,
                heads: 4,
                head_dim: 128,
                slots: 1,
                capacity: 8,
                ratio: 4,
                topk: 2,
                weight_scale: 1.0,
                cache_dtype: hal::DType::F32,
            });
            let attention = Op::SparseAttention(hal::ops::SparseAttention {
                rows: 2,
                heads: 4,
                head_dim: 512,
                slots: 1,
                window: 4,
                compressed: hal::ops::attention::CompressedKv::None,
                softmax_scale: 1.0,
                cache_dtype: hal::DType::F32,
            });
            let post = Op::HcPost(hal::ops::HcPost { rows: 2, mult: 4, dim: 8 });
            let got: Vec<&str> = [&indexer, &attention, &post].iter().filter_map(|op| be.fused_kernel(op)).collect();
            assert_eq!(got.join(","), want, "fused kernels chosen at CANN {ver}");
        }
        other => panic!("unknown child scenario {other}"),
    }
    println!("CHILD-OK {scenario}");
}

/// The CANN version gates the fused ops by their first documented release: LightningIndexer
/// from 9.0, the others from 9.1; a version that does not parse leaves it to the symbols.
#[test]
fn fused_ops_follow_the_cann_version() {
    for (ver, want) in [
        ("9.1.0", "LightningIndexer,SparseFlashMla,MhcPost"),
        ("9.0.0", "LightningIndexer"),
        ("8.5.0", ""),
        ("dev-build", "LightningIndexer,SparseFlashMla,MhcPost"),
    ] {
        assert_child_ok(&run_child("version", &[("V4RT_EMU_CANN_VERSION", ver), ("WANT", want)]));
    }
}
