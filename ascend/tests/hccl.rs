//! HCCL through the CANN emulator: ranks are threads of one process, each with its own
//! `AscendBackend` on its own emulated device (`V4RT_EMU_DEVICES=4`).
//!
//! * Collectives on 2 and 4 ranks (all_reduce SUM/MAX/PROD/MIN on f32, bf16, i32; all_gather;
//!   reduce_scatter; broadcast; barrier) against results computed on the host.
//! * One host thread driving every rank of an `HcclCommInitAll` communicator.
//! * Failures that must come back as errors, never a hang or a panic: ranks disagreeing on a
//!   collective, a rank that never arrives (timeout), a rank that destroys its communicator,
//!   a rank missing at init, host-side argument checks, no libhccl in the toolkit.
//! * Stream order: a collective's output read without a synchronize is stale.
//!
//! Each scenario runs in a child process: the emulator reads `V4RT_EMU_*` once, at `aclInit`.
//! What this cannot show (real HCCL's topology, `HCCL_BUFFSIZE`, speed, multi-node, its own
//! reduction order) is listed in `docs/ascend.md`.

mod common;

use std::ptr;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::{assert_child_ok, bytes_f32, f32_bytes, i32_bytes, run_child, Rng, CHILD_ENV};
use hal::backend::Backend;
use hal::dtype::{bf16_to_f32, bytes_i32, f32_to_bf16};
use hal::{DType, Error, Tensor};
use v4rt_ascend::hccl::{Communicator, ReduceOp, RootInfo};
use v4rt_ascend::loader::SearchConfig;
use v4rt_ascend::runtime::DevicePtr;
use v4rt_ascend::{sys, AscendBackend, AscendStorage};

/// Devices every child process sees.
const DEVICES: (&str, &str) = ("V4RT_EMU_DEVICES", "4");

fn open(device: i32) -> AscendBackend {
    AscendBackend::open(&SearchConfig::from_env(), device).unwrap_or_else(|e| panic!("emulated device {device}: {e}"))
}

/// A root info made on device 0 (the backend that made it is gone again: only the blob counts).
fn root_info() -> RootInfo {
    Communicator::root_info(&open(0)).expect("HcclGetRootInfo")
}

/// Runs `body(rank, backend, communicator)` on `n` threads, one rank each, and returns their
/// results in rank order.
fn ranks<T: Send>(n: u32, body: impl Fn(u32, &AscendBackend, &Communicator) -> T + Sync) -> Vec<T> {
    let root = root_info();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                let (root, body) = (&root, &body);
                s.spawn(move || {
                    let be = open(rank as i32);
                    let comm =
                        Communicator::init(&be, n, root, rank).unwrap_or_else(|e| panic!("rank {rank} init: {e}"));
                    body(rank, &be, &comm)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
    })
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| f32_to_bf16(x).to_le_bytes()).collect()
}

fn bytes_bf16(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

/// Small integers, different on every rank: f32 sums of them are exact, whatever the order.
fn ints(rank: u32, n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7 + rank as usize * 3) % 11) as f32 - 5.0).collect()
}

/// Random values in [-1, 1), different on every rank.
fn floats(rank: u32, n: usize, salt: u64) -> Vec<f32> {
    Rng::new(1000 * salt + rank as u64).f32s(n, 1.0)
}

/// Elementwise fold over the ranks' vectors.
fn fold(per_rank: &[Vec<f64>], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    (0..per_rank[0].len()).map(|i| per_rank[1..].iter().fold(per_rank[0][i], |a, v| f(a, v[i]))).collect()
}

/// The device address of an ascend tensor (for raw FFI calls and unsynchronized reads).
fn ptr_of(t: &Tensor) -> DevicePtr {
    t.storage().as_any().downcast_ref::<AscendStorage>().expect("ascend tensor").device_ptr()
}

