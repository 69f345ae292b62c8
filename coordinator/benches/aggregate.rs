//! Aggregation throughput: folding one update into the round's running sum
//! (`MeanSum::fold`, as the mean does for every accepted update), in f64
//! and f32 precision, beside a memory-bandwidth baseline measured in the
//! same run: a plain `a += b` over the same bytes.
//!
//!   cargo bench -p coordinator --bench aggregate
//!
//! Throughput is bytes of update read per second.

use std::hint::black_box;
use std::sync::Arc;

use coordinator::core::strategy::aggregate::lock;
use coordinator::core::strategy::{Aggregator, Precision, RoundAggregate, UpdateSource};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn update(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i % 1000) as f32 - 500.0) * 1e-4).collect()
}

fn bench(c: &mut Criterion) {
    for (label, n) in [("1M", 1_000_000usize), ("25M", 25_286_730)] {
        let mut g = c.benchmark_group(format!("aggregate/{label}"));
        g.sample_size(20);
        g.throughput(Throughput::Bytes(4 * n as u64));
        let b = update(n);
        let mut a = vec![0f32; n];
        g.bench_function("baseline a+=b (f32)", |bench| {
            bench.iter(|| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += *y;
                }
                black_box(&a);
            })
        });
        let source: Arc<dyn UpdateSource> = Arc::new(update(n));
        for (name, precision) in [("fold f64 sum", Precision::F64), ("fold f32 sum", Precision::F32)] {
            let mut round = RoundAggregate::new(Aggregator::Mean, n, precision, false);
            let target = round.accept(source.clone(), 1.0).expect("the mean folds");
            g.bench_function(name, |bench| {
                bench.iter(|| lock(&target).fold(&*source, 1.0, 1.0).unwrap())
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
