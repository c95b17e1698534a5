//! Element types and their exact scalar encodings.
//!
//! The checkpoint formats of DeepSeek-V4 are defined here once, bit for bit: bf16, FP8 e4m3
//! ("e4m3fn": no infinities, max 448), e8m0 power-of-two scales, and FP4 e2m1 packed two per
//! byte (low nibble = even element). Every backend's host side and the model loader use these
//! functions; device kernels must agree with them.

use std::fmt;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    /// FP8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no inf; 0x7F/0xFF are NaN.
    F8E4M3,
    /// Unsigned power-of-two scale: value 2^(byte − 127); 0xFF is NaN.
    F8E8M0,
    /// Two FP4 e2m1 codes in one byte: low nibble = element 2i, high nibble = element 2i+1.
    /// A tensor of this dtype counts bytes (pairs) in its shape.
    F4E2M1x2,
    I8,
    U8,
    I32,
    I64,
}

impl DType {
    /// Bytes per element as counted by the shape (a packed FP4 pair counts as one element).
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::F8E4M3 | DType::F8E8M0 | DType::F4E2M1x2 | DType::I8 | DType::U8 => 1,
            DType::I64 => 8,
        }
    }

    /// The name safetensors uses for this dtype (packed FP4 is stored as `I8` in V4 checkpoints).
    pub const fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E8M0 => "F8_E8M0",
            DType::F4E2M1x2 | DType::I8 => "I8",
            DType::U8 => "U8",
            DType::I32 => "I32",
            DType::I64 => "I64",
        }
    }

    /// Parses a safetensors dtype name; `I8` maps to [`DType::I8`].
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        Some(match name {
            "F32" => DType::F32,
            "BF16" => DType::BF16,
            "F16" => DType::F16,
            "F8_E4M3" => DType::F8E4M3,
            "F8_E8M0" => DType::F8E8M0,
            "I8" => DType::I8,
            "U8" => DType::U8,
            "I32" => DType::I32,
            "I64" => DType::I64,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F8E4M3 => "f8e4m3",
            DType::F8E8M0 => "f8e8m0",
            DType::F4E2M1x2 => "f4e2m1x2",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::I32 => "i32",
            DType::I64 => "i64",
        };
        f.write_str(s)
    }
}

/// Largest finite e4m3fn magnitude.
pub const E4M3_MAX: f32 = 448.0;
/// Largest e2m1 magnitude.
pub const E2M1_MAX: f32 = 6.0;
/// e2m1 magnitudes by 3-bit code.
pub const E2M1_VALUES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// bf16 bits → f32 (exact).
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 → bf16 bits, round to nearest even.
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// `x` rounded to the nearest bf16 value (ties to even), as f32.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}

/// f32 slice → little-endian bf16 bytes, each value rounded to nearest even.
pub fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| f32_to_bf16(x).to_le_bytes()).collect()
}

/// f16 bits → f32 (exact).
#[inline]
pub fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// e4m3fn code → f32 (exact; NaN codes give NaN).
#[inline]
pub fn e4m3_to_f32(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = (code >> 3) & 0xF;
    let m = (code & 7) as f32;
    if e == 0xF && code & 7 == 7 {
        return f32::NAN;
    }
    let mag = if e == 0 { m * (1.0 / 512.0) } else { (1.0 + m / 8.0) * exp2i(e as i32 - 7) };
    sign * mag
}

/// f32 → e4m3fn code, round to nearest even, saturating finite values at ±448; NaN → 0x7F.
///
/// Works on the f32 bits: this runs on every activation of every FP8 layer.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let a = f32::from_bits(bits & 0x7FFF_FFFF);
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    if a < 1.0 / 64.0 {
        // Subnormal steps of 2^-9 (exact scaling); 8 steps is the smallest normal, code 0x08.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let abits = a.to_bits();
    let mut exp = (abits >> 23) as i32 - 127;
    let frac = abits & 0x7F_FFFF;
    let (mut q, rest) = (frac >> 20, frac & 0xF_FFFF);
    if rest > 0x8_0000 || (rest == 0x8_0000 && q & 1 == 1) {
        q += 1;
    }
    if q == 8 {
        q = 0;
        exp += 1;
    }
    let code = (((exp + 7) as u8) << 3) | q as u8;
    sign | code.min(0x7E)
}