/// Every collective on `n` ranks, checked on each rank against the host.
fn collectives(n: u32) {
    let names = ranks(n, |rank, be, comm| {
        assert_eq!((comm.rank(), comm.size()), (rank, n));

        // all_reduce SUM, f32 small integers: exact, so compared bit for bit.
        let len = 37;
        let send = be.upload(&[len], DType::F32, &f32_bytes(&ints(rank, len))).unwrap();
        let mut recv = be.alloc(&[len], DType::F32).unwrap();
        comm.all_reduce(be, &send, &mut recv, ReduceOp::Sum).unwrap();
        let all: Vec<Vec<f64>> = (0..n).map(|r| ints(r, len).iter().map(|&v| v as f64).collect()).collect();
        let want: Vec<f32> = fold(&all, |a, b| a + b).iter().map(|&v| v as f32).collect();
        assert_eq!(bytes_f32(&be.download(&recv).unwrap()), want, "rank {rank}: f32 sum");

        // all_reduce MAX and MIN, f32 random values: exact by nature.
        let send = be.upload(&[5, 8], DType::F32, &f32_bytes(&floats(rank, 40, 1))).unwrap();
        let all: Vec<Vec<f64>> = (0..n).map(|r| floats(r, 40, 1).iter().map(|&v| v as f64).collect()).collect();
        for (op, f) in [(ReduceOp::Max, f64::max as fn(f64, f64) -> f64), (ReduceOp::Min, f64::min)] {
            let mut recv = be.alloc(&[5, 8], DType::F32).unwrap();
            comm.all_reduce(be, &send, &mut recv, op).unwrap();
            let want: Vec<f32> = fold(&all, f).iter().map(|&v| v as f32).collect();
            assert_eq!(bytes_f32(&be.download(&recv).unwrap()), want, "rank {rank}: f32 {op:?}");
        }

        // all_reduce SUM, bf16. Small integers are exact in bf16, so this is bit-exact on any
        // implementation. The random values are compared with the emulator's documented rule
        // (sum in f64, round once to bf16); real HCCL may add in another order or precision,
        // so on hardware this second comparison would need a tolerance.
        let small: Vec<f32> = ints(rank, 16);
        let send = be.upload(&[16], DType::BF16, &bf16_bytes(&small)).unwrap();
        let mut recv = be.alloc(&[16], DType::BF16).unwrap();
        comm.all_reduce(be, &send, &mut recv, ReduceOp::Sum).unwrap();
        let all: Vec<Vec<f64>> = (0..n).map(|r| ints(r, 16).iter().map(|&v| v as f64).collect()).collect();
        let want: Vec<u16> = fold(&all, |a, b| a + b).iter().map(|&v| f32_to_bf16(v as f32)).collect();
        assert_eq!(bytes_bf16(&be.download(&recv).unwrap()), want, "rank {rank}: bf16 sum of integers");

        let bf = |r: u32| -> Vec<f32> { floats(r, 64, 2).iter().map(|&v| bf16_to_f32(f32_to_bf16(v))).collect() };
        let send = be.upload(&[64], DType::BF16, &bf16_bytes(&bf(rank))).unwrap();
        let all: Vec<Vec<f64>> = (0..n).map(|r| bf(r).iter().map(|&v| v as f64).collect()).collect();
        for (op, f) in [(ReduceOp::Sum, (|a, b| a + b) as fn(f64, f64) -> f64), (ReduceOp::Max, f64::max)] {
            let mut recv = be.alloc(&[64], DType::BF16).unwrap();
            comm.all_reduce(be, &send, &mut recv, op).unwrap();
            let want: Vec<u16> = fold(&all, f).iter().map(|&v| f32_to_bf16(v as f32)).collect();
            assert_eq!(bytes_bf16(&be.download(&recv).unwrap()), want, "rank {rank}: bf16 {op:?}");
        }

        // all_reduce PROD in place, i32.
        let mine: Vec<i32> = (0..6).map(|i| (i + rank as i32) % 3 + 1).collect();
        let mut buf = be.upload(&[6], DType::I32, &i32_bytes(&mine)).unwrap();
        comm.all_reduce_in_place(be, &mut buf, ReduceOp::Prod).unwrap();
        let want: Vec<i32> = (0..6).map(|i| (0..n as i32).map(|r| (i + r) % 3 + 1).product()).collect();
        assert_eq!(bytes_i32(&be.download(&buf).unwrap()), want, "rank {rank}: i32 prod in place");

        // all_gather: [3, 5] per rank → [n·3, 5], rank-major.
        let piece = |r: u32| -> Vec<f32> { (0..15).map(|i| (100 * r + i) as f32).collect() };
        let send = be.upload(&[3, 5], DType::F32, &f32_bytes(&piece(rank))).unwrap();
        let mut recv = be.alloc(&[3 * n as usize, 5], DType::F32).unwrap();
        comm.all_gather(be, &send, &mut recv).unwrap();
        let want: Vec<f32> = (0..n).flat_map(piece).collect();
        assert_eq!(bytes_f32(&be.download(&recv).unwrap()), want, "rank {rank}: all_gather");
        // One-byte codes (FP8 here) travel as plain bytes: [n, 4] from [4].
        let codes: Vec<u8> = (0..4).map(|i| (rank * 16 + i) as u8).collect();
        let send = be.upload(&[4], DType::F8E4M3, &codes).unwrap();
        let mut recv = be.alloc(&[n as usize, 4], DType::F8E4M3).unwrap();
        comm.all_gather(be, &send, &mut recv).unwrap();
        let want: Vec<u8> = (0..n).flat_map(|r| (0..4).map(move |i| (r * 16 + i) as u8)).collect();
        assert_eq!(be.download(&recv).unwrap(), want, "rank {rank}: all_gather of FP8 codes");

        // reduce_scatter SUM: [n·2, 3] per rank → this rank's [2, 3] block of the sum.
        let full = |r: u32| -> Vec<f32> { ints(r + 7, 6 * n as usize) };
        let send = be.upload(&[2 * n as usize, 3], DType::F32, &f32_bytes(&full(rank))).unwrap();
        let mut recv = be.alloc(&[2, 3], DType::F32).unwrap();
        comm.reduce_scatter(be, &send, &mut recv, ReduceOp::Sum).unwrap();
        let all: Vec<Vec<f64>> = (0..n).map(|r| full(r).iter().map(|&v| v as f64).collect()).collect();
        let sum = fold(&all, |a, b| a + b);
        let want: Vec<f32> = sum[rank as usize * 6..rank as usize * 6 + 6].iter().map(|&v| v as f32).collect();
        assert_eq!(bytes_f32(&be.download(&recv).unwrap()), want, "rank {rank}: reduce_scatter");

        // broadcast from the last rank; the others start with other values.
        let root = n - 1;
        let from = |r: u32| -> Vec<f32> { (0..16).map(|i| (i as f32) * 0.5 - r as f32).collect() };
        let mut buf = be.upload(&[4, 4], DType::F32, &f32_bytes(&from(rank))).unwrap();
        comm.broadcast(be, &mut buf, root).unwrap();
        assert_eq!(bytes_f32(&be.download(&buf).unwrap()), from(root), "rank {rank}: broadcast");

        // barrier, then plain work after it on the same stream.
        comm.barrier(be).unwrap();
        be.synchronize().unwrap();
        comm.async_error().unwrap();
        comm.name().to_string()
    });
    assert!(!names[0].is_empty() && names[0].len() <= 127, "{:?}", names[0]);
    assert!(names.iter().all(|x| *x == names[0]), "every rank sees the same communicator name: {names:?}");
}

