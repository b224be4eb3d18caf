//! Criterion bench of `targets::build_pseudo_targets`: B = 32 images, 2 softmax teachers
//! (VOC 10+10, Q = 100, ~12 confident queries per teacher and image), with and without NMS.
//! The Python-level comparison against a per-label loop is `benches/bench_targets.py`.

use criterion::{criterion_group, criterion_main, Criterion};
use ka_rs::targets::{build_pseudo_targets, PseudoTargetConfig, TeacherKind, TeacherOutputs};
use ndarray::{Array1, Array3};
use std::hint::black_box;

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

fn teacher(rng: &mut Rng, b: usize, q: usize, c: usize) -> (Array3<f32>, Array3<f32>) {
    let logits = Array3::from_shape_fn((b, q, c + 1), |(_, qi, j)| {
        let noise = 2.0 * rng.next() - 1.0;
        match (qi % 8 == 0, j) {
            (true, j) if j == qi % c => noise + 6.0, // a confident detection
            (_, j) if j == c => noise + 3.0,         // "no object" otherwise
            _ => noise,
        }
    });
    let boxes = Array3::from_shape_fn((b, q, 4), |(_, _, j)| {
        if j < 2 {
            0.2 + 0.6 * rng.next()
        } else {
            0.05 + 0.3 * rng.next()
        }
    });
    (logits, boxes)
}

fn bench(c: &mut Criterion) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (b, q, classes) = (32, 100, 10);
    let (l0, b0) = teacher(&mut rng, b, q, classes);
    let (l1, b1) = teacher(&mut rng, b, q, classes);
    let m0 = Array1::from_iter(0..classes as i64);
    let m1 = Array1::from_iter(classes as i64..2 * classes as i64);
    let teachers = [
        TeacherOutputs {
            logits: l0.view(),
            boxes: b0.view(),
            local_to_union: m0.view(),
            kind: TeacherKind::Softmax,
        },
        TeacherOutputs {
            logits: l1.view(),
            boxes: b1.view(),
            local_to_union: m1.view(),
            kind: TeacherKind::Softmax,
        },
    ];
    for (name, nms) in [("no_nms", None), ("nms_0.7", Some(0.7))] {
        let config =
            PseudoTargetConfig::new(2 * classes as i64, 0.1, 50, -5.0, nms).expect("valid config");
        c.bench_function(&format!("build_pseudo_targets/b32_q100_2t/{name}"), |bn| {
            bn.iter(|| build_pseudo_targets(black_box(&teachers), black_box(&config)))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
