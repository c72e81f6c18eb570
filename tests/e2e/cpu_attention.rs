//! The CPU attention kernel carried in `vendor/mistralrs-core` (vendor/README.md) takes its
//! query-key dots eight positions at a time. It must still compute every output bit for bit as
//! mistral.rs 0.8.1 did, or greedy decoding of the embedded model could change. The reference
//! here is that release's arithmetic, transcribed for f32: one dot at a time, the online
//! softmax in position order, and for decoding the 16-position tiles and their serial
//! reduction. The embedded model runs attention in BF16 on CPU, and every element is widened
//! to f32 on the way in and rounded once on the way out, so the reference computes in f32 on
//! the widened inputs and rounds its result the same way.

use candle_core::{DType, Device, Tensor};

use crate::common::lcg;

const TILE_KV: usize = 16;
const DOT_CHUNK: usize = 4;

/// mistral.rs 0.8.1's `vec_dot_f32`.
fn vec_dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut sum = 0f32;
    let chunks = a.len() / DOT_CHUNK;
    for i in 0..chunks {
        let c = i * DOT_CHUNK;
        sum += a[c] * b[c] + a[c + 1] * b[c + 1] + a[c + 2] * b[c + 2] + a[c + 3] * b[c + 3];
    }
    for i in (chunks * DOT_CHUNK)..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

/// One step of the online softmax over V, as both 0.8.1 kernels take it.
fn softmax_step(s_val: f32, v_row: &[f32], vkq: &mut [f32], s: &mut f32, m: &mut f32) {
    let m_old = *m;
    let mut ms = 1.0f32;
    let mut vs = 1.0f32;
    if s_val > *m {
        *m = s_val;
        ms = (m_old - *m).exp();
        for v in vkq.iter_mut() {
            *v *= ms;
        }
    } else {
        vs = (s_val - *m).exp();
    }
    for (o, v) in vkq.iter_mut().zip(v_row) {
        *o += v * vs;
    }
    *s = *s * ms + vs;
}

struct Case {
    b: usize,
    h: usize,
    k_h: usize,
    q_len: usize,
    kv_len: usize,
    d: usize,
    softcap: Option<f32>,
    /// Additive mask (q_len, kv_len), or none.
    mask: Option<Vec<f32>>,
}

/// The 0.8.1 result, (batch, head, query, dim) in order. `q` is (b, h, q_len, d) and `k`/`v`
/// (b, k_h, kv_len, d), all contiguous.
fn reference(c: &Case, q: &[f32], k: &[f32], v: &[f32], scale: f32) -> Vec<f32> {
    let d = c.d;
    let q_row = |b_i: usize, h_i: usize, p: usize| &q[((b_i * c.h + h_i) * c.q_len + p) * d..][..d];
    let kv_row = |x: &'_ [f32], b_i: usize, h_i: usize, p: usize| {
        let kh = h_i / (c.h / c.k_h);
        x[((b_i * c.k_h + kh) * c.kv_len + p) * d..][..d].to_vec()
    };
    let mask = |qp: usize, kp: usize| c.mask.as_ref().map(|m| 1.0 * m[qp * c.kv_len + kp]);
    let softcap = c.softcap.unwrap_or(0.0);
    let mut out = Vec::new();
    for b_i in 0..c.b {
        for h_i in 0..c.h {
            if c.q_len == 1 {
                // Decoding: tiles of 16 positions, each with its own softmax state...
                let tiles: Vec<(Vec<f32>, f32, f32)> = (0..c.kv_len.div_ceil(TILE_KV))
                    .map(|t| {
                        let (mut vkq, mut s, mut m) = (vec![0f32; d], 0f32, f32::NEG_INFINITY);
                        for p in t * TILE_KV..((t + 1) * TILE_KV).min(c.kv_len) {
                            let mut s_val =
                                vec_dot_f32(q_row(b_i, h_i, 0), &kv_row(k, b_i, h_i, p)) * scale;
                            if softcap != 0.0 {
                                s_val = softcap * (s_val / softcap).tanh();
                            }
                            s_val += mask(0, p).unwrap_or(0.0);
                            softmax_step(s_val, &kv_row(v, b_i, h_i, p), &mut vkq, &mut s, &mut m);
                        }
                        (vkq, s, m)
                    })
                    .collect();
                // ...then merged in tile order.
                let (mut vkq, mut s, mut m) = tiles[0].clone();
                for (vkq_b, s_b, m_b) in &tiles[1..] {
                    if m >= *m_b {
                        let f = (m_b - m).exp();
                        for (v, v_b) in vkq.iter_mut().zip(vkq_b) {
                            *v += v_b * f;
                        }
                        s += s_b * f;
                    } else {
                        let f = (m - m_b).exp();
                        for (v, v_a) in vkq.iter_mut().zip(vkq_b) {
                            *v = v_a + *v * f;
                        }
                        s = s_b + s * f;
                        m = *m_b;
                    }
                }
                let inv_s = 1.0 / s;
                out.extend(vkq.iter().map(|v| v * inv_s));
            } else {
                for qp in 0..c.q_len {
                    let (mut vkq, mut s, mut m) = (vec![0f32; d], 0f32, f32::NEG_INFINITY);
                    for p in 0..c.kv_len {
                        let mv = mask(qp, p).unwrap_or(0.0);
                        if mv == f32::NEG_INFINITY {
                            continue;
                        }
                        let mut s_val = vec_dot_f32(q_row(b_i, h_i, qp), &kv_row(k, b_i, h_i, p));
                        let mut scale_applied = scale;
                        if softcap != 0.0 {
                            scale_applied /= softcap;
                        }
                        s_val *= scale_applied;
                        if softcap != 0.0 {
                            s_val = softcap * s_val.tanh();
                        }
                        s_val += mv;
                        softmax_step(s_val, &kv_row(v, b_i, h_i, p), &mut vkq, &mut s, &mut m);
                    }
                    let inv_s = 1.0 / s;
                    out.extend(vkq.iter().map(|v| v * inv_s));
                }
            }
        }
    }
    out
}

