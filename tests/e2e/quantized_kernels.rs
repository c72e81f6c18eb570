//! The CPU changes carried in `vendor/candle-core` (vendor/README.md) must not change a single
//! bit of what the model computes: greedy decoding of the embedded model depends on it. These
//! tests hold the patched code to the unpatched arithmetic, on the shapes SmolLM2-135M uses.

use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ8_1, GgmlType};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::common::lcg;

/// Deterministic values with the spread of real activations and weights: mostly small, some
/// large, both signs, and whole blocks of zeros (a zero scale) now and then.
fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut r = lcg::Lcg::new(seed);
    (0..len)
        .map(|i| {
            let u = r.next_centered();
            if (i / 32) % 11 == 7 {
                0.0
            } else if i % 17 == 0 {
                u * 40.0
            } else {
                u
            }
        })
        .collect()
}

fn quantize<T: GgmlType>(xs: &[f32]) -> Vec<T> {
    let mut blocks = vec![T::zeros(); xs.len() / T::BLCK_SIZE];
    T::from_float(xs, &mut blocks);
    blocks
}

#[test]
fn avx2_q4_1_dot_is_bit_for_bit_the_scalar_one() {
    const {
        assert!(
            cfg!(target_feature = "avx2"),
            "built without AVX2: .cargo/config.toml sets the x86-64-v3 baseline this test checks"
        )
    };
    // 576 and 1536 are SmolLM2-135M's hidden and MLP widths; 96 has no full group of 8 blocks.
    for (seed, k) in [(1, 576), (2, 1536), (3, 96), (4, 32 * 8), (5, 32 * 9)] {
        let x = quantize::<BlockQ4_1>(&values(seed, k));
        let y = quantize::<BlockQ8_1>(&values(seed + 100, k));
        let fast = BlockQ4_1::vec_dot(k, &x, &y);
        let scalar = BlockQ4_1::vec_dot_unopt(k, &x, &y);
        assert_eq!(
            fast.to_bits(),
            scalar.to_bits(),
            "k={k}: {fast} vs {scalar}"
        );
        assert!(
            scalar.abs() > 1e-3,
            "k={k}: a degenerate input proves nothing"
        );
    }
}

/// Every output of a quantised matmul, for one input row (decoding) and for several (a
/// prompt, whose rows the Q4_1 kernel takes four at a time), must be the scalar dot product of
/// that weight row with that input row, as the unpatched loop computed it.
#[test]
fn matmul_outputs_are_the_scalar_dots() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (k, n) in [(576, 200), (1536, 70)] {
        let nb = k / 32;
        let w = values(7, n * k);
        let mm = QMatMul::from_qtensor(QTensor::quantize(
            &Tensor::from_vec(w.clone(), (n, k), &dev)?,
            GgmlDType::Q4_1,
        )?)?;
        let wq = quantize::<BlockQ4_1>(&w);
        for m in [1, 3, 4, 5, 9] {
            let x = values(8 + m as u64, m * k);
            let xq = quantize::<BlockQ8_1>(&x);
            let got = mm
                .forward(&Tensor::from_vec(x, (m, k), &dev)?)?
                .to_vec2::<f32>()?;
            for (r, row) in got.iter().enumerate() {
                for (i, v) in row.iter().enumerate() {
                    let want = BlockQ4_1::vec_dot_unopt(
                        k,
                        &wq[i * nb..(i + 1) * nb],
                        &xq[r * nb..(r + 1) * nb],
                    );
                    assert_eq!(v.to_bits(), want.to_bits(), "k={k} m={m} ({r},{i})");
                }
            }
        }
    }
    Ok(())
}

/// A prompt's rows go through the reordered loop; each output must equal the one-row product,
/// which takes the unchanged path, for every quantisation the loader may hand it.
#[test]
fn many_row_matmul_equals_row_by_row() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (n, k, m) = (200, 576, 7);
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let w = Tensor::from_vec(values(7, n * k), (n, k), &dev)?;
        let mm = QMatMul::from_qtensor(QTensor::quantize(&w, dtype)?)?;
        let xs = Tensor::from_vec(values(8, m * k), (m, k), &dev)?;
        let all = mm.forward(&xs)?.to_vec2::<f32>()?;
        for (r, row) in all.iter().enumerate() {
            let one = mm.forward(&xs.narrow(0, r, 1)?)?.to_vec2::<f32>()?;
            let same = row
                .iter()
                .zip(&one[0])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{dtype:?}: row {r} differs from its one-row product");
        }
    }
    Ok(())
}
