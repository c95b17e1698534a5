//! KV-cache footprint per sequence (spec §4): what one sequence of `N` tokens costs in cache
//! memory, by layer type, for the reference's bf16 layout and for the FP8/FP4 production layout.
//!
//! Per main layer:
//! * every layer keeps a ring of `window_size` raw entries (a constant, not per token);
//! * a CSA layer (ratio 4) adds one main entry and one indexer key per 4 tokens;
//! * an HCA layer (ratio r) adds one main entry per r tokens;
//! * each compressor keeps fp32 `kv_state` + `score_state` of `[coff·r, coff·D]` (coff = 2 when
//!   overlapping), a constant.
//!
//! The figures cover the **main layers only; the MTP blocks are excluded**, as in the published
//! numbers this reproduces (Pro: 9,848 B/token, 9.62 GiB at 2^20 tokens in bf16). The
//! per-token growth is counted fractionally (`N / r` entries), as the published figures do.

use crate::config::{LayerKind, ModelConfig};

/// How cache entries are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvLayout {
    /// What the reference stores: bf16 main entries (`head_dim` × 2 B; the 448 nope dims only
    /// FP8-*simulated*) and bf16 indexer keys (`index_head_dim` × 2 B).
    Bf16Reference,
    /// FlashMLA "MODEL1"-style packing (spec §4.2, **unverified** against DeepSeek's kernels):
    /// main entry = nope dims in e4m3 + rope dims in bf16 + one ue8m0 scale per 64 nope dims,
    /// padded to 8 bytes (584 B for V4); indexer key = e2m1 (half a byte per dim) + one ue8m0
    /// scale per 32 dims (68 B).
    Fp8Fp4,
}

impl KvLayout {
    /// Both layouts, for reports.
    pub const ALL: [KvLayout; 2] = [KvLayout::Bf16Reference, KvLayout::Fp8Fp4];

    /// Short name for reports.
    pub fn label(self) -> &'static str {
        match self {
            KvLayout::Bf16Reference => "bf16 (reference)",
            KvLayout::Fp8Fp4 => "fp8/fp4 (production)",
        }
    }

    /// Bytes of one main KV entry (window or compressed).
    pub fn entry_bytes(self, cfg: &ModelConfig) -> u64 {
        let (hd, rope) = (cfg.head_dim as u64, cfg.rope_head_dim as u64);
        match self {
            KvLayout::Bf16Reference => hd * 2,
            KvLayout::Fp8Fp4 => {
                let nope = hd - rope;
                (nope + rope * 2 + nope.div_ceil(64)).next_multiple_of(8)
            }
        }
    }

    /// Bytes of one indexer key (CSA layers).
    pub fn index_key_bytes(self, cfg: &ModelConfig) -> u64 {
        let d = cfg.index_head_dim as u64;
        match self {
            KvLayout::Bf16Reference => d * 2,
            KvLayout::Fp8Fp4 => d.div_ceil(2) + d.div_ceil(32),
        }
    }
}

/// The footprint of all main layers sharing one attention type and ratio.
#[derive(Clone, Debug, PartialEq)]
pub struct KindFootprint {
    pub kind: LayerKind,
    pub ratio: usize,
    /// Main layers of this kind.
    pub layers: usize,
    /// Cache growth per token of all these layers together.
    pub bytes_per_token: f64,
    /// Their window rings.
    pub window_bytes: u64,
    /// Their compressor state (fp32, independent of the layout).
    pub state_bytes: u64,
}

/// The KV cache of one sequence of `context_tokens` tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct KvFootprint {
    pub layout: KvLayout,
    pub context_tokens: u64,
    /// Compressed entries + indexer keys added per token, all main layers.
    pub bytes_per_token: f64,
    /// `bytes_per_token × context_tokens`.
    pub growth_bytes: f64,
    /// Window rings of all main layers (allocated in full whatever the context).
    pub window_bytes: u64,
    /// Compressor `kv_state`/`score_state` of all main layers (fp32). Not part of `total_bytes`,
    /// because the published figures leave it out.
    pub state_bytes: u64,
    /// `growth_bytes + window_bytes`: the published cache size.
    pub total_bytes: f64,
    /// Breakdown by attention type, in order of first appearance.
    pub by_kind: Vec<KindFootprint>,
}

