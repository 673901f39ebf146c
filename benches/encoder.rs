//! Encoder throughput on the project's multilingual news texts (`benches/data/news.jsonl`,
//! written by the project): tokenisation + windowing alone, then whole `embed` calls on the CPU
//! paths (`int8`, the default where the CPU has AVX-512 VNNI, and the f32 `reference`): one
//! article of about 300 tokens (latency), a ~4k-token batch, and all 60 articles (~17.5k
//! tokens), with 1 and 2 threads (the slow reference path: 2 threads, without the 60 articles).
//!
//! Run: `bash models/fetch.sh && cargo bench --bench encoder`. Throughput is reported in
//! tokens (elements) per second; tokens include the special and prefix tokens the encoder runs.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use themescan::{CpuPath, Embedder, ModelSource};

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

fn embedder(threads: usize, path: CpuPath) -> Embedder {
    Embedder::builder()
        .model(ModelSource::Default)
        .threads(threads)
        .cpu_path(path)
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
        total += tokens_of(e, t);
        picked.push(t.as_str());
    }
    (picked, total)
}

fn bench_tokenise(c: &mut Criterion) {
    let texts = news();
    let e = embedder(1, CpuPath::Reference);
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

fn tokens_of(e: &Embedder, text: &str) -> usize {
    e.text_encoder()
        .encode(text)
        .unwrap()
        .windows
        .iter()
        .map(|w| w.ids.len())
        .sum()
}

fn bench_encoder(c: &mut Criterion) {
    let texts = news();
    for path in [CpuPath::Int8, CpuPath::Reference] {
        let path = path.resolve();
        let mut group = c.benchmark_group(format!("encoder/{path:?}"));
        group.sample_size(10);
        // The reference path is the slow baseline: measured at 2 threads only.
        let threads_list: &[usize] = if path == CpuPath::Reference {
            &[2]
        } else {
            &[1, 2]
        };
        for &threads in threads_list {
            let e = embedder(threads, path);
            // Batch 1: the article closest to 300 tokens.
            let one = texts
                .iter()
                .min_by_key(|t| tokens_of(&e, t).abs_diff(300))
                .expect("news texts");
            let tokens = tokens_of(&e, one);
            group.throughput(Throughput::Elements(tokens as u64));
            group.bench_with_input(
                BenchmarkId::new(format!("article{tokens}"), format!("{threads}threads")),
                &[one.as_str()],
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
            if threads == 2 && path != CpuPath::Reference {
                // All 60 articles in one call, as `embed --chunk` feeds them.
                let all: Vec<&str> = texts.iter().map(String::as_str).collect();
                let tokens: usize = all.iter().map(|t| tokens_of(&e, t)).sum();
                group.throughput(Throughput::Elements(tokens as u64));
                group.bench_with_input(
                    BenchmarkId::new("news60", format!("{threads}threads")),
                    &all,
                    |b, all| b.iter(|| e.embed(all).unwrap()),
                );
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench_tokenise, bench_encoder);
criterion_main!(benches);
