//! Encode and decode throughput of every update codec on a 25 M-value
//! update (the S3 model's size), in bytes of f32 input per second.
//!
//!   cargo bench -p fedge-common --bench codecs

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fedge_common::codec::{Codec, decode};

fn bench(c: &mut Criterion) {
    let n = 25_286_730usize;
    let values: Vec<f32> = (0..n).map(|i| ((i * 7919 % 10007) as f32 - 5000.0) * 1e-5).collect();
    let codecs = [
        Codec::F32,
        Codec::F16,
        Codec::Bf16,
        Codec::from_parts("int8", 256, 0.01).unwrap(),
        Codec::from_parts("topk", 256, 0.01).unwrap(),
        Codec::from_parts("sign", 256, 0.01).unwrap(),
    ];
    let mut g = c.benchmark_group("codec/25M");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(4 * n as u64));
    for codec in codecs {
        let payload = codec.encode(&values, 7);
        g.bench_function(format!("encode {}", codec.name()), |b| {
            b.iter(|| black_box(codec.encode(black_box(&values), 7)))
        });
        g.bench_function(format!("decode {}", codec.name()), |b| {
            b.iter(|| black_box(decode(&codec, n, black_box(&payload)).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