#[test]
fn two_ranks_collectives() {
    assert_child_ok(&run_child("collectives_2", &[DEVICES]));
}

#[test]
fn four_ranks_collectives() {
    assert_child_ok(&run_child("collectives_4", &[DEVICES]));
}

#[test]
fn one_thread_drives_every_rank_of_init_all() {
    assert_child_ok(&run_child("init_all", &[DEVICES]));
}

#[test]
fn mismatched_collectives_fail_on_every_rank() {
    assert_child_ok(&run_child("mismatch", &[DEVICES]));
}

#[test]
fn a_rank_that_never_arrives_times_out() {
    assert_child_ok(&run_child("timeout", &[DEVICES, ("V4RT_EMU_HCCL_TIMEOUT_MS", "300")]));
}

#[test]
fn a_rank_that_destroys_its_communicator_fails_the_others_fast() {
    // The default timeout (10 s) is left alone: the failure must come well before it.
    assert_child_ok(&run_child("peer_gone", &[DEVICES]));
}

#[test]
fn output_read_without_synchronize_is_stale() {
    assert_child_ok(&run_child("stale", &[DEVICES]));
}

#[test]
fn host_side_checks_are_clean_errors() {
    assert_child_ok(&run_child("host_checks", &[DEVICES]));
}

#[test]
fn no_libhccl_is_unsupported() {
    // libascendcl, libnnopbase and op libraries, but no libhccl/libhcomm.
    let root = common::fake_toolkit("nohccl", common::Layout::Both);
    let root = root.to_str().expect("utf-8 scratch path");
    assert_child_ok(&run_child("no_hccl", &[DEVICES, ("ASCEND_TOOLKIT_HOME", root)]));
}

