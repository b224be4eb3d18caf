//! Criterion bench of `matcher::match_layers` (one decoder layer, softmax DETR costs 1/5/2,
//! 92 logits = 91 classes + no-object) at B ∈ {8, 32, 64} × Q ∈ {100, 300, 900}, with
//! 1..=50 targets per image. Work is spread over the process-local pool above the
//! threshold (set `KA_RS_NUM_THREADS=1` to time one core). The Python comparison against
//! DETR's torch + scipy matcher is `benches/bench_matcher.py`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ka_rs::cost::CostParams;
use ka_rs::matcher::match_layers;
use ndarray::{Array1, Array2, Array4};
use std::hint::black_box;
use std::time::Duration;

/// xorshift64* in [0, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32
    }
}

struct Batch {
    logits: Array4<f32>,
    boxes: Array4<f32>,
    labels: Array1<i64>,
    tboxes: Array2<f32>,
    sizes: Array1<i64>,
}

fn batch(rng: &mut Rng, b: usize, q: usize, k: usize, tmax: usize) -> Batch {
    let logits = Array4::from_shape_fn((1, b, q, k), |_| 6.0 * rng.next() - 3.0);
    let boxes = Array4::from_shape_fn((1, b, q, 4), |(.., c)| {
        if c < 2 {
            rng.next()
        } else {
            0.5 * rng.next()
        }
    });
    let sizes: Vec<i64> = (0..b)
        .map(|_| 1 + (rng.next() * tmax as f32) as i64 % tmax as i64)
        .collect();
    let total = sizes.iter().sum::<i64>() as usize;
    let labels = Array1::from_shape_fn(total, |_| {
        (rng.next() * (k - 1) as f32) as i64 % (k as i64 - 1)
    });
    let tboxes = Array2::from_shape_fn((total, 4), |(_, c)| {
        if c < 2 {
            rng.next()
        } else {
            0.5 * rng.next()
        }
    });
    Batch {
        logits,
        boxes,
        labels,
        tboxes,
        sizes: Array1::from(sizes),
    }
}

fn matcher(c: &mut Criterion) {
    let mut g = c.benchmark_group("match_layers");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let params = CostParams::detr();
    for &b in &[8usize, 32, 64] {
        for &q in &[100usize, 300, 900] {
            let x = batch(&mut rng, b, q, 92, 50);
            g.bench_with_input(
                BenchmarkId::new("detr", format!("B{b}_Q{q}")),
                &x,
                |bch, x| {
                    bch.iter(|| {
                        match_layers(
                            black_box(x.logits.view()),
                            x.boxes.view(),
                            x.labels.view(),
                            x.tboxes.view(),
                            x.sizes.view(),
                            &params,
                        )
                    })
                },
            );
        }
    }
    // the focal (Deformable DETR) cost at the common size
    let x = batch(&mut rng, 32, 300, 91, 50);
    let focal = CostParams::deformable();
    g.bench_function("deformable/B32_Q300", |bch| {
        bch.iter(|| {
            match_layers(
                black_box(x.logits.view()),
                x.boxes.view(),
                x.labels.view(),
                x.tboxes.view(),
                x.sizes.view(),
                &focal,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, matcher);
criterion_main!(benches);
