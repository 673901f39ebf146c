//! Encoder throughput on the project's multilingual news texts (`benches/data/news.jsonl`,
//! written by the project): tokenisation + windowing alone, then whole `embed` calls at batch 1
//! (one article) and at a ~4k-token batch, with 1 and 2 threads, on CPU in f32.
//!
//! Run: `bash models/fetch.sh && cargo bench --bench encoder`. Throughput is reported in
//! tokens (elements) per second; tokens include the special and prefix tokens the encoder runs.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use themescan::{Embedder, ModelSource};

fn news() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/data/news.jsonl");
    std::fs::read_to_string(path)
        .expect("benches/data/news.jsonl")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn embedder(threads: usize) -> Embedder {
    Embedder::builder()
        .model(ModelSource::Default)
        .threads(threads)
        .build()
        .expect("the default model (run `bash models/fetch.sh` first)")
}

/// Articles from the start of `texts` until about `tokens` encoder tokens.
fn take_tokens<'a>(e: &Embedder, texts: &'a [String], tokens: usize) -> (Vec<&'a str>, usize) {
    let mut picked = Vec::new();
    let mut total = 0;
    for t in texts {
        if total >= tokens {
            break;
        }
        total += e
            .text_encoder()
            .encode(t)
            .unwrap()
            .windows
            .iter()
            .map(|w| w.ids.len())
            .sum::<usize>();
        picked.push(t.as_str());
    }
    (picked, total)
}

fn bench_tokenise(c: &mut Criterion) {
    let texts = news();
    let e = embedder(1);
    let bytes: usize = texts.iter().map(String::len).sum();
    let mut group = c.benchmark_group("tokenise+window");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("news60", |b| {
        b.iter(|| {
            texts
                .iter()
                .map(|t| e.text_encoder().encode(t).unwrap().content_tokens)
                .sum::<usize>()
        })
    });
    group.finish();
}

fn bench_encoder(c: &mut Criterion) {
    let texts = news();
    let mut group = c.benchmark_group("encoder/cpu-f32");
    group.sample_size(10);
    for threads in [1, 2] {
        let e = embedder(threads);
        // Batch 1: one article of typical length.
        let (one, tokens) = take_tokens(&e, &texts[3..], 1);
        group.throughput(Throughput::Elements(tokens as u64));
        group.bench_with_input(
            BenchmarkId::new("batch1", format!("{threads}threads")),
            &one,
            |b, one| b.iter(|| e.embed(one).unwrap()),
        );
        // A ~4k-token batch of articles of mixed length and language.
        let (many, tokens) = take_tokens(&e, &texts, 4096);
        group.throughput(Throughput::Elements(tokens as u64));
        group.bench_with_input(
            BenchmarkId::new("batch4k", format!("{threads}threads")),
            &many,
            |b, many| b.iter(|| e.embed(many).unwrap()),
        );
    }
    group.finish();
}

criterion_group!(benches, bench_tokenise, bench_encoder);
criterion_main!(benches);