/// The device error a failed collective leaves at synchronize: (ACL status, message).
fn sync_failure(be: &AscendBackend) -> (i64, String) {
    match be.synchronize() {
        Err(Error::Device { code, message, .. }) => (code, message),
        other => panic!("expected a device error at synchronize, got {other:?}"),
    }
}

/// The HCCL code `async_error` reports.
fn async_code(comm: &Communicator) -> i64 {
    match comm.async_error() {
        Err(Error::Device { code, .. }) => code,
        other => panic!("expected an async HCCL error, got {other:?}"),
    }
}

/// Entry point of the child processes above (does nothing in a normal run).
#[test]
fn child_entry() {
    let Ok(scenario) = std::env::var(CHILD_ENV) else { return };
    match scenario.as_str() {
        "collectives_2" => collectives(2),
        "collectives_4" => collectives(4),
        "init_all" => {
            // One thread, three ranks: each download synchronizes one rank's stream, whose
            // collective waits for the other two, whose queued work the emulator then runs
            // (as their devices would on their own).
            let bes: Vec<AscendBackend> = (0..3).map(open).collect();
            let refs: Vec<&AscendBackend> = bes.iter().collect();
            let comms = Communicator::init_all(&refs).unwrap();
            assert!(comms.iter().enumerate().all(|(i, c)| c.rank() == i as u32 && c.size() == 3));
            assert!(comms.iter().all(|c| c.name() == comms[0].name()));
            let mut outs = Vec::new();
            for (r, (be, comm)) in bes.iter().zip(&comms).enumerate() {
                let send = be.upload(&[10], DType::F32, &f32_bytes(&ints(r as u32, 10))).unwrap();
                let mut recv = be.alloc(&[10], DType::F32).unwrap();
                comm.all_reduce(be, &send, &mut recv, ReduceOp::Sum).unwrap();
                let mut buf = be.upload(&[3], DType::F32, &f32_bytes(&[r as f32; 3])).unwrap();
                comm.broadcast(be, &mut buf, 1).unwrap();
                outs.push((send, recv, buf));
            }
            let all: Vec<Vec<f64>> = (0..3).map(|r| ints(r, 10).iter().map(|&v| v as f64).collect()).collect();
            let want: Vec<f32> = fold(&all, |a, b| a + b).iter().map(|&v| v as f32).collect();
            for (be, (_, recv, buf)) in bes.iter().zip(&outs) {
                assert_eq!(bytes_f32(&be.download(recv).unwrap()), want);
                assert_eq!(bytes_f32(&be.download(buf).unwrap()), [1.0; 3]);
            }
            // Backends on one device cannot be two ranks.
            let e = Communicator::init_all(&[&bes[0], &bes[0]]).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { .. }) && e.to_string().contains("both on device 0"), "{e}");
        }
        "mismatch" => {
            // Different counts: every rank fails at its synchronize, and the message names
            // both sides.
            let results = ranks(2, |rank, be, comm| {
                let len = if rank == 0 { 8 } else { 4 };
                let send = be.upload(&[len], DType::F32, &f32_bytes(&vec![1.0; len])).unwrap();
                let mut recv = be.alloc(&[len], DType::F32).unwrap();
                comm.all_reduce(be, &send, &mut recv, ReduceOp::Sum).expect("each rank's own call is valid");
                let (code, msg) = sync_failure(be);
                // The stream stays failed, like after a kernel fault.
                assert!(be.download(&recv).is_err());
                (code, msg, async_code(comm))
            });
            for (rank, (code, msg, hccl)) in results.iter().enumerate() {
                assert!((507000..508000).contains(code), "rank {rank}: {code} {msg}");
                assert_eq!(*hccl, sys::HCCL_E_PARA as i64, "rank {rank}");
                assert!(
                    msg.contains("HCCL_E_PARA") && msg.contains("count=8") && msg.contains("count=4"),
                    "rank {rank}: {msg}"
                );
            }
            // Different collectives (fresh backends and communicator: the old streams are dead).
            let results = ranks(2, |rank, be, comm| {
                let mut buf = be.upload(&[4], DType::F32, &f32_bytes(&[1.0; 4])).unwrap();
                if rank == 0 {
                    comm.broadcast(be, &mut buf, 0).unwrap();
                } else {
                    comm.all_reduce_in_place(be, &mut buf, ReduceOp::Max).unwrap();
                }
                sync_failure(be).1
            });
            for msg in &results {
                assert!(
                    msg.contains("HcclBroadcast(count=4, FP32, root=0)")
                        && msg.contains("HcclAllReduce(count=4, FP32, MAX)"),
                    "{msg}"
                );
            }
        }
        "timeout" => {
            // Rank 1 joins the communicator but never calls the collective.
            let done = Barrier::new(2);
            ranks(2, |rank, be, comm| {
                if rank == 0 {
                    let send = be.upload(&[4], DType::F32, &f32_bytes(&[1.0; 4])).unwrap();
                    let mut recv = be.alloc(&[4], DType::F32).unwrap();
                    comm.all_reduce(be, &send, &mut recv, ReduceOp::Sum).unwrap();
                    let t = Instant::now();
                    let (code, msg) = sync_failure(be);
                    let waited = t.elapsed();
                    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(5), "{waited:?}");
                    assert_eq!(code, 507046, "{msg}");
                    assert!(
                        msg.contains("HCCL_E_TIMEOUT") && msg.contains("ranks [1] of 2") && msg.contains("300 ms"),
                        "{msg}"
                    );
                    assert_eq!(async_code(comm), sys::HCCL_E_TIMEOUT as i64);
                }
                // Rank 1 stays alive (and its communicator too) until rank 0 has timed out.
                done.wait();
            });
            // A rank alone at init times out too.
            let be = open(2);
            let root = Communicator::root_info(&be).unwrap();
            match Communicator::init(&be, 2, &root, 0) {
                Err(Error::Device { code, message, .. }) => {
                    assert_eq!(code, sys::HCCL_E_TIMEOUT as i64, "{message}");
                    assert!(message.contains("ranks [1] of 2 did not join"), "{message}");
                }
                other => panic!("expected an init timeout, got {other:?}"),
            }
        }
        "peer_gone" => {
            let t = Instant::now();
            let msgs = ranks(2, |rank, be, comm| {
                if rank == 1 {
                    // Returning drops the communicator: HcclCommDestroy without the collective.
                    return None;
                }
                let send = be.upload(&[4], DType::F32, &f32_bytes(&[1.0; 4])).unwrap();
                let mut recv = be.alloc(&[4], DType::F32).unwrap();
                comm.all_reduce(be, &send, &mut recv, ReduceOp::Sum).unwrap();
                let msg = sync_failure(be).1;
                assert_eq!(async_code(comm), sys::HCCL_E_UNAVAIL as i64);
                Some(msg)
            });
            let msg = msgs[0].as_deref().expect("rank 0 result");
            assert!(msg.contains("HCCL_E_UNAVAIL") && msg.contains("destroyed their communicator"), "{msg}");
            assert!(t.elapsed() < Duration::from_secs(5), "failed fast, not at the 10 s timeout: {:?}", t.elapsed());
        }
        "stale" => {
            // Issued is not done: until a synchronize, the output still holds the allocation's
            // NaN poison, read here with the blocking aclrtMemcpy (which does not drain the
            // stream). Neither rank synchronizes before both have looked.
            let both_read = Barrier::new(2);
            ranks(2, |rank, be, comm| {
                let send = be.upload(&[4], DType::F32, &f32_bytes(&[rank as f32 + 1.0; 4])).unwrap();
                let mut recv = be.alloc(&[4], DType::F32).unwrap();
                comm.all_reduce(be, &send, &mut recv, ReduceOp::Sum).unwrap();
                let mut host = [0u8; 16];
                be.runtime().bind(be.device()).unwrap();
                // SAFETY: synchronous copy of 16 bytes into a local buffer of 16 bytes.
                let code = unsafe {
                    (be.runtime().api().acl.aclrtMemcpy)(
                        host.as_mut_ptr().cast(),
                        16,
                        ptr_of(&recv).as_raw(),
                        16,
                        sys::ACL_MEMCPY_DEVICE_TO_HOST,
                    )
                };
                assert_eq!(code, 0, "{}", be.runtime().recent_error());
                assert!(
                    bytes_f32(&host).iter().all(|v| v.is_nan()),
                    "rank {rank}: collective output visible before a synchronize"
                );
                both_read.wait();
                assert_eq!(bytes_f32(&be.download(&recv).unwrap()), [3.0; 4]);
            });
        }
        "host_checks" => host_checks(),
        "no_hccl" => {
            let be = open(0);
            assert!(be.runtime().api().hccl.is_none(), "the toolkit has no libhccl");
            assert!(!be.info().device.contains("HCCL"), "{}", be.info().device);
            match Communicator::root_info(&be) {
                Err(Error::Unsupported { reason, .. }) => assert!(reason.contains("libhccl.so"), "{reason}"),
                other => panic!("expected Unsupported, got {other:?}"),
            }
            let blob = RootInfo::from_bytes(&[0; sys::HCCL_ROOT_INFO_BYTES]).unwrap();
            assert!(matches!(Communicator::init(&be, 1, &blob, 0), Err(Error::Unsupported { .. })));
        }
        other => panic!("unknown child scenario {other}"),
    }
    println!("CHILD-OK {scenario}");
}

