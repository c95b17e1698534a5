//! `Backend::concurrently` on CUDA: two independent op sequences on two streams give the same
//! bits as in order, issued by the host and as two branches of a recorded graph, with their
//! intermediates freed only after the join; host transfers are refused inside. Needs a GPU, so it
//! is ignored by default: `cargo test --release -p v4rt-cuda --test concurrently -- --ignored`.

use hal::dtype::{bytes_f32, f32_bytes};
use hal::ops::Add;
use hal::{Backend, DType, Error, Op, Tensor};

mod common;
use common::{gpu, up};

/// `out = ((a + b) + b) + b` through two intermediates allocated and dropped inside.
fn thrice(be: &dyn Backend, a: &Tensor, b: &Tensor) -> hal::Result<Tensor> {
    let (rows, width) = (a.shape()[0], a.shape()[1]);
    let add = Op::Add(Add { rows, b_rows: rows, width });
    let mut t1 = be.alloc(&[rows, width], DType::F32)?;
    be.run(&add, &[a, b], &mut [&mut t1])?;
    let mut t2 = be.alloc(&[rows, width], DType::F32)?;
    be.run(&add, &[&t1, b], &mut [&mut t2])?;
    drop(t1);
    let mut out = be.alloc(&[rows, width], DType::F32)?;
    be.run(&add, &[&t2, b], &mut [&mut out])?;
    Ok(out)
}

fn want(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| ((x + y) + y) + y).collect()
}

fn same_bits(got: &[f32], want: &[f32]) -> bool {
    got.len() == want.len() && got.iter().zip(want).all(|(g, w)| g.to_bits() == w.to_bits())
}

/// Two sequences of three adds each, side by side: `thrice(x, y)` and `thrice(y, x)`.
fn both(be: &dyn Backend, x: &Tensor, y: &Tensor) -> hal::Result<(Tensor, Tensor)> {
    let (mut p, mut q) = (None, None);
    be.concurrently(&mut || thrice(be, x, y).map(|t| p = Some(t)), &mut || thrice(be, y, x).map(|t| q = Some(t)))?;
    Ok((p.expect("first ran"), q.expect("second ran")))
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test -p v4rt-cuda -- --ignored"]
fn side_by_side_gives_the_bits_of_in_order() {
    let b = gpu();
    let b = b.as_ref();
    // Large enough that the two sequences' kernels overlap on the device.
    let (rows, width) = (64, 65_536);
    let n = rows * width;
    for round in 0..8 {
        let xs: Vec<f32> = (0..n).map(|i| (i % 977) as f32 * 0.37 - round as f32).collect();
        let ys: Vec<f32> = (0..n).map(|i| 1.5 - (i % 331) as f32 * 0.11).collect();
        let (x, y) = (up(b, &[rows, width], &xs), up(b, &[rows, width], &ys));
        let (p, q) = both(b, &x, &y).unwrap();
        // Allocations right after the join may reuse what the sequences freed.
        let (p2, q2) = both(b, &p, &q).unwrap();
        let (gp, gq) = (bytes_f32(&b.download(&p).unwrap()), bytes_f32(&b.download(&q).unwrap()));
        assert!(same_bits(&gp, &want(&xs, &ys)), "round {round}: first sequence differs");
        assert!(same_bits(&gq, &want(&ys, &xs)), "round {round}: second sequence differs");
        let (gp2, gq2) = (bytes_f32(&b.download(&p2).unwrap()), bytes_f32(&b.download(&q2).unwrap()));
        assert!(same_bits(&gp2, &want(&gp, &gq)), "round {round}: chained first sequence differs");
        assert!(same_bits(&gq2, &want(&gq, &gp)), "round {round}: chained second sequence differs");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test -p v4rt-cuda -- --ignored"]
fn a_recording_holds_them_as_two_branches() {
    let b = gpu();
    let b = b.as_ref();
    let (rows, width) = (4, 4096);
    let n = rows * width;
    let xs: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let ys: Vec<f32> = (0..n).map(|i| 2.0 - i as f32 * 0.125).collect();
    let mut x = up(b, &[rows, width], &xs);
    let y = up(b, &[rows, width], &ys);
    let (mut p, mut q) = (b.alloc(&[rows, width], DType::F32).unwrap(), b.alloc(&[rows, width], DType::F32).unwrap());
    let add = Op::Add(Add { rows, b_rows: rows, width });
    let rec = b
        .record(&mut || {
            let mut x2 = b.alloc(&[rows, width], DType::F32)?;
            b.run(&add, &[&x, &y], &mut [&mut x2])?;
            let (s, t) = both(b, &x2, &y)?;
            b.run(&add, &[&s, &y], &mut [&mut p])?;
            b.run(&add, &[&t, &y], &mut [&mut q])
        })
        .unwrap()
        .expect("the CUDA backend records");
    // One add, two branches of three, two adds after the join: nine kernels, which as one chain
    // would have eight edges; the fork and the join add one each, the branches' inner ones are
    // one fewer.
    let what = rec.describe();
    assert!(what.contains("9 nodes (9 kernels), 9 edges"), "{what}");
    for k in 0..3 {
        let xs: Vec<f32> = if k == 0 { xs.clone() } else { (0..n).map(|i| (i * (k + 1)) as f32 - 3.0).collect() };
        if k > 0 {
            b.write(&mut x, 0, &f32_bytes(&xs)).unwrap();
            rec.replay().unwrap();
        }
        let x2: Vec<f32> = xs.iter().zip(&ys).map(|(a, c)| a + c).collect();
        let plus_y = |v: Vec<f32>| -> Vec<f32> { v.iter().zip(&ys).map(|(a, c)| a + c).collect() };
        let gp = bytes_f32(&b.download(&p).unwrap());
        let gq = bytes_f32(&b.download(&q).unwrap());
        assert!(same_bits(&gp, &plus_y(want(&x2, &ys))), "replay {k}: first branch");
        assert!(same_bits(&gq, &plus_y(want(&ys, &x2))), "replay {k}: second branch");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test -p v4rt-cuda -- --ignored"]
fn host_transfers_are_refused_inside() {
    let b = gpu();
    let b = b.as_ref();
    let t = up(b, &[1, 4], &[1.0, 2.0, 3.0, 4.0]);
    let refused = |r: hal::Result<()>, what: &str| match r {
        Err(Error::InvalidArgument { context, message }) => {
            assert!(context.contains(what), "'{context}' does not name {what}");
            assert!(message.contains("concurrently"), "{message}");
        }
        Err(e) => panic!("{what}: unexpected error {e}"),
        Ok(()) => panic!("{what} inside concurrently was accepted"),
    };
    refused(b.concurrently(&mut || b.download(&t).map(drop), &mut || Ok(())), "download");
    refused(b.concurrently(&mut || Ok(()), &mut || b.synchronize()), "synchronize");
    // The backend works normally afterwards.
    let mut out = b.alloc(&[1, 4], DType::F32).unwrap();
    b.run(&Op::Add(Add { rows: 1, b_rows: 1, width: 4 }), &[&t, &t], &mut [&mut out]).unwrap();
    assert_eq!(bytes_f32(&b.download(&out).unwrap()), vec![2.0, 4.0, 6.0, 8.0]);
}
