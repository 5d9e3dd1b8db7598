//! The memory-efficient attention against the plain one (`attention_forward`/`attention_backward`, which
//! keep the full probability matrix): fresh random inputs, CPU f32, packed rows with padding, sequence
//! lengths that are not a multiple of the block, one block, and blocks of one row; grouped-query heads (K and
//! V with fewer heads, the plain attention given them repeated and its dK, dV summed over each group).

use bessie::ops::repeat_kv;
use bessie::rng::Rng;
use bessie::train::layers::{
    attention_backward, attention_forward, flash_attention_backward, flash_attention_forward, Windows,
};
use bessie::train::model::window_starts;
use candle_core::{Device, Tensor};

fn random(rng: &mut Rng, shape: (usize, usize, usize, usize)) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    Tensor::from_vec((0..n).map(|_| rng.normal() as f32).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
}

/// The dense additive mask the plain attention takes: query i sees key j <= i of its own segment; padding
/// (segment 0) sees only itself. Written out independently of `window_starts`.
fn dense_mask(segments: &[u32], batch: usize, seq: usize) -> Tensor {
    let mut mask = vec![f32::NEG_INFINITY; batch * seq * seq];
    for r in 0..batch {
        let seg = &segments[r * seq..(r + 1) * seq];
        for i in 0..seq {
            for j in 0..=i {
                if i == j || (seg[i] != 0 && seg[i] == seg[j]) {
                    mask[(r * seq + i) * seq + j] = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(mask, (batch, 1, seq, seq), &Device::Cpu).unwrap()
}

fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    let diff = (got - want).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    let norm = want.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    assert!(norm > 0.0, "{what}: zero reference");
    assert!(diff <= 2e-6 * norm, "{what}: relative error {}", diff / norm);
}

fn check(segments: &[u32], batch: usize, (heads, kv_heads): (usize, usize), dim: usize, block: usize, seed: u64) {
    let seq = segments.len() / batch;
    let mut rng = Rng::new(seed);
    let (shape, kv_shape) = ((batch, heads, seq, dim), (batch, kv_heads, seq, dim));
    let (q, k, v, dy) =
        (random(&mut rng, shape), random(&mut rng, kv_shape), random(&mut rng, kv_shape), random(&mut rng, shape));
    let start = Windows::new(window_starts(segments, seq).unwrap(), batch, seq, &Device::Cpu).unwrap();

    let groups = heads / kv_heads;
    let (ke, ve) = (repeat_kv(&k, groups).unwrap(), repeat_kv(&v, groups).unwrap());
    let (want_y, saved) = attention_forward(&q, &ke, &ve, &dense_mask(segments, batch, seq)).unwrap();
    let (dq, dk, dv) = attention_backward(&dy, &saved).unwrap();
    let summed = |g: Tensor| g.reshape((batch, kv_heads, groups, seq, dim)).unwrap().sum(2).unwrap();
    let want = (dq, summed(dk), summed(dv));
    let (y, saved) = flash_attention_forward(&q, &k, &v, &start, block).unwrap();
    let got = flash_attention_backward(&dy, &saved, &start, block).unwrap();
    assert_eq!(got.1.dims(), k.dims(), "dk has K's heads");
    let at = format!("seq {seq}, block {block}, {heads} heads sharing {kv_heads}");
    assert_close(&y, &want_y, &format!("output ({at})"));
    assert_close(&got.0, &want.0, &format!("dq ({at})"));
    assert_close(&got.1, &want.1, &format!("dk ({at})"));
    assert_close(&got.2, &want.2, &format!("dv ({at})"));
}

#[test]
fn blocked_attention_equals_plain_attention() {
    // Row 0: three packed examples; row 1: one example, then padding.
    let segments: Vec<u32> = [vec![1; 6], vec![2; 4], vec![3; 7], vec![4; 9], vec![0; 8]].concat();
    for block in [1, 4, 5, 17, 64] {
        check(&segments, 2, (3, 3), 8, block, block as u64);
    }
    // Grouped-query heads: four query heads on two key/value heads, and six on one.
    check(&segments, 2, (4, 2), 8, 5, 7);
    check(&segments, 2, (6, 1), 8, 64, 8);
    // One unpacked causal row.
    check(&[1; 37], 1, (2, 2), 16, 8, 99);
}

#[test]
fn window_starts_need_contiguous_segments() {
    assert_eq!(window_starts(&[1, 1, 2, 2, 2, 0, 0], 7).unwrap(), [0.0, 0.0, 2.0, 2.0, 2.0, 5.0, 6.0]);
    // Rows are independent: the second row starts again at 0.
    assert_eq!(window_starts(&[1, 1, 1, 1, 0, 0], 3).unwrap(), [0.0, 0.0, 0.0, 0.0, 1.0, 2.0]);
    let err = window_starts(&[1, 1, 2, 1], 4).unwrap_err().to_string();
    assert!(err.contains("segment 1 is not one contiguous run"), "{err}");
}