/// A causal mask over a prompt that follows `kv_len - q_len` cached positions, with a little
/// finite bias as well so that the mask values are really added.
fn causal(q_len: usize, kv_len: usize) -> Vec<f32> {
    let past = kv_len - q_len;
    (0..q_len)
        .flat_map(|i| {
            (0..kv_len).map(move |j| {
                if j > past + i {
                    f32::NEG_INFINITY
                } else {
                    ((i + 2 * j) % 5) as f32 * 0.125
                }
            })
        })
        .collect()
}

#[test]
fn vectorised_cpu_attention_is_bit_for_bit_the_0_8_1_arithmetic() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let scale = 0.125;
    let mut cases = Vec::new();
    // SmolLM2-135M: 9 query heads sharing 3 KV heads of 64 dims. Also one KV head per query
    // head, and a head size that leaves products over after the chunks of four (14).
    for (h, k_h, d) in [(9, 3, 64), (4, 4, 32), (2, 1, 14)] {
        // Decoding: one and several tiles, a tile and a group of eight cut short, and two
        // sequences in a batch, which 0.8.1 got wrong (vendor/README.md): for b > 1 the
        // reference is what 0.8.1 computes for each sequence on its own.
        for (b, kv_len) in [(1, 1), (1, 7), (1, 16), (1, 17), (1, 170), (2, 33)] {
            cases.push(Case {
                b,
                h,
                k_h,
                q_len: 1,
                kv_len,
                d,
                softcap: None,
                mask: None,
            });
        }
        // Prompts, with and without cached positions before them.
        for (b, q_len, kv_len) in [(1, 5, 5), (1, 39, 39), (1, 9, 50), (3, 12, 12), (1, 70, 70)] {
            let mask = Some(causal(q_len, kv_len));
            cases.push(Case {
                b,
                h,
                k_h,
                q_len,
                kv_len,
                d,
                softcap: None,
                mask,
            });
        }
    }
    // SmolLM2's heads with a soft cap, and a decoding step with a mask (finite only: a tile
    // masked out whole is NaN either way).
    let smollm2 = |q_len, kv_len, softcap, mask| Case {
        b: 1,
        h: 9,
        k_h: 3,
        q_len,
        kv_len,
        d: 64,
        softcap,
        mask,
    };
    cases.push(smollm2(1, 40, Some(5.0), None));
    cases.push(smollm2(20, 20, Some(5.0), Some(causal(20, 20))));
    let mask = (0..40).map(|j| (j % 3) as f32 * -0.5).collect();
    cases.push(smollm2(1, 40, None, Some(mask)));

    for dtype in [DType::F32, DType::BF16] {
        for (n, c) in cases.iter().enumerate() {
            let seed = n as u64 * 3;
            let tensor = |x: Vec<f32>, shape: (usize, usize, usize, usize)| {
                Tensor::from_vec(x, shape, &dev)?.to_dtype(dtype)
            };
            let q = tensor(
                lcg::uniform(seed, c.b * c.h * c.q_len * c.d, 4.0),
                (c.b, c.h, c.q_len, c.d),
            )?;
            let kv_shape = (c.b, c.k_h, c.kv_len, c.d);
            let k = tensor(
                lcg::uniform(seed + 1, c.b * c.k_h * c.kv_len * c.d, 4.0),
                kv_shape,
            )?;
            let v = tensor(
                lcg::uniform(seed + 2, c.b * c.k_h * c.kv_len * c.d, 2.0),
                kv_shape,
            )?;
            let mask = match &c.mask {
                Some(m) => {
                    Some(Tensor::from_vec(m.clone(), (c.q_len, c.kv_len), &dev)?.to_dtype(dtype)?)
                }
                None => None,
            };
            // The reference sees exactly what the kernel widens: the inputs as stored.
            let widened = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            let mut want_case = Case { mask: None, ..*c };
            if let Some(m) = &mask {
                want_case.mask = Some(widened(&m.unsqueeze(0)?.unsqueeze(0)?)?);
            }
            let want = reference(
                &want_case,
                &widened(&q)?,
                &widened(&k)?,
                &widened(&v)?,
                scale,
            );
            // ...and is rounded once, as the kernel rounds its f32 result.
            let want = Tensor::from_vec(want, c.b * c.h * c.q_len * c.d, &dev)?
                .to_dtype(dtype)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            let got = mistralrs_core::cpu_flash_attn(&q, &k, &v, mask.as_ref(), scale, c.softcap)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            assert_eq!(got.len(), want.len());
            let differ = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                differ,
                0,
                "{dtype:?} b={} h={} k_h={} q_len={} kv_len={} d={} softcap={:?}: {differ} of {} \
                 outputs differ",
                c.b,
                c.h,
                c.k_h,
                c.q_len,
                c.kv_len,
                c.d,
                c.softcap,
                got.len()
            );
            assert!(want.iter().all(|x| x.is_finite()) && want.iter().any(|x| x.abs() > 1e-3));
        }
    }
    Ok(())
}
