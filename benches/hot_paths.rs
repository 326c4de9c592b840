//! Micro-benchmarks of the per-request hot paths: route parsing, digest verification
//! throughput (sha2 uses the CPU's SHA extensions when present), and Accept matching.
//! `cargo bench --bench hot_paths`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use entrepot::oci::{media, Algorithm, Hasher, Route};
use std::hint::black_box;

fn routes(c: &mut Criterion) {
    let blob = format!(
        "/v2/docker.io/library/alpine/blobs/sha256:{}",
        "ab".repeat(32)
    );
    c.bench_function("route/blob", |b| {
        b.iter(|| Route::parse(black_box(&blob)).unwrap())
    });
    c.bench_function("route/manifest_tag", |b| {
        b.iter(|| Route::parse(black_box("/v2/org/team/app/manifests/v1.2.3")).unwrap())
    });
}

fn digest(c: &mut Criterion) {
    let data = vec![0x5au8; 1 << 20];
    let mut g = c.benchmark_group("verify");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("sha256_1MiB", |b| {
        b.iter(|| {
            let mut h = Hasher::new(Algorithm::Sha256);
            h.update(black_box(&data));
            h.finish()
        })
    });
    g.finish();
}

fn accept(c: &mut Criterion) {
    let accept = "application/vnd.docker.distribution.manifest.v2+json, \
                  application/vnd.docker.distribution.manifest.list.v2+json, \
                  application/vnd.oci.image.manifest.v1+json, \
                  application/vnd.oci.image.index.v1+json, */*";
    c.bench_function("accept/index", |b| {
        b.iter(|| media::accepts([black_box(accept)], media::OCI_INDEX))
    });
}

criterion_group!(benches, routes, digest, accept);
criterion_main!(benches);