/// Cache footprint of one sequence of `context_tokens` tokens under `layout` (main layers only;
/// MTP excluded).
pub fn kv_footprint(cfg: &ModelConfig, layout: KvLayout, context_tokens: u64) -> KvFootprint {
    let entry = layout.entry_bytes(cfg);
    let window = cfg.window_size as u64 * entry;
    let fp32_state = |ratio: usize, width: usize| {
        let coff = if ratio == 4 { 2 } else { 1 };
        2 * (coff * ratio * coff * width * 4) as u64
    };
    let mut by_kind: Vec<KindFootprint> = Vec::new();
    for i in 0..cfg.n_layers {
        let (kind, ratio) = (cfg.layer_kind(i), cfg.layer_ratio(i));
        let (per_token, state) = match kind {
            LayerKind::Window => (0.0, 0),
            LayerKind::Hca => (entry as f64 / ratio as f64, fp32_state(ratio, cfg.head_dim)),
            LayerKind::Csa => (
                (entry + layout.index_key_bytes(cfg)) as f64 / ratio as f64,
                fp32_state(ratio, cfg.head_dim) + fp32_state(ratio, cfg.index_head_dim),
            ),
        };
        let slot = match by_kind.iter_mut().position(|k| k.kind == kind && k.ratio == ratio) {
            Some(j) => j,
            None => {
                by_kind.push(KindFootprint {
                    kind,
                    ratio,
                    layers: 0,
                    bytes_per_token: 0.0,
                    window_bytes: 0,
                    state_bytes: 0,
                });
                by_kind.len() - 1
            }
        };
        let k = &mut by_kind[slot];
        k.layers += 1;
        k.bytes_per_token += per_token;
        k.window_bytes += window;
        k.state_bytes += state;
    }
    let bytes_per_token: f64 = by_kind.iter().map(|k| k.bytes_per_token).sum();
    let window_bytes: u64 = by_kind.iter().map(|k| k.window_bytes).sum();
    let state_bytes = by_kind.iter().map(|k| k.state_bytes).sum();
    let growth_bytes = bytes_per_token * context_tokens as f64;
    KvFootprint {
        layout,
        context_tokens,
        bytes_per_token,
        growth_bytes,
        window_bytes,
        state_bytes,
        total_bytes: growth_bytes + window_bytes as f64,
        by_kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB_1: u64 = 1 << 20;

    fn gib(x: f64) -> String {
        format!("{:.2}", x / (1u64 << 30) as f64)
    }

    #[test]
    fn pro_bf16_is_9_62_gib() {
        let cfg = ModelConfig::embedded("v4-pro").unwrap();
        let f = kv_footprint(&cfg, KvLayout::Bf16Reference, MIB_1);
        assert_eq!(f.bytes_per_token, 9848.0);
        assert_eq!(f.window_bytes, 61 * 128 * 1024);
        assert_eq!(f.growth_bytes, 10_326_376_448.0);
        assert_eq!(gib(f.total_bytes), "9.62");
        let kinds: Vec<_> = f.by_kind.iter().map(|k| (k.kind, k.ratio, k.layers, k.bytes_per_token)).collect();
        assert_eq!(kinds, vec![(LayerKind::Hca, 128, 31, 31.0 * 8.0), (LayerKind::Csa, 4, 30, 30.0 * 320.0)]);
        // CSA: 2×[8,1024] + 2×[8,256] fp32; HCA: 2×[128,512] fp32
        assert_eq!(f.state_bytes, 30 * (65_536 + 16_384) + 31 * 524_288);
    }

    #[test]
    fn flash_bf16_is_6_72_gib() {
        let cfg = ModelConfig::embedded("v4-flash").unwrap();
        let f = kv_footprint(&cfg, KvLayout::Bf16Reference, MIB_1);
        assert_eq!(f.bytes_per_token, 6880.0);
        assert_eq!(f.growth_bytes, 7_214_202_880.0);
        assert_eq!(f.window_bytes, 43 * 128 * 1024);
        assert_eq!(gib(f.total_bytes), "6.72");
        assert_eq!(f.by_kind.iter().map(|k| k.layers).collect::<Vec<_>>(), vec![2, 21, 20]);
    }

    #[test]
    fn pro_fp8_is_4_91_gib_of_growth() {
        let cfg = ModelConfig::embedded("v4-pro").unwrap();
        assert_eq!(KvLayout::Fp8Fp4.entry_bytes(&cfg), 584);
        assert_eq!(KvLayout::Fp8Fp4.index_key_bytes(&cfg), 68);
        let f = kv_footprint(&cfg, KvLayout::Fp8Fp4, MIB_1);
        assert_eq!(f.bytes_per_token, 30.0 * 652.0 / 4.0 + 31.0 * 584.0 / 128.0); // 5,031.44
                                                                                  // The published 4.91 GiB is the per-token growth; the 128-entry FP8 windows add 4.3 MiB.
        assert_eq!(gib(f.growth_bytes), "4.91");
        assert_eq!(f.window_bytes, 61 * 128 * 584);
        assert_eq!(gib(f.total_bytes), "4.92");
    }
}
