//! `aclDataType` values the emulator knows, and their element codecs (to and from f64).
//!
//! Rounding is round-to-nearest-even everywhere. FP8 E4M3FN saturates to ±448 (it has no
//! infinity); E5M2 follows IEEE (overflow → ±inf). HiF8, E8M0 stores and FP4 are known as
//! types (for validation and SoC gating) but have no codec: no emulated op accepts them.

/// An ACL element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dt {
    F32,
    F16,
    I8,
    I32,
    U8,
    I16,
    U16,
    U32,
    I64,
    U64,
    F64,
    Bool,
    Bf16,
    HiF8,
    F8E5M2,
    F8E4M3FN,
    F8E8M0,
    F4E2M1,
}

impl Dt {
    /// The type of an `aclDataType` value.
    pub fn from_acl(v: i32) -> Option<Dt> {
        Some(match v {
            0 => Dt::F32,
            1 => Dt::F16,
            2 => Dt::I8,
            3 => Dt::I32,
            4 => Dt::U8,
            6 => Dt::I16,
            7 => Dt::U16,
            8 => Dt::U32,
            9 => Dt::I64,
            10 => Dt::U64,
            11 => Dt::F64,
            12 => Dt::Bool,
            27 => Dt::Bf16,
            34 => Dt::HiF8,
            35 => Dt::F8E5M2,
            36 => Dt::F8E4M3FN,
            37 => Dt::F8E8M0,
            40 => Dt::F4E2M1,
            _ => return None,
        })
    }

    /// Storage bits per element.
    pub fn bits(self) -> usize {
        match self {
            Dt::F64 | Dt::I64 | Dt::U64 => 64,
            Dt::F32 | Dt::I32 | Dt::U32 => 32,
            Dt::F16 | Dt::Bf16 | Dt::I16 | Dt::U16 => 16,
            Dt::I8 | Dt::U8 | Dt::Bool | Dt::HiF8 | Dt::F8E5M2 | Dt::F8E4M3FN | Dt::F8E8M0 => 8,
            Dt::F4E2M1 => 4,
        }
    }

    /// Bytes per element (FP4 rounds up; it is never loaded or stored).
    pub fn size(self) -> usize {
        self.bits().div_ceil(8)
    }

    /// FP8/FP4/HiF8: only the 950 computes with these.
    pub fn is_low_precision(self) -> bool {
        matches!(self, Dt::HiF8 | Dt::F8E5M2 | Dt::F8E4M3FN | Dt::F8E8M0 | Dt::F4E2M1)
    }

    /// Floating-point types.
    pub fn is_float(self) -> bool {
        matches!(self, Dt::F32 | Dt::F16 | Dt::Bf16 | Dt::F64) || self.is_low_precision()
    }

    /// Whether elements of this type can be read and written by the kernels.
    pub fn has_codec(self) -> bool {
        !matches!(self, Dt::HiF8 | Dt::F4E2M1)
    }

    /// Decodes one little-endian element.
    pub fn load(self, b: &[u8]) -> f64 {
        match self {
            Dt::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            Dt::F64 => f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            Dt::F16 => f16_to_f32(u16::from_le_bytes([b[0], b[1]])) as f64,
            Dt::Bf16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16) as f64,
            Dt::I8 => b[0] as i8 as f64,
            Dt::U8 => b[0] as f64,
            Dt::Bool => (b[0] != 0) as u8 as f64,
            Dt::I16 => i16::from_le_bytes([b[0], b[1]]) as f64,
            Dt::U16 => u16::from_le_bytes([b[0], b[1]]) as f64,
            Dt::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            Dt::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            Dt::I64 => i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f64,
            Dt::U64 => u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f64,
            Dt::F8E4M3FN => e4m3_to_f32(b[0]) as f64,
            Dt::F8E5M2 => f16_to_f32((b[0] as u16) << 8) as f64,
            Dt::F8E8M0 => {
                if b[0] == 0xFF {
                    f64::NAN
                } else {
                    2f64.powi(b[0] as i32 - 127)
                }
            }
            Dt::HiF8 | Dt::F4E2M1 => f64::NAN,
        }
    }

    /// Encodes one element (floats rounded to nearest even through f32; integers truncated
    /// toward zero and saturated, NaN → 0, like a C cast done safely).
    pub fn store(self, v: f64, b: &mut [u8]) {
        match self {
            Dt::F32 => b[..4].copy_from_slice(&(v as f32).to_le_bytes()),
            Dt::F64 => b[..8].copy_from_slice(&v.to_le_bytes()),
            Dt::F16 => b[..2].copy_from_slice(&f32_to_f16(v as f32).to_le_bytes()),
            Dt::Bf16 => b[..2].copy_from_slice(&f32_to_bf16(v as f32).to_le_bytes()),
            Dt::I8 => b[0] = v as i8 as u8,
            Dt::U8 => b[0] = v as u8,
            Dt::Bool => b[0] = (v != 0.0) as u8,
            Dt::I16 => b[..2].copy_from_slice(&(v as i16).to_le_bytes()),
            Dt::U16 => b[..2].copy_from_slice(&(v as u16).to_le_bytes()),
            Dt::I32 => b[..4].copy_from_slice(&(v as i32).to_le_bytes()),
            Dt::U32 => b[..4].copy_from_slice(&(v as u32).to_le_bytes()),
            Dt::I64 => b[..8].copy_from_slice(&(v as i64).to_le_bytes()),
            Dt::U64 => b[..8].copy_from_slice(&(v as u64).to_le_bytes()),
            Dt::F8E4M3FN => b[0] = f32_to_e4m3(v as f32),
            Dt::F8E5M2 => b[0] = f32_to_e5m2(v as f32),
            Dt::F8E8M0 | Dt::HiF8 | Dt::F4E2M1 => b[0] = 0xFF,
        }
    }
}

