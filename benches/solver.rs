//! Criterion bench of `lsap::linear_sum_assignment` (scipy's contract) on uniform random
//! f64 matrices of the shapes DETR matching produces (Q×T, tall: solved transposed) and a
//! square one. The Python comparison against scipy is `benches/bench_matcher.py`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ka_rs::lsap::{linear_sum_assignment, LsapWorkspace};
use ndarray::Array2;
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

fn solver(c: &mut Criterion) {
    let mut g = c.benchmark_group("lsap");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for &(n, m) in &[(300usize, 7usize), (300, 50), (900, 50), (300, 300)] {
        let cost = Array2::from_shape_fn((n, m), |_| rng.next());
        g.bench_with_input(
            BenchmarkId::new("solve", format!("{n}x{m}")),
            &cost,
            |b, cost| b.iter(|| linear_sum_assignment(black_box(cost.view()), false)),
        );
        // the matcher's inner call: contiguous wide block, reused workspace, no copies
        let wide = cost.t().as_standard_layout().into_owned();
        let flat = wide.as_slice().map(<[f64]>::to_vec).unwrap_or_default();
        let (nr, nc) = (m.min(n), m.max(n));
        let mut ws = LsapWorkspace::new();
        g.bench_with_input(
            BenchmarkId::new("solve_wide_workspace", format!("{nr}x{nc}")),
            &flat,
            |b, flat| b.iter(|| ws.solve_wide(black_box(flat), nr, nc).map(|c| c[0])),
        );
    }
    g.finish();
}

criterion_group!(benches, solver);
criterion_main!(benches);
