//! The CPU kernels carried in `vendor/` (vendor/README.md), on SmolLM2-135M's shapes.
//!
//! Run: `cargo bench --bench cpu_kernels`.
//! - `q4_1_layer/*`: the seven Q4_1 weight matrices of one layer (q, k, v, o, gate, up, down)
//!   against 1 input row (decoding) and 39 (a short prompt), on one thread. `one_pair` makes
//!   one `vec_dot` call per output; `tiles` is `vec_dot_rows`, which the matmul now uses. Both
//!   give the same bits (tests/e2e/quantized_kernels.rs).
//! - `attention/*`: mistral.rs's CPU flash attention in BF16 (the dtype the model runs in on
//!   CPU), 9 query heads over 3 KV heads of 64 dims: one decoding step at 170 cached positions,
//!   and prompts of 39 and 315 tokens, on rayon's pool.

use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ8_1, GgmlType};
use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

#[path = "../tests/e2e/common/lcg.rs"]
mod lcg;

fn values(seed: u64, len: usize) -> Vec<f32> {
    lcg::uniform(seed, len, 1.0)
}

fn quantize<T: GgmlType>(xs: &[f32]) -> Vec<T> {
    let mut blocks = vec![T::zeros(); xs.len() / T::BLCK_SIZE];
    T::from_float(xs, &mut blocks);
    blocks
}

fn q4_1_layer(c: &mut Criterion) {
    // (rows, k) of q, k, v, o, gate, up, down.
    let shapes = [
        (576, 576),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let weights: Vec<Vec<BlockQ4_1>> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(n, k))| quantize(&values(i as u64, n * k)))
        .collect();
    let mut group = c.benchmark_group("q4_1_layer");
    for m in [1, 39] {
        let inputs: Vec<Vec<BlockQ8_1>> = [576, 1536]
            .iter()
            .map(|&k| quantize(&values(100 + k as u64, m * k)))
            .collect();
        let input = |k: usize| &inputs[usize::from(k == 1536)];
        let mut out = vec![0f32; 1536 * m];
        group.bench_function(BenchmarkId::new("one_pair", m), |b| {
            b.iter(|| {
                for (w, &(n, k)) in weights.iter().zip(&shapes) {
                    let nb = k / 32;
                    for i in 0..n {
                        for r in 0..m {
                            out[i * m + r] = BlockQ4_1::vec_dot(
                                k,
                                &w[i * nb..(i + 1) * nb],
                                &input(k)[r * nb..(r + 1) * nb],
                            );
                        }
                    }
                }
            })
        });
        group.bench_function(BenchmarkId::new("tiles", m), |b| {
            b.iter(|| {
                for (w, &(n, k)) in weights.iter().zip(&shapes) {
                    BlockQ4_1::vec_dot_rows(k, w, input(k), &mut out[..n * m]);
                }
            })
        });
    }
    group.finish();
}

fn attention(c: &mut Criterion) {
    let dev = Device::Cpu;
    let tensor = |seed, shape: (usize, usize, usize, usize)| {
        let len = shape.0 * shape.1 * shape.2 * shape.3;
        Tensor::from_vec(values(seed, len), shape, &dev)?.to_dtype(DType::BF16)
    };
    let mut group = c.benchmark_group("attention");
    for (q_len, kv_len) in [(1, 170), (39, 39), (315, 315)] {
        let q = tensor(1, (1, 9, q_len, 64)).unwrap();
        let k = tensor(2, (1, 3, kv_len, 64)).unwrap();
        let v = tensor(3, (1, 3, kv_len, 64)).unwrap();
        let mask = (q_len > 1).then(|| {
            let m: Vec<f32> = (0..q_len)
                .flat_map(|i| (0..kv_len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            Tensor::from_vec(m, (q_len, kv_len), &dev)
                .and_then(|m| m.to_dtype(DType::BF16))
                .unwrap()
        });
        let id = format!("q{q_len}_kv{kv_len}");
        group.bench_function(id, |b| {
            b.iter(|| {
                mistralrs_core::cpu_flash_attn(&q, &k, &v, mask.as_ref(), 0.125, None).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, q4_1_layer, attention);
criterion_main!(benches);
