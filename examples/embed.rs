//! Embeds texts from a JSONL file: one `{"id", "text"}` object a line in, one
//! `{"id", "tokens", "windows", "embedding", "error"}` line out, in the same order.
//!
//! ```text
//! cargo run --release --example embed -- --input examples/data/sample.jsonl --output embeddings.jsonl
//! ```
//! A line that is not valid JSON or lacks a string `id`/`text` gets an output line with `error`
//! set and `embedding` null; the run goes on. The exit status is 1 if any line failed.

use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use themescan::{Embedder, ModelSource};

#[derive(Parser)]
#[command(about = "Embed JSONL texts with the themescan encoder")]
struct Args {
    /// Input JSONL (`-` for stdin): objects with string fields `id` and `text`.
    #[arg(long)]
    input: PathBuf,
    /// Output JSONL (`-` for stdout).
    #[arg(long, default_value = "-")]
    output: PathBuf,
    /// Model folder (default: models/multilingual-e5-small, fetched by models/fetch.sh).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Encoder threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Padded tokens per encoder batch (default: 1024 on CPU, 16384 on a GPU).
    #[arg(long)]
    batch_tokens: Option<usize>,
    /// cpu, cuda, cuda:N, metal or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU code path: auto (int8 where the CPU has AVX-512 VNNI), int8 or reference.
    #[arg(long, default_value = "auto")]
    cpu_path: themescan::CpuPath,
    /// Dtype of dense weights and activations: f32, f16 or bf16 (f16/bf16 suit dense
    /// checkpoints on a GPU; the default Q4_0 model takes f32 only).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Records embedded per call (more records let batches mix lengths better).
    #[arg(long, default_value_t = 64)]
    chunk: usize,
}

#[derive(Serialize)]
struct OutputLine<'a> {
    id: Option<&'a str>,
    tokens: Option<usize>,
    windows: Option<usize>,
    embedding: Option<Vec<f32>>,
    error: Option<String>,
}

struct Record {
    id: Option<String>,
    parsed: Result<String, String>,
}

fn parse_line(line: std::io::Result<String>, number: usize) -> Record {
    let line = match line {
        Ok(l) => l,
        Err(e) => {
            return Record {
                id: None,
                parsed: Err(format!("line {number}: unreadable: {e}")),
            }
        }
    };
    let value: serde_json::Value = match serde_json::from_str(&line) {
        Ok(v) => v,
        Err(e) => {
            return Record {
                id: None,
                parsed: Err(format!("line {number}: invalid JSON: {e}")),
            }
        }
    };
    let id = value.get("id").and_then(|v| v.as_str()).map(str::to_string);
    let parsed = match (&id, value.get("text").and_then(|v| v.as_str())) {
        (None, _) => Err(format!("line {number}: missing string field `id`")),
        (_, None) => Err(format!("line {number}: missing string field `text`")),
        (Some(_), Some(text)) => Ok(text.to_string()),
    };
    Record { id, parsed }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let source = args
        .model
        .clone()
        .map_or(ModelSource::Default, ModelSource::Folder);
    let mut builder = Embedder::builder()
        .model(source)
        .device(themescan::device::select_device(&args.device)?)
        .cpu_path(args.cpu_path);
    if let Some(b) = args.batch_tokens {
        builder = builder.batch_tokens(b);
    }
    builder = builder.dtype(match args.dtype.as_str() {
        "f32" => themescan::DType::F32,
        "f16" => themescan::DType::F16,
        "bf16" => themescan::DType::BF16,
        other => anyhow::bail!("--dtype {other}: expected f32, f16 or bf16"),
    });
    if let Some(t) = args.threads {
        builder = builder.threads(t);
    }
    let embedder = builder.build().context("loading the encoder")?;
    eprintln!("encoder: {}", embedder.describe_compute());

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
        let f = std::fs::File::create(&args.output)
            .with_context(|| format!("creating {}", args.output.display()))?;
        Box::new(f)
    };
    let mut writer = BufWriter::new(writer);

    let started = Instant::now();
    let (mut records, mut failed, mut tokens) = (0usize, 0usize, 0usize);
    let mut lines = reader.lines().enumerate().peekable();
    while lines.peek().is_some() {
        let chunk: Vec<Record> = lines
            .by_ref()
            .take(args.chunk.max(1))
            .map(|(i, l)| parse_line(l, i + 1))
            .collect();
        let texts: Vec<&str> = chunk
            .iter()
            .filter_map(|r| r.parsed.as_deref().ok())
            .collect();
        let mut ok = embed_isolating_failures(&embedder, &texts).into_iter();
        for record in &chunk {
            records += 1;
            let line = match &record.parsed {
                Ok(_) => match ok.next().expect("one result per valid record") {
                    Ok((embedding, n_tokens, n_windows)) => {
                        tokens += n_tokens;
                        OutputLine {
                            id: record.id.as_deref(),
                            tokens: Some(n_tokens),
                            windows: Some(n_windows),
                            embedding: Some(embedding),
                            error: None,
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        OutputLine {
                            id: record.id.as_deref(),
                            tokens: None,
                            windows: None,
                            embedding: None,
                            error: Some(e),
                        }
                    }
                },
                Err(e) => {
                    failed += 1;
                    OutputLine {
                        id: record.id.as_deref(),
                        tokens: None,
                        windows: None,
                        embedding: None,
                        error: Some(e.clone()),
                    }
                }
            };
            serde_json::to_writer(&mut writer, &line)?;
            writer.write_all(b"\n")?;
        }
    }
    writer.flush()?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "embed: {records} records, {failed} errors, {tokens} tokens in {secs:.2}s ({:.0} tokens/s)",
        tokens as f64 / secs.max(1e-9)
    );
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

type Embedded = Result<(Vec<f32>, usize, usize), String>;

/// Embeds `texts` in one call; if that fails, one by one, so that a failure is pinned to its
/// own record and the others still get their vectors.
fn embed_isolating_failures(embedder: &Embedder, texts: &[&str]) -> Vec<Embedded> {
    let unpack = |e: themescan::Embeddings| -> Vec<Embedded> {
        e.vectors
            .outer_iter()
            .zip(e.tokens)
            .zip(e.windows)
            .map(|((v, t), w)| Ok((v.to_vec(), t, w)))
            .collect()
    };
    match embedder.embed_with_counts(texts) {
        Ok(e) => unpack(e),
        Err(_) if texts.len() > 1 => texts
            .iter()
            .map(|t| match embedder.embed_with_counts(&[t]) {
                Ok(e) => unpack(e).pop().expect("one text in, one vector out"),
                Err(e) => Err(format!("{e:#}")),
            })
            .collect(),
        Err(e) => vec![Err(format!("{e:#}"))],
    }
}
