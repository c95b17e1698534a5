//! `Backend::record` on CUDA (a captured graph): replays read the current contents of the
//! tensors made before, intermediates allocated inside the recording are the graph's own, host
//! transfers are refused while recording, errors leave the stream usable, and device-side
//! argument errors of a replayed op still surface at the next download. Needs a GPU, so it is
//! ignored by default: `cargo test --release -p v4rt-cuda --test record -- --ignored` (it fails
//! without one).

use hal::dtype::{bytes_f32, f32_bytes, i32_bytes};
use hal::ops::{Add, Embed};
use hal::{Backend, DType, Error, Op, Tensor};

mod common;
use common::{gpu, up};

/// `out = (x + y) + y`, through an intermediate allocated inside the recording.
fn twice(b: &dyn Backend, x: &Tensor, y: &Tensor, out: &mut Tensor) -> hal::Result<()> {
    let (rows, width) = (x.shape()[0], x.shape()[1]);
    let add = Op::Add(Add { rows, b_rows: rows, width });
    let mut mid = b.alloc(&[rows, width], DType::F32)?;
    b.run(&add, &[x, y], &mut [&mut mid])?;
    b.run(&add, &[&mid, y], &mut [out])
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test -p v4rt-cuda -- --ignored"]
fn replay_reads_current_contents() {
    let b = gpu();
    let b = b.as_ref();
    let (rows, width) = (3, 1000);
    let n = rows * width;
    let xs: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let ys: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.25).collect();
    let mut x = up(b, &[rows, width], &xs);
    let y = up(b, &[rows, width], &ys);
    let mut out = b.alloc(&[rows, width], DType::F32).unwrap();
    let rec = b.record(&mut || twice(b, &x, &y, &mut out)).unwrap().expect("the CUDA backend records");
    let want = |xs: &[f32]| -> Vec<f32> { xs.iter().zip(&ys).map(|(a, c)| (a + c) + c).collect() };
    let what = rec.describe();
    assert!(what.contains("2 kernels"), "{what}");
    // The intermediate comes from the recording's arena: no memory nodes between the kernels.
    assert!(!what.contains("allocations") && !what.contains("frees"), "{what}");
    // The recording ran once when made.
    assert_eq!(bytes_f32(&b.download(&out).unwrap()), want(&xs));
    for k in 1..4 {
        let xs: Vec<f32> = (0..n).map(|i| (i * k) as f32 - 7.0).collect();
        b.write(&mut x, 0, &f32_bytes(&xs)).unwrap();
        rec.replay().unwrap();
        let got = bytes_f32(&b.download(&out).unwrap());
        assert!(
            got.iter().zip(want(&xs)).all(|(g, w)| g.to_bits() == w.to_bits()),
            "replay {k} differs from the direct sum"
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test -p v4rt-cuda -- --ignored"]
fn host_transfers_are_refused_while_recording_and_errors_leave_no_recording() {
    let b = gpu();
    let b = b.as_ref();
    let mut t = up(b, &[1, 4], &[1.0, 2.0, 3.0, 4.0]);
    let invalid = |r: hal::Result<Option<Box<dyn hal::Recording>>>, what: &str| match r {
        Err(Error::InvalidArgument { context, message }) => {
            assert!(context.contains(what), "'{context}' does not name {what}");
            assert!(message.contains("recording"), "{message}");
        }
        Err(e) => panic!("{what}: unexpected error {e}"),
        Ok(_) => panic!("{what} while recording was accepted"),
    };
    invalid(b.record(&mut || b.upload(&[1], DType::F32, &f32_bytes(&[0.0])).map(drop)), "upload");
    invalid(b.record(&mut || b.write(&mut t, 0, &f32_bytes(&[9.0]))), "write");
    invalid(b.record(&mut || b.download(&t).map(drop)), "download");
    invalid(b.record(&mut || b.synchronize()), "synchronize");
    invalid(b.record(&mut || b.record(&mut || Ok(())).map(drop)), "record");
    // An op error inside the recording is returned as is.
    let bad = Op::Add(Add { rows: 2, b_rows: 2, width: 2 });
    let mut out = b.alloc(&[1, 4], DType::F32).unwrap();
    assert!(matches!(b.record(&mut || b.run(&bad, &[&t, &t], &mut [&mut out])), Err(Error::InvalidArgument { .. })));
    // The stream works normally afterwards, and nothing above wrote to `t`.
    let add = Op::Add(Add { rows: 1, b_rows: 1, width: 4 });
    b.run(&add, &[&t, &t], &mut [&mut out]).unwrap();
    assert_eq!(bytes_f32(&b.download(&out).unwrap()), vec![2.0, 4.0, 6.0, 8.0]);
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test -p v4rt-cuda -- --ignored"]
fn a_tensor_kept_past_the_recording_is_refused() {
    let b = gpu();
    let b = b.as_ref();
    let x = up(b, &[1, 4], &[1.0, 2.0, 3.0, 4.0]);
    let mut kept = None;
    let r = b.record(&mut || {
        let mut mid = b.alloc(&[1, 4], DType::F32)?;
        b.run(&Op::Add(Add { rows: 1, b_rows: 1, width: 4 }), &[&x, &x], &mut [&mut mid])?;
        kept = Some(mid);
        Ok(())
    });
    match r {
        Err(Error::InvalidArgument { context, message }) => {
            assert!(context == "record" && message.contains("still held"), "{context}: {message}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a recording whose tensor outlived it was accepted"),
    }
    drop(kept);
    let mut out = b.alloc(&[1, 4], DType::F32).unwrap();
    b.run(&Op::Add(Add { rows: 1, b_rows: 1, width: 4 }), &[&x, &x], &mut [&mut out]).unwrap();
    assert_eq!(bytes_f32(&b.download(&out).unwrap()), vec![2.0, 4.0, 6.0, 8.0]);
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test -p v4rt-cuda -- --ignored"]
fn device_side_errors_of_a_replay_surface_at_download() {
    let b = gpu();
    let b = b.as_ref();
    let (vocab, dim) = (10, 8);
    let table = up(b, &[vocab, dim], &(0..vocab * dim).map(|i| i as f32).collect::<Vec<_>>());
    let mut ids = b.upload(&[2], DType::I32, &i32_bytes(&[3, 4])).unwrap();
    let mut out = b.alloc(&[2, dim], DType::F32).unwrap();
    let op = Op::Embed(Embed { rows: 2, vocab, dim, table_dtype: DType::F32 });
    let rec = b.record(&mut || b.run(&op, &[&ids, &table], &mut [&mut out])).unwrap().expect("records");
    assert_eq!(bytes_f32(&b.download(&out).unwrap())[..2], [24.0, 25.0]);
    b.write(&mut ids, 0, &i32_bytes(&[5, 10])).unwrap();
    rec.replay().unwrap();
    let err = b.download(&out).expect_err("token 10 of a 10-row table was accepted");
    assert!(err.to_string().contains("embed row 1") && err.to_string().contains("token id 10"), "{err}");
    // The error is cleared; a good replay works again.
    b.write(&mut ids, 0, &i32_bytes(&[9, 0])).unwrap();
    rec.replay().unwrap();
    assert_eq!(bytes_f32(&b.download(&out).unwrap())[dim..dim + 2], [0.0, 1.0]);
}
