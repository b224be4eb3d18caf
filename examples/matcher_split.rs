//! Where the matcher's time goes, on one core: cost-block build vs exact solve for 32 random
//! DETR images (92 logits, 1..=50 targets each), medians over 180 back-to-back rounds.
//!
//!     cargo run --release --example matcher_split            # Q = 300, softmax costs
//!     cargo run --release --example matcher_split -- 100 focal
//!
//! The README's "1563 → 985 µs" step list was measured with this program; it uses only
//! `cost::build_block` and `LsapWorkspace::solve_wide`, which older commits have too, so
//! copying it onto one (e.g. `ead513e`) gives the "before" figures.

use ka_rs::cost::{build_block, BlockId, CostParams, CostWorkspace};
use ka_rs::lsap::LsapWorkspace;
use std::time::Instant;

/// xorshift64* in [0, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32
    }
    fn cxcywh(&mut self) -> [f32; 4] {
        [
            self.next(),
            self.next(),
            0.5 * self.next(),
            0.5 * self.next(),
        ]
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let q: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(300);
    let params = if args.iter().any(|a| a == "focal") {
        CostParams::deformable()
    } else {
        CostParams::detr()
    };
    let (k, images) = (92usize, 32usize);
    let mut r = Rng(12345);
    let problems: Vec<_> = (0..images)
        .map(|_| {
            let t = 1 + (r.next() * 50.0) as usize % 50;
            let logits: Vec<f32> = (0..q * k).map(|_| 6.0 * r.next() - 3.0).collect();
            let boxes: Vec<f32> = (0..q).flat_map(|_| r.cxcywh()).collect();
            let labels: Vec<usize> = (0..t).map(|_| (r.next() * 91.0) as usize % 91).collect();
            let tboxes: Vec<f32> = (0..t).flat_map(|_| r.cxcywh()).collect();
            (logits, boxes, labels, tboxes)
        })
        .collect();
    let (mut ws, mut lsap) = (CostWorkspace::new(), LsapWorkspace::new());
    let (mut build, mut solve) = (Vec::new(), Vec::new());
    for round in 0..200 {
        let (mut b, mut s) = (0.0, 0.0);
        for (image, (logits, boxes, labels, tboxes)) in problems.iter().enumerate() {
            let id = BlockId { layer: 0, image };
            let t0 = Instant::now();
            build_block(&mut ws, logits, k, boxes, labels, tboxes, &params, id)
                .expect("valid random problem");
            let t1 = Instant::now();
            lsap.solve_wide(&ws.cost, labels.len(), q)
                .expect("feasible random problem");
            s += t1.elapsed().as_secs_f64();
            b += (t1 - t0).as_secs_f64();
        }
        if round >= 20 {
            build.push(b);
            solve.push(s);
        }
    }
    let targets: usize = problems.iter().map(|p| p.2.len()).sum();
    println!(
        "{images} images, Q={q}, {targets} targets: cost build {:.1} µs, solve {:.1} µs \
         per batch (median, one core)",
        median(build) * 1e6,
        median(solve) * 1e6
    );
}