/// Argument checks: the backend's on the host, then the emulator's through raw FFI.
fn host_checks() {
    let (be0, be1) = (open(0), open(1));
    let root = Communicator::root_info(&be0).unwrap();
    let invalid = |r: hal::Result<()>, needle: &str| match r {
        Err(e @ Error::InvalidArgument { .. }) => assert!(e.to_string().contains(needle), "{e}"),
        other => panic!("expected InvalidArgument containing {needle:?}, got {other:?}"),
    };
    invalid(Communicator::init(&be0, 2, &root, 2).map(drop), "out of range");
    invalid(RootInfo::from_bytes(&[0; 10]).map(drop), "4108");
    match Communicator::init(&be0, 1, &RootInfo::from_bytes(&[0; sys::HCCL_ROOT_INFO_BYTES]).unwrap(), 0) {
        Err(Error::Device { code, message, .. }) => {
            assert_eq!(code, sys::HCCL_E_PARA as i64);
            assert!(message.contains("bad magic") && message.contains("parameter error"), "{message}");
        }
        other => panic!("expected HCCL_E_PARA for a made-up root info, got {other:?}"),
    }

    // A one-rank communicator works (a collective of one is a copy).
    let comm = Communicator::init(&be0, 1, &root, 0).unwrap();
    let send = be0.upload(&[4], DType::F32, &f32_bytes(&[1.0, 2.0, 3.0, 4.0])).unwrap();
    let mut recv = be0.alloc(&[4], DType::F32).unwrap();
    comm.all_reduce(&be0, &send, &mut recv, ReduceOp::Sum).unwrap();
    assert_eq!(bytes_f32(&be0.download(&recv).unwrap()), [1.0, 2.0, 3.0, 4.0]);

    // Host-side checks, before any HCCL call.
    let mut bf = be0.alloc(&[4], DType::BF16).unwrap();
    invalid(comm.all_reduce(&be0, &send, &mut bf, ReduceOp::Sum), "must have the shape and dtype of send");
    let mut five = be0.alloc(&[5], DType::F32).unwrap();
    invalid(comm.all_reduce(&be0, &send, &mut five, ReduceOp::Sum), "must have the shape and dtype of send");
    let wide = be0.upload(&[2], DType::I64, &[0u8; 16]).unwrap();
    let mut wide_out = be0.alloc(&[2], DType::I64).unwrap();
    invalid(
        comm.all_reduce(&be0, &wide, &mut wide_out, ReduceOp::Sum),
        "reduces int8, int32, fp16, fp32 and bf16 only",
    );
    let foreign = be1.upload(&[4], DType::F32, &f32_bytes(&[0.0; 4])).unwrap();
    invalid(comm.all_reduce(&be0, &foreign, &mut recv, ReduceOp::Sum), "hccl all_reduce send");
    let mut foreign_out = be1.alloc(&[4], DType::F32).unwrap();
    invalid(comm.all_reduce(&be1, &foreign, &mut foreign_out, ReduceOp::Sum), "another backend instance");
    invalid(comm.broadcast(&be0, &mut recv, 1), "root 1 is out of range");
    let mut gathered = be0.alloc(&[8], DType::F32).unwrap();
    invalid(comm.all_gather(&be0, &send, &mut gathered), "stacked 1 times");
    be0.synchronize().unwrap();

    // The emulator's own checks, reached through raw calls.
    let h = be0.runtime().api().hccl.expect("libhccl");
    let all_reduce = h.HcclAllReduce.unwrap();
    be0.runtime().bind(0).unwrap();
    let stream = be0.stream().raw();
    let (s, r) = (ptr_of(&send).as_raw(), ptr_of(&recv).as_raw());
    let mut host = [0f32; 4];
    let hp = host.as_mut_ptr().cast();
    let rt = be0.runtime();
    // SAFETY (all calls below): arguments the emulator validates before using any pointer.
    unsafe {
        assert_eq!(
            all_reduce(hp, r, 4, sys::HCCL_DATA_TYPE_FP32, sys::HCCL_REDUCE_SUM, comm.raw(), stream),
            sys::HCCL_E_PARA
        );
        assert!(rt.recent_error().contains("is not device memory"));
        // The pool hands out 512-byte blocks, so only a count past the block overruns it.
        assert_eq!(
            all_reduce(s, r, 200, sys::HCCL_DATA_TYPE_FP32, sys::HCCL_REDUCE_SUM, comm.raw(), stream),
            sys::HCCL_E_PARA
        );
        assert!(rt.recent_error().contains("must hold 800 bytes"));
        assert_eq!(
            all_reduce(s, r, 4, sys::HCCL_DATA_TYPE_INT64, sys::HCCL_REDUCE_SUM, comm.raw(), stream),
            sys::HCCL_E_PARA
        );
        assert!(rt.recent_error().contains("is not supported by HcclAllReduce"));
        assert_eq!(all_reduce(s, r, 4, sys::HCCL_DATA_TYPE_FP32, 9, comm.raw(), stream), sys::HCCL_E_PARA);
        assert_eq!(
            all_reduce(s, r, 4, sys::HCCL_DATA_TYPE_FP32, sys::HCCL_REDUCE_SUM, comm.raw(), ptr::null_mut()),
            sys::HCCL_E_PTR
        );
        let other_dev = ptr_of(&foreign).as_raw();
        assert_eq!(
            all_reduce(other_dev, r, 4, sys::HCCL_DATA_TYPE_FP32, sys::HCCL_REDUCE_SUM, comm.raw(), stream),
            sys::HCCL_E_PARA
        );
        assert!(rt.recent_error().contains("allocated on device 1"));
    }
    be0.synchronize().unwrap();
    let raw = comm.raw();
    drop(comm);
    let mut n = 0u32;
    // SAFETY: a destroyed handle is looked up, never dereferenced, by the emulator.
    assert_eq!(unsafe { (h.HcclGetRankSize.unwrap())(raw, &mut n) }, sys::HCCL_E_PARA);
    assert!(rt.recent_error().contains("not a live communicator"));
}