/// e8m0 scale byte → f32 (2^(b−127); 0xFF is NaN).
#[inline]
pub fn e8m0_to_f32(b: u8) -> f32 {
    if b == 0xFF {
        f32::NAN
    } else {
        exp2i(b as i32 - 127)
    }
}

/// Power-of-two f32 → e8m0 byte. `None` if `x` is not an exact power of two in range.
pub fn f32_to_e8m0(x: f32) -> Option<u8> {
    if !x.is_finite() || x <= 0.0 {
        return None;
    }
    let e = x.log2();
    if e.fract() != 0.0 || exp2i(e as i32) != x {
        return None;
    }
    let b = e as i32 + 127;
    (0..=254).contains(&b).then_some(b as u8)
}

/// e2m1 4-bit code (bit 3 = sign) → f32.
#[inline]
pub fn e2m1_to_f32(code: u8) -> f32 {
    let v = E2M1_VALUES[(code & 7) as usize];
    if code & 8 != 0 {
        -v
    } else {
        v
    }
}

/// f32 → e2m1 4-bit code, round to nearest even code, saturating at ±6 (NaN → ±0).
///
/// The thresholds are the midpoints between neighbouring values; at a midpoint the even code
/// wins, hence `>` before odd codes and `≥` before even ones.
pub fn f32_to_e2m1(x: f32) -> u8 {
    let sign: u8 = if x.is_sign_negative() { 8 } else { 0 };
    let a = x.abs();
    let mag = (a > 0.25) as u8
        + (a >= 0.75) as u8
        + (a > 1.25) as u8
        + (a >= 1.75) as u8
        + (a > 2.5) as u8
        + (a >= 3.5) as u8
        + (a > 5.0) as u8;
    sign | mag
}

/// Unpacks element `i` of a packed FP4 row.
#[inline]
pub fn fp4_unpack(bytes: &[u8], i: usize) -> u8 {
    let b = bytes[i / 2];
    if i.is_multiple_of(2) {
        b & 0xF
    } else {
        b >> 4
    }
}

/// Exact 2^e as f32 for e in the f32 range (subnormals included; 0 / ∞ beyond it).
#[inline]
pub fn exp2i(e: i32) -> f32 {
    if (-126..=127).contains(&e) {
        f32::from_bits(((e + 127) as u32) << 23)
    } else {
        exp2f64(e) as f32
    }
}

#[inline]
fn exp2f64(e: i32) -> f64 {
    (2.0f64).powi(e)
}

/// Decodes a little-endian byte buffer of `dtype` into f32 values.
///
/// Packed FP4 expands to two values per byte. Integer types convert exactly where representable.
pub fn decode_to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
        DType::F8E4M3 => bytes.iter().map(|&b| e4m3_to_f32(b)).collect(),
        DType::F8E8M0 => bytes.iter().map(|&b| e8m0_to_f32(b)).collect(),
        DType::F4E2M1x2 => bytes.iter().flat_map(|&b| [e2m1_to_f32(b & 0xF), e2m1_to_f32(b >> 4)]).collect(),
        DType::I8 => bytes.iter().map(|&b| b as i8 as f32).collect(),
        DType::U8 => bytes.iter().map(|&b| b as f32).collect(),
        DType::I32 => bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32).collect(),
        DType::I64 => {
            bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("chunk of 8")) as f32).collect()
        }
    }
}

/// f32 slice → little-endian bytes.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// i32 slice → little-endian bytes.
pub fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Little-endian bytes → f32 values (length must be a multiple of 4).
pub fn bytes_f32(b: &[u8]) -> Vec<f32> {
    decode_to_f32(DType::F32, b)
}

