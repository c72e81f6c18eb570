//! NumPy's default random generator (`np.random.default_rng(seed)`: SeedSequence, then PCG64),
//! reproduced bit for bit, with the few `Generator` methods MiniGrid calls.
//!
//! MiniGrid lays out its levels with `gymnasium`'s `np_random(seed)`; drawing the same numbers
//! in the same order is what lets our environments produce the same level as the Python package
//! for the same seed, so that a policy, a benchmark or a test can move between the two.

const MULT_A: u32 = 0x931e_8875;
const INIT_A: u32 = 0x43b0_d7e5;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;
const POOL_SIZE: usize = 4;
const PCG_MULT: u128 = 0x2360_ed05_1fc6_5da4_4385_df64_9fcc_f645;

/// NumPy's `SeedSequence(seed).generate_state(n)` for a non-negative integer seed.
fn seed_sequence_state(seed: u64, n_words: usize) -> Vec<u32> {
    // The entropy as little-endian 32-bit words; 0 is one word.
    let mut entropy = vec![seed as u32];
    if seed >> 32 != 0 {
        entropy.push((seed >> 32) as u32);
    }
    let mut hash_const = INIT_A;
    let mut hashmix = |value: u32| {
        let mut v = value ^ hash_const;
        hash_const = hash_const.wrapping_mul(MULT_A);
        v = v.wrapping_mul(hash_const);
        v ^ (v >> XSHIFT)
    };
    let mix = |x: u32, y: u32| {
        let r = MIX_MULT_L
            .wrapping_mul(x)
            .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
        r ^ (r >> XSHIFT)
    };
    let mut pool = [0u32; POOL_SIZE];
    for (i, slot) in pool.iter_mut().enumerate() {
        *slot = hashmix(entropy.get(i).copied().unwrap_or(0));
    }
    for src in 0..POOL_SIZE {
        for dst in 0..POOL_SIZE {
            if src != dst {
                let h = hashmix(pool[src]);
                pool[dst] = mix(pool[dst], h);
            }
        }
    }
    for &word in entropy.iter().skip(POOL_SIZE) {
        for slot in pool.iter_mut() {
            *slot = mix(*slot, hashmix(word));
        }
    }
    let mut hash_const = INIT_B;
    (0..n_words)
        .map(|i| {
            let mut v = pool[i % POOL_SIZE] ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_B);
            v = v.wrapping_mul(hash_const);
            v ^ (v >> XSHIFT)
        })
        .collect()
}

/// `numpy.random.Generator(PCG64(SeedSequence(seed)))`.
#[derive(Debug, Clone)]
pub struct NpRandom {
    state: u128,
    inc: u128,
    /// PCG64 hands out 32-bit values in halves of one 64-bit draw, low half first.
    spare: Option<u32>,
}

impl NpRandom {
    /// The generator numpy builds for `seed`, state for state.
    pub fn new(seed: u64) -> Self {
        let w = seed_sequence_state(seed, 8);
        let u64_at = |i: usize| (w[2 * i] as u64) | ((w[2 * i + 1] as u64) << 32);
        let init_state = ((u64_at(0) as u128) << 64) | u64_at(1) as u128;
        let init_seq = ((u64_at(2) as u128) << 64) | u64_at(3) as u128;
        let mut rng = NpRandom {
            state: 0,
            inc: (init_seq << 1) | 1,
            spare: None,
        };
        rng.step();
        rng.state = rng.state.wrapping_add(init_state);
        rng.step();
        rng
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULT).wrapping_add(self.inc);
    }

    /// The next 64-bit draw.
    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let s = self.state;
        let xored = ((s >> 64) as u64) ^ (s as u64);
        xored.rotate_right((s >> 122) as u32)
    }

    /// The next 32-bit draw: half of a 64-bit one, low half first, as numpy does.
    pub fn next_u32(&mut self) -> u32 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let v = self.next_u64();
        self.spare = Some((v >> 32) as u32);
        v as u32
    }

    /// `Generator.integers(low, high)`: uniform in `[low, high)`, by Lemire's method on 32-bit
    /// draws (the ranges MiniGrid asks for are all small).
    pub fn integers(&mut self, low: i64, high: i64) -> i64 {
        assert!(high > low, "empty range {low}..{high}");
        let rng = (high - 1 - low) as u64;
        assert!(rng < u32::MAX as u64, "range too wide for this port");
        if rng == 0 {
            return low;
        }
        let rng = rng as u32;
        let excl = rng as u64 + 1;
        let mut m = self.next_u32() as u64 * excl;
        let mut leftover = m as u32;
        if (leftover as u64) < excl {
            let threshold = (u32::MAX - rng) % (rng + 1);
            while leftover < threshold {
                m = self.next_u32() as u64 * excl;
                leftover = m as u32;
            }
        }
        low + (m >> 32) as i64
    }

    /// `random_interval(max)`: uniform in `[0, max]` by masked rejection, as `shuffle` uses.
    fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        assert!(max <= u32::MAX as u64);
        loop {
            let v = self.next_u32() as u64 & mask;
            if v <= max {
                return v;
            }
        }
    }

    /// `Generator.shuffle(list)` for a Python list.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.interval(i as u64) as usize;
            items.swap(i, j);
        }
    }

    /// `Generator.choice(range(low, high))`.
    pub fn choice_range(&mut self, low: i64, high: i64) -> i64 {
        low + self.integers(0, high - low)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by NumPy 2.4: `g = np.random.default_rng(s)` then the calls below.
    #[test]
    fn draws_match_numpy() {
        let mut g = NpRandom::new(0);
        let got: Vec<i64> = (0..6).map(|_| g.integers(0, 10)).collect();
        assert_eq!(got, [8, 6, 5, 2, 3, 0]);
        let mut g = NpRandom::new(12345);
        assert_eq!(g.next_u64(), 4193609425186963869);
        let mut g = NpRandom::new(3);
        let mut v: Vec<u32> = (0..8).collect();
        g.shuffle(&mut v);
        assert_eq!(v, [6, 7, 2, 1, 4, 5, 3, 0]);
    }
}
