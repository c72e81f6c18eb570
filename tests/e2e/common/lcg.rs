//! Deterministic inputs for the kernel tests and benches: a 64-bit linear congruential
//! generator (Knuth's MMIX constants), so that every run and every file sees the same numbers
//! without tying them to a `rand` version's streams.

pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Lcg(seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407))
    }

    /// The next value, uniform in [-0.5, 0.5).
    pub fn next_centered(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as f32) / (1u64 << 31) as f32 - 0.5
    }
}

/// `len` values uniform in [-scale/2, scale/2).
#[allow(dead_code)] // each includer compiles this file on its own; not all of them use it
pub fn uniform(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut r = Lcg::new(seed);
    (0..len).map(|_| r.next_centered() * scale).collect()
}
