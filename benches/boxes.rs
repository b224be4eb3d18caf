//! Criterion bench of the pairwise box ops (`box_iou`, `generalized_box_iou`) at
//! 1000×1000 in f32 and f64, and of class-aware NMS on 1000 boxes. The Python comparison
//! against torch's broadcasting formula is `benches/bench_matcher.py`.

use criterion::{criterion_group, criterion_main, Criterion};
use ka_rs::boxes::{batched_nms, box_iou, generalized_box_iou};
use ndarray::{Array1, Array2};
use std::hint::black_box;
use std::time::Duration;

/// xorshift64* in [0, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn xyxy(rng: &mut Rng, n: usize) -> Array2<f64> {
    let mut v = Vec::with_capacity(n * 4);
    for _ in 0..n {
        let (x, y, w, h) = (rng.next(), rng.next(), 0.3 * rng.next(), 0.3 * rng.next());
        v.extend_from_slice(&[x, y, x + w, y + h]);
    }
    Array2::from_shape_vec((n, 4), v).unwrap_or_else(|_| Array2::zeros((n, 4)))
}

fn boxes(c: &mut Criterion) {
    let mut g = c.benchmark_group("boxes");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let mut rng = Rng(42);
    let (a, b) = (xyxy(&mut rng, 1000), xyxy(&mut rng, 1000));
    let (a32, b32) = (a.mapv(|x| x as f32), b.mapv(|x| x as f32));
    g.bench_function("box_iou/f32/1000x1000", |bch| {
        bch.iter(|| box_iou(black_box(a32.view()), b32.view()))
    });
    g.bench_function("box_iou/f64/1000x1000", |bch| {
        bch.iter(|| box_iou(black_box(a.view()), b.view()))
    });
    g.bench_function("generalized_box_iou/f32/1000x1000", |bch| {
        bch.iter(|| generalized_box_iou(black_box(a32.view()), b32.view()))
    });
    let scores = Array1::from_shape_fn(1000, |_| rng.next() as f32);
    let labels = Array1::from_shape_fn(1000, |i| (i % 20) as i64);
    g.bench_function("batched_nms/f32/1000", |bch| {
        bch.iter(|| batched_nms(black_box(a32.view()), scores.view(), labels.view(), 0.5))
    });
    g.finish();
}

criterion_group!(benches, boxes);
criterion_main!(benches);