/// Little-endian bytes → i32 values (length must be a multiple of 4).
pub fn bytes_i32(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_roundtrips_every_finite_code() {
        for code in 0u8..=255 {
            let v = e4m3_to_f32(code);
            if v.is_nan() {
                continue;
            }
            let back = f32_to_e4m3(v);
            // -0 and +0 both decode to 0; keep the sign bit.
            assert_eq!(back, code, "code {code:#04x} value {v}");
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(f32_to_e4m3(1000.0), 0x7E);
    }

    #[test]
    fn e4m3_matches_nearest_value_search() {
        // Every midpoint between neighbouring codes and a dense sweep against a brute-force
        // nearest search (ties to the even code).
        let values: Vec<f32> = (0u8..=0x7E).map(e4m3_to_f32).collect();
        let mut xs: Vec<f32> = values.windows(2).map(|p| (p[0] + p[1]) / 2.0).collect();
        xs.extend((0..200_000).map(|i| i as f32 * (448.0 / 200_000.0)));
        for x in xs {
            let best = (0u8..=0x7E)
                .min_by(|&p, &q| {
                    let (dp, dq) = ((values[p as usize] - x).abs(), (values[q as usize] - x).abs());
                    dp.total_cmp(&dq).then((p % 2).cmp(&(q % 2)))
                })
                .unwrap();
            assert_eq!(f32_to_e4m3(x), best, "x = {x:e}");
            assert_eq!(f32_to_e4m3(-x), best | 0x80, "x = {:e}", -x);
        }
    }

    #[test]
    fn e4m3_ties_round_to_even() {
        // Pairs from the kernel goldens' edge rows.
        for (x, want) in [
            (1.0625, 1.0),
            (1.1875, 1.25),
            (2.125, 2.0),
            (2.375, 2.5),
            (17.0, 16.0),
            (19.0, 20.0),
            (248.0, 256.0),
            (432.0, 448.0),
            (0.5 / 512.0, 0.0),
            (1.5 / 512.0, 2.0 / 512.0),
            (2.5 / 512.0, 2.0 / 512.0),
            (7.5 / 512.0, 1.0 / 64.0),
        ] {
            assert_eq!(e4m3_to_f32(f32_to_e4m3(x)), want, "x = {x}");
        }
    }

    #[test]
    fn e2m1_ties_round_to_even() {
        for (x, want) in [
            (0.25, 0.0),
            (0.75, 1.0),
            (1.25, 1.0),
            (1.75, 2.0),
            (2.5, 2.0),
            (3.5, 4.0),
            (5.0, 4.0),
            (5.5, 6.0),
            (7.0, 6.0),
            (-3.5, -4.0),
        ] {
            assert_eq!(e2m1_to_f32(f32_to_e2m1(x)), want, "x = {x}");
        }
        for code in 0u8..16 {
            assert_eq!(f32_to_e2m1(e2m1_to_f32(code)), code);
        }
        // Against nearest-value search on a dense sweep (ties resolved to the even code).
        for i in 0..=80_000 {
            let x = i as f32 * (8.0 / 80_000.0);
            let best = (0u8..8)
                .min_by(|&p, &q| {
                    let (dp, dq) = ((E2M1_VALUES[p as usize] - x).abs(), (E2M1_VALUES[q as usize] - x).abs());
                    dp.total_cmp(&dq).then((p % 2).cmp(&(q % 2)))
                })
                .unwrap();
            assert_eq!(f32_to_e2m1(x), best, "x = {x}");
        }
    }

    #[test]
    fn e8m0_is_a_power_of_two() {
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(130), 8.0);
        assert_eq!(e8m0_to_f32(0), exp2i(-127));
        assert!(e8m0_to_f32(255).is_nan());
        assert_eq!(f32_to_e8m0(0.25), Some(125));
        assert_eq!(f32_to_e8m0(0.3), None);
    }
}
