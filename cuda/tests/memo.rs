//! The CUDA backend's memo (`src/memo.rs`) skips argument checks that already passed and
//! act_quant copies already made, on tensors unchanged since. These tests change the tensors in
//! every way the memo must notice (host writes, op outputs, a check issued while an error was
//! pending) and require the skipped work to run again. Needs a GPU, so it is ignored by
//! default: `cargo test --release -p v4rt-cuda --test memo -- --ignored` (it fails without one).

use hal::dtype::{bytes_f32, f32_bytes, i32_bytes};
use hal::ops::{Add, Embed, Linear, Rope, WeightFormat};
use hal::{Backend, DType, Op, Tensor};

mod common;
use common::{gpu, up};

fn rope_op() -> Op {
    Op::Rope(Rope { rows: 1, heads: 1, head_dim: 8, rope_dim: 8, inverse: false })
}

/// Runs RoPE with `pos` on a fresh row; the error text of the next synchronize, if any.
fn rope(b: &dyn Backend, freqs: &Tensor, pos: &Tensor) -> Option<String> {
    let mut x = up(b, &[1, 1, 8], &[1.0; 8]);
    b.run(&rope_op(), &[freqs, pos], &mut [&mut x]).unwrap();
    b.synchronize().err().map(|e| e.to_string())
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test -p v4rt-cuda -- --ignored"]
fn a_check_runs_again_once_the_host_rewrites_its_tensor() {
    let b = gpu();
    let b = b.as_ref();
    let freqs = up(b, &[4], &[1.0, 0.5, 0.25, 0.125]);
    let mut pos = b.upload(&[1], DType::I32, &i32_bytes(&[5])).unwrap();
    assert_eq!(rope(b, &freqs, &pos), None);
    assert_eq!(rope(b, &freqs, &pos), None);
    b.write(&mut pos, 0, &i32_bytes(&[-3])).unwrap();
    let err = rope(b, &freqs, &pos).expect("position −3 was accepted after a passing check of the same tensor");
    assert!(err.contains("position -3 is negative"), "{err}");
    b.write(&mut pos, 0, &i32_bytes(&[2])).unwrap();
    assert_eq!(rope(b, &freqs, &pos), None);
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test -p v4rt-cuda -- --ignored"]
fn a_check_issued_while_an_error_was_pending_runs_again() {
    let b = gpu();
    let b = b.as_ref();
    let freqs = up(b, &[4], &[1.0, 0.5, 0.25, 0.125]);
    let pos = b.upload(&[1], DType::I32, &i32_bytes(&[-1])).unwrap();
    // A bad token first: its error is the one recorded, and RoPE's check then does nothing.
    let (vocab, dim) = (4, 8);
    let table = up(b, &[vocab, dim], &[0.0; 32]);
    let ids = b.upload(&[1], DType::I32, &i32_bytes(&[7])).unwrap();
    let mut out = b.alloc(&[1, dim], DType::F32).unwrap();
    b.run(&Op::Embed(Embed { rows: 1, vocab, dim, table_dtype: DType::F32 }), &[&ids, &table], &mut [&mut out])
        .unwrap();
    let err = rope(b, &freqs, &pos).expect("token 7 of a 4-row table was accepted");
    assert!(err.contains("token id 7"), "{err}");
    // The same, unchanged positions must still be checked.
    let err =
        rope(b, &freqs, &pos).expect("position −1 was accepted: a check issued while an error was pending counted");
    assert!(err.contains("position -1 is negative"), "{err}");
}

/// An FP8 linear `[rows, inp] → [rows, 128]` with fixed codes and scales 2^0.
fn fp8_linear(b: &dyn Backend, rows: usize, inp: usize) -> (Op, Tensor, Tensor) {
    let out = 128;
    let codes: Vec<u8> =
        (0..out * inp).map(|i| ((i * 37 + 11) % 0x7E) as u8 | if i % 3 == 0 { 0x80 } else { 0 }).collect();
    let w = b.upload(&[out, inp], DType::F8E4M3, &codes).unwrap();
    let s = b.upload(&[1, inp / 128], DType::F8E8M0, &vec![127; inp / 128]).unwrap();
    (Op::Linear(Linear { rows, in_features: inp, out_features: out, format: WeightFormat::Fp8Block128 }), w, s)
}

fn linear(b: &dyn Backend, op: &(Op, Tensor, Tensor), x: &Tensor) -> Vec<f32> {
    let mut y = b.alloc(&[x.shape()[0], 128], DType::F32).unwrap();
    b.run(&op.0, &[x, &op.1, &op.2], &mut [&mut y]).unwrap();
    bytes_f32(&b.download(&y).unwrap())
}

fn same_bits(a: &[f32], c: &[f32]) -> bool {
    a.len() == c.len() && a.iter().zip(c).all(|(p, q)| p.to_bits() == q.to_bits())
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo test -p v4rt-cuda -- --ignored"]
fn a_linear_input_changed_by_an_op_or_the_host_is_quantized_again() {
    let b = gpu();
    let b = b.as_ref();
    let rows = 2;
    let lin = fp8_linear(b, rows, 256);
    let xs: Vec<f32> = (0..rows * 256).map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0).collect();
    let mut x = up(b, &[rows, 256], &xs);
    let first = linear(b, &lin, &x);
    // The same input again: the kept copy, the same result.
    assert!(same_bits(&linear(b, &lin, &x), &first));
    // An op writes the input: x ← a + a.
    let a = up(b, &[rows, 256], &xs.iter().map(|v| v * 1.5 + 0.25).collect::<Vec<_>>());
    b.run(&Op::Add(Add { rows, b_rows: rows, width: 256 }), &[&a, &a], &mut [&mut x]).unwrap();
    let after_op = linear(b, &lin, &x);
    let doubled: Vec<f32> = bytes_f32(&b.download(&x).unwrap());
    let fresh = up(b, &[rows, 256], &doubled);
    assert!(same_bits(&after_op, &linear(b, &lin, &fresh)), "linear read a stale quantized input after an op wrote it");
    assert!(!same_bits(&after_op, &first), "the test's op did not change the result");
    // The host writes one value of the second row.
    b.write(&mut x, 256 + 17, &f32_bytes(&[100.0])).unwrap();
    let after_write = linear(b, &lin, &x);
    let mut host = doubled.clone();
    host[256 + 17] = 100.0;
    let fresh = up(b, &[rows, 256], &host);
    assert!(
        same_bits(&after_write, &linear(b, &lin, &fresh)),
        "linear read a stale quantized input after a host write"
    );
    assert!(!same_bits(&after_write, &after_op), "the test's write did not change the result");
}
