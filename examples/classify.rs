//! Classifies articles: JSONL in, one JSONL line out per line in, same order.
//!
//! ```text
//! cargo run --release --example classify -- --input IN.jsonl --output OUT.jsonl
//! ```
//! IN: objects with string fields `id` and `text` (others ignored). OUT: `{"id", "themes":
//! [{"theme","score"}] (all four), "labels", "evidence": [{"theme","start","end","score"}],
//! "entities": [{"text","label","start","end","score"}], "error": null | "message"}`;
//! `start`/`end` are byte offsets into `text`.
//! A bad line gets an `error` line and the run goes on; the exit status is 1 if any failed.

use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use themescan::entities::Entity;
use themescan::{Analysis, Analyzer, Article, Evidence, ModelSource, Theme, ThemeScore};

#[derive(Parser)]
#[command(about = "Find extremism-related themes in JSONL articles")]
struct Args {
    /// Input JSONL (`-` for stdin).
    #[arg(long)]
    input: PathBuf,
    /// Output JSONL (`-` for stdout).
    #[arg(long, default_value = "-")]
    output: PathBuf,
    /// Encoder model folder (default: models/multilingual-e5-small).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Heads folder (default: models/heads).
    #[arg(long)]
    heads: Option<PathBuf>,
    /// Encoder threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Padded tokens per encoder batch (default: 1024 on CPU, 16384 on a GPU).
    #[arg(long)]
    batch_tokens: Option<usize>,
    /// cpu, cuda, cuda:N, metal or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Articles analysed per call; their windows share encoder batches.
    #[arg(long, default_value = "32")]
    chunk: usize,
    /// No summary on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(Serialize)]
struct OutputLine<'a> {
    id: Option<&'a str>,
    themes: &'a [ThemeScore],
    labels: &'a [Theme],
    evidence: &'a [Evidence],
    entities: &'a [Entity],
    error: Option<&'a str>,
}

fn parse_line(
    line: std::io::Result<String>,
    number: usize,
) -> (Option<String>, Result<String, String>) {
    let line = match line {
        Ok(l) => l,
        Err(e) => return (None, Err(format!("line {number}: unreadable: {e}"))),
    };
    let value: serde_json::Value = match serde_json::from_str(&line) {
        Ok(v) => v,
        Err(e) => return (None, Err(format!("line {number}: invalid JSON: {e}"))),
    };
    let id = value.get("id").and_then(|v| v.as_str()).map(str::to_string);
    let text = value
        .get("text")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    match (id, text) {
        (None, _) => (
            None,
            Err(format!("line {number}: missing string field `id`")),
        ),
        (Some(id), None) => (
            Some(id),
            Err(format!("line {number}: missing string field `text`")),
        ),
        (Some(id), Some(text)) => (Some(id), Ok(text)),
    }
}

/// Analyses a chunk in one call; if that fails, one by one, so a failure stays with its record.
fn analyze_isolating_failures(
    analyzer: &Analyzer,
    articles: &[Article],
) -> Vec<Result<Analysis, String>> {
    match analyzer.analyze_many(articles) {
        Ok(all) => all.into_iter().map(Ok).collect(),
        Err(_) if articles.len() > 1 => articles
            .iter()
            .map(|a| analyzer.analyze(a).map_err(|e| format!("{e:#}")))
            .collect(),
        Err(e) => vec![Err(format!("{e:#}"))],
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut builder = Analyzer::builder()
        .model(
            args.model
                .clone()
                .map_or(ModelSource::Default, ModelSource::Folder),
        )
        .device(themescan::device::select_device(&args.device)?);
    if let Some(h) = &args.heads {
        builder = builder.heads(h);
    }
    if let Some(t) = args.threads {
        builder = builder.threads(t);
    }
    if let Some(b) = args.batch_tokens {
        builder = builder.batch_tokens(b);
    }
    let analyzer = builder.build().context("loading the analyser")?;

    let reader: Box<dyn BufRead> = if args.input.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(&args.input)
            .with_context(|| format!("opening {}", args.input.display()))?;
        Box::new(std::io::BufReader::new(f))
    };
    let writer: Box<dyn Write> = if args.output.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            std::fs::File::create(&args.output)
                .with_context(|| format!("creating {}", args.output.display()))?,
        )
    };
    let mut writer = BufWriter::new(writer);

    let started = Instant::now();
    let (mut records, mut failed, mut tokens) = (0usize, 0usize, 0usize);
    let mut per_theme = [0usize; 4];
    let mut lines = reader.lines().enumerate().peekable();
    while lines.peek().is_some() {
        let chunk: Vec<_> = lines
            .by_ref()
            .take(args.chunk.max(1))
            .map(|(i, l)| parse_line(l, i + 1))
            .collect();
        let articles: Vec<Article> = chunk
            .iter()
            .filter_map(|(id, text)| Some(Article::new(id.clone()?, text.as_ref().ok()?.clone())))
            .collect();
        let mut results = analyze_isolating_failures(&analyzer, &articles).into_iter();
        for (id, parsed) in &chunk {
            records += 1;
            let result = match parsed {
                Ok(_) => results.next().expect("one result per parsed record"),
                Err(e) => Err(e.clone()),
            };
            match &result {
                Ok(a) => {
                    tokens += a.tokens;
                    a.labels.iter().for_each(|t| per_theme[t.index()] += 1);
                    let line = OutputLine {
                        id: Some(&a.id),
                        themes: &a.themes,
                        labels: &a.labels,
                        evidence: &a.evidence,
                        entities: &a.entities,
                        error: None,
                    };
                    serde_json::to_writer(&mut writer, &line)?;
                }
                Err(e) => {
                    failed += 1;
                    let line = OutputLine {
                        id: id.as_deref(),
                        themes: &[],
                        labels: &[],
                        evidence: &[],
                        entities: &[],
                        error: Some(e),
                    };
                    serde_json::to_writer(&mut writer, &line)?;
                }
            }
            writer.write_all(b"\n")?;
        }
    }
    writer.flush()?;
    if !args.quiet {
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let themes: Vec<String> = Theme::ALL
            .iter()
            .map(|t| format!("{t} {}", per_theme[t.index()]))
            .collect();
        eprintln!(
            "classify: {records} records, {failed} errors, {:.2} articles/s, {:.0} tokens/s; labels: {}",
            (records - failed) as f64 / secs,
            tokens as f64 / secs,
            themes.join(", ")
        );
    }
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
