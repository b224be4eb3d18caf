//! `match_layers` (B=32, Q=300, DETR costs) right after an idle pause, and again at once:
//! shows how long this machine takes to get the pool's helper thread going after idling.
//!
//!     KA_RS_NUM_THREADS=1 cargo run --release --example matcher_after_idle -- 0.05
//!     KA_RS_NUM_THREADS=2 cargo run --release --example matcher_after_idle -- 0.05
//!     KA_RS_NUM_THREADS=2 cargo run --release --example matcher_after_idle -- 0.0005
//!
//! (pause in seconds; medians of 40 rounds). The README's thread caveat quotes these.

use ka_rs::cost::CostParams;
use ka_rs::matcher::match_layers;
use ndarray::{Array1, Array2, Array4};
use std::time::{Duration, Instant};

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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let pause: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.05);
    let (b, q, k) = (32usize, 300usize, 92usize);
    let mut r = Rng(7);
    let logits = Array4::from_shape_fn((1, b, q, k), |_| 6.0 * r.next() - 3.0);
    let boxes = Array4::from_shape_fn(
        (1, b, q, 4),
        |(.., c)| {
            if c < 2 {
                r.next()
            } else {
                0.5 * r.next()
            }
        },
    );
    let sizes: Vec<i64> = (0..b).map(|_| 1 + (r.next() * 50.0) as i64 % 50).collect();
    let total = sizes.iter().sum::<i64>() as usize;
    let labels = Array1::from_shape_fn(total, |_| (r.next() * 91.0) as i64 % 91);
    let tboxes = Array2::from_shape_fn(
        (total, 4),
        |(_, c)| {
            if c < 2 {
                r.next()
            } else {
                0.5 * r.next()
            }
        },
    );
    let sizes = Array1::from(sizes);
    let params = CostParams::detr();
    let call = || {
        let t0 = Instant::now();
        let out = match_layers(
            logits.view(),
            boxes.view(),
            labels.view(),
            tboxes.view(),
            sizes.view(),
            &params,
        );
        std::hint::black_box(out.expect("valid random batch"));
        t0.elapsed().as_secs_f64() * 1e6
    };
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for _ in 0..40 {
        std::thread::sleep(Duration::from_secs_f64(pause));
        first.push(call());
        second.push(call());
    }
    println!(
        "after a {pause} s pause: first call {:.0} µs, the call right after {:.0} µs (median)",
        median(first),
        median(second)
    );
}