/// IEEE half bits → f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1F) as u32;
    let man = (h & 0x3FF) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m · 2^-24, exact in f32.
            let v = m as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (0x1F, 0) => sign | 0x7F80_0000,
        (0x1F, m) => sign | 0x7FC0_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// f32 → IEEE half bits, round to nearest even (overflow → ±inf).
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xFF) as i32;
    let man = b & 0x7F_FFFF;
    if exp == 0xFF {
        return sign | 0x7C00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1F {
        return sign | 0x7C00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let (q, rem, half) = (m >> shift, m & ((1 << shift) - 1), 1u32 << (shift - 1));
        let q = if rem > half || (rem == half && q & 1 == 1) { q + 1 } else { q };
        return sign | q as u16;
    }
    let q = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1FFF;
    let q = if rem > 0x1000 || (rem == 0x1000 && q & 1 == 1) { q + 1 } else { q };
    sign | q as u16
}

/// f32 → bf16 bits, round to nearest even (NaN stays NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// E4M3FN code → f32 (0x7F/0xFF are NaN; no infinity).
pub fn e4m3_to_f32(c: u8) -> f32 {
    let mag = c & 0x7F;
    if mag == 0x7F {
        return f32::NAN;
    }
    let e = (mag >> 3) as i32;
    let m = (mag & 7) as f32;
    let v = if e == 0 { m / 8.0 * 2f32.powi(-6) } else { (1.0 + m / 8.0) * 2f32.powi(e - 7) };
    if c & 0x80 != 0 {
        -v
    } else {
        v
    }
}

/// f32 → E4M3FN, nearest even by search over the 127 finite magnitudes, saturating at 448.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    let mut best = 0u8;
    let mut best_d = f32::INFINITY;
    for c in 0u8..0x7F {
        let d = (e4m3_to_f32(c) - a).abs();
        if d < best_d || (d == best_d && c & 1 == 0) {
            best = c;
            best_d = d;
        }
    }
    sign | best
}

/// f32 → E5M2 (the top byte of an f16, rounded to nearest even).
pub fn f32_to_e5m2(x: f32) -> u8 {
    let h = f32_to_f16(x);
    if x.is_nan() {
        return ((h >> 8) as u8) | 0x02;
    }
    let (q, rem) = (h >> 8, h & 0xFF);
    let q = if rem > 0x80 || (rem == 0x80 && q & 1 == 1) { q + 1 } else { q };
    q as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trip_and_rounding() {
        for v in [0.0f32, 1.0, -2.5, 65504.0, 6.1035156e-5, 5.9604645e-8] {
            assert_eq!(f16_to_f32(f32_to_f16(v)), v, "{v}");
        }
        // 1 + 2^-11 is a tie between 1 and 1 + 2^-10: even mantissa (1) wins.
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3C00);
        assert_eq!(f32_to_f16(1.0e6), 0x7C00);
        assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3F80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82);
    }

    #[test]
    fn fp8_codecs() {
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(f32_to_e4m3(1000.0), 0x7E);
        assert_eq!(f32_to_e4m3(-1.0), 0xB8);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        for c in 0u8..0x7F {
            assert_eq!(f32_to_e4m3(e4m3_to_f32(c)), c);
        }
        assert_eq!(Dt::F8E5M2.load(&[f32_to_e5m2(1.5)]), 1.5);
    }
}
