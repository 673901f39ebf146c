//! Full analysis (themes, evidence and entities) against the encoder alone, on the same
//! ~4k-token batch of the project's news texts (`benches/data/news.jsonl`), 2 threads, on the
//! default CPU path (int8 where the CPU has AVX-512 VNNI). The two are measured in one run so
//! that their ratio is not skewed by the machine's load.
//!
//! Run: `bash models/fetch.sh && cargo bench --bench analysis`. Throughput is in encoder tokens
//! per second; `themes+ner` over `encoder-only` is the cost of everything but the encoder.
//! After the criterion groups, a paired line alternates the two for 15 rounds and prints the
//! median throughput ratio. `THEMESCAN_BENCH_HEADS=DIR` measures another heads folder. A last
//! group times the neighbour vote alone for one window (`neighbour-vote/<rows>-rows`).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use themescan::{Analyzer, Article};

fn news() -> Vec<Article> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/data/news.jsonl");
    std::fs::read_to_string(path)
        .expect("benches/data/news.jsonl")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Article::new(v["id"].as_str().unwrap(), v["text"].as_str().unwrap())
        })
        .collect()
}

fn bench_analysis(c: &mut Criterion) {
    let mut builder = Analyzer::builder().threads(2);
    if let Ok(folder) = std::env::var("THEMESCAN_BENCH_HEADS") {
        builder = builder.heads(folder);
    }
    let analyzer = builder
        .build()
        .expect("the default model and heads (run `bash models/fetch.sh` first)");
    let embedder = analyzer.embedder();
    let articles = news();
    let mut batch = Vec::new();
    let mut tokens = 0;
    for a in &articles {
        if tokens >= 4096 {
            break;
        }
        tokens += embedder
            .text_encoder()
            .encode(&a.text)
            .unwrap()
            .windows
            .iter()
            .map(|w| w.ids.len())
            .sum::<usize>();
        batch.push(a.clone());
    }
    let texts: Vec<&str> = batch.iter().map(|a| a.text.as_str()).collect();
    let mut group = c.benchmark_group(format!("analysis/{:?}-2threads", embedder.cpu_path()));
    group.sample_size(10);
    group.throughput(Throughput::Elements(tokens as u64));
    group.bench_function("encoder-only", |b| {
        b.iter(|| embedder.embed(&texts).unwrap())
    });
    group.bench_function("themes+ner", |b| {
        b.iter(|| analyzer.analyze_many(&batch).unwrap())
    });
    group.finish();

    // The machine's load drifts between criterion's two blocks of samples; rounds that run
    // both back to back give a paired ratio that drift does not skew.
    let rounds = 15;
    let mut ratios = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = std::time::Instant::now();
        std::hint::black_box(embedder.embed(&texts).unwrap());
        let encoder = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        std::hint::black_box(analyzer.analyze_many(&batch).unwrap());
        ratios.push(encoder / t.elapsed().as_secs_f64());
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "paired: full-analysis throughput / encoder-only throughput, median of {rounds} rounds: {:.3} (quartiles {:.3}..{:.3})",
        ratios[rounds / 2],
        ratios[rounds / 4],
        ratios[3 * rounds / 4]
    );
}

/// The neighbour vote alone (`themescan::heads::neighbours`) for one window's pooled vector,
/// against the heads folder's index, when its card names one: the vote's share of the
/// `themes+ner` time above.
fn bench_neighbour_vote(c: &mut Criterion) {
    use themescan::heads::neighbours::NeighbourIndex;
    use themescan::heads::theme::THEME_HEAD_CARD;
    let folder = std::env::var("THEMESCAN_BENCH_HEADS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| themescan::default_heads_folder());
    let card = themescan::heads::ThemeCard::read(&folder.join(THEME_HEAD_CARD))
        .expect("a theme card in the heads folder");
    let Some(settings) = card.neighbours else {
        eprintln!("{}: no neighbour vote in the card", folder.display());
        return;
    };
    let index = NeighbourIndex::from_folder(&folder, card.input_size, card.labels.len(), settings)
        .expect("the neighbour index");
    // The cost does not depend on the vector's content: a fixed pseudo-random one.
    let window: Vec<f32> = (0..card.input_size)
        .map(|i| ((i * 2_654_435_761) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let mut group = c.benchmark_group(format!("neighbour-vote/{}-rows", index.len()));
    group.throughput(Throughput::Elements(1));
    group.bench_function("one-window", |b| b.iter(|| index.votes(&window)));
    group.finish();
}

criterion_group!(benches, bench_analysis, bench_neighbour_vote);
criterion_main!(benches);
