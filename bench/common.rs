//! Shared by the benchmarks (each includes it with `#[path = "common.rs"] mod common;`).

/// SplitMix64: a fast, well-mixed pseudo-random step.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Fills `buf` with pseudo-random bytes determined by `seed` (incompressible, and no two
/// seeds share runs of words).
pub fn fill(buf: &mut [u8], seed: u64) {
    for (i, c) in buf.chunks_mut(8).enumerate() {
        let v = splitmix(seed ^ (i as u64).wrapping_mul(0x100_0000_01B3)).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}
