//! Classifies articles: JSONL (or a folder of text files) in, one JSONL line out per record, in
//! input order.
//!
//! ```text
//! cargo run --release --example classify -- --input IN.jsonl --output OUT.jsonl
//! cargo run --release --example classify -- --input articles/ --output OUT.jsonl --resume
//! ```
//! IN: objects with string fields `id` and `text` (others ignored), a file, or `-` for stdin;
//! or a folder, whose files (recursively, hidden ones skipped) are records with their relative
//! path as id. OUT: `{"id", "themes": [{"theme","score"}] (all four), "labels", "evidence":
//! [{"theme","start","end","score"}], "entities": [{"text","label","start","end","score"}],
//! "error": null | "message"}`; `start`/`end` are byte offsets into `text`.
//!
//! Nothing stops the run: a bad record (broken JSON, missing or non-string `id`/`text`,
//! invalid UTF-8, an empty text, a binary file) gets a line with `error` set and the run goes
//! on; a text with NUL bytes is analysed with them read as spaces and the line says so. Input
//! is streamed (memory does not grow with its size); a text of any length is analysed in full.
//! Every output line is written whole with one write, so a killed run leaves no torn line, and
//! `--resume` skips the records an earlier run already wrote and appends the rest. The exit
//! status is 1 if any record has an error, 2 if the run itself failed.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use themescan::records::{self, InputRecord, JsonlRecords, OutputRow};
use themescan::{Analysis, Analyzer, Article, ModelSource, PreparedArticles};

#[derive(Parser)]
#[command(about = "Find extremism-related themes and named entities in articles")]
struct Args {
    /// Input: a JSONL file, `-` for stdin, or a folder of text files.
    #[arg(long)]
    input: PathBuf,
    /// Output JSONL (`-` for stdout).
    #[arg(long, default_value = "-")]
    output: PathBuf,
    /// Keep the records an earlier run already wrote to --output and append the rest.
    #[arg(long)]
    resume: bool,
    /// Encoder model folder (default: models/multilingual-e5-small).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Heads folder; repeat it to add theme sets (`--heads models/heads --heads my-set`).
    /// Default: models/heads. Given at least once, only the named folders are used; entities
    /// come from the first folder that holds an NER head.
    #[arg(long)]
    heads: Vec<PathBuf>,
    /// Encoder threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// CPU code path: auto (int8 where the CPU has AVX-512 VNNI), int8 or reference.
    #[arg(long, default_value = "auto")]
    cpu_path: themescan::CpuPath,
    /// Padded tokens per encoder batch (default: 1024 on CPU, 16384 on a GPU).
    #[arg(long)]
    batch_tokens: Option<usize>,
    /// cpu, cuda, cuda:N, metal or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Most records analysed per call; their windows share encoder batches.
    #[arg(long, default_value_t = 32)]
    chunk: usize,
    /// Most text bytes analysed per call (a longer text is analysed alone, in segments).
    #[arg(long, default_value_t = 512 * 1024)]
    chunk_bytes: usize,
    /// Longest input line or file read, in MiB; a longer one is reported, not analysed.
    #[arg(long, default_value_t = 64)]
    max_record_mib: usize,
    /// No progress and no summary on stderr.
    #[arg(long)]
    quiet: bool,
}

/// A chunk of records on its way from the reader thread to the encoder.
struct Chunk {
    records: Vec<InputRecord>,
    /// The records with a text, tokenised; or why tokenising failed.
    prepared: Result<PreparedArticles, String>,
}

/// What an earlier run left in the output: the ids of its whole lines, in order.
struct Done {
    ids: Vec<Option<String>>,
    errors: usize,
}

/// Reads the output an earlier run wrote; cuts off a torn last line, if any.
fn read_done(path: &Path) -> anyhow::Result<Done> {
    let mut done = Done {
        ids: Vec::new(),
        errors: 0,
    };
    let Ok(file) = File::open(path) else {
        return Ok(done);
    };
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    let mut good_bytes = 0u64;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&line) else {
            break;
        };
        done.ids
            .push(value.get("id").and_then(|v| v.as_str()).map(str::to_string));
        if value.get("error").is_some_and(|e| !e.is_null()) {
            done.errors += 1;
        }
        good_bytes += n as u64;
    }
    let len = std::fs::metadata(path)?.len();
    if len > good_bytes {
        OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(good_bytes)
            .with_context(|| format!("cutting the torn last line of {}", path.display()))?;
    }
    Ok(done)
}

/// Input records, lazily, and the input's size in bytes when known (for progress).
fn open_input(
    args: &Args,
) -> anyhow::Result<(Box<dyn Iterator<Item = InputRecord> + Send>, Option<u64>)> {
    let max = args.max_record_mib.max(1) << 20;
    if args.input.as_os_str() == "-" {
        let stdin = BufReader::with_capacity(1 << 20, std::io::stdin());
        return Ok((Box::new(jsonl(stdin, max)), None));
    }
    if args.input.is_dir() {
        let files = records::list_folder(&args.input)
            .with_context(|| format!("listing {}", args.input.display()))?;
        let total = files
            .iter()
            .map(|(_, p)| std::fs::metadata(p).map_or(0, |m| m.len()))
            .sum();
        let iter = files
            .into_iter()
            .enumerate()
            .map(move |(i, (id, path))| records::read_text_file(i + 1, &id, &path, max));
        return Ok((Box::new(iter), Some(total)));
    }
    let file =
        File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
    let total = file.metadata().ok().map(|m| m.len());
    Ok((
        Box::new(jsonl(BufReader::with_capacity(1 << 20, file), max)),
        total,
    ))
}

/// JSONL records; a read error ends the stream with one error record.
fn jsonl<R: BufRead + Send + 'static>(reader: R, max: usize) -> impl Iterator<Item = InputRecord> {
    let mut records = JsonlRecords::with_max_line_bytes(reader, max);
    let mut failed = false;
    let mut position = 0;
    std::iter::from_fn(move || {
        if failed {
            return None;
        }
        match records.next()? {
            Ok(r) => {
                position = r.position;
                Some(r)
            }
            Err(e) => {
                failed = true;
                Some(InputRecord {
                    position: position + 1,
                    id: None,
                    text: Err(format!("input unreadable after line {position}: {e}")),
                    warning: None,
                    bytes: 0,
                })
            }
        }
    })
}

/// Reader thread: skips what an earlier run did, cuts the rest into chunks and tokenises them
/// while the encoder works on the previous chunk.
fn spawn_reader(
    analyzer: Analyzer,
    mut input: Box<dyn Iterator<Item = InputRecord> + Send>,
    done: Vec<Option<String>>,
    chunk: usize,
    chunk_bytes: usize,
) -> (Receiver<anyhow::Result<Chunk>>, std::thread::JoinHandle<()>) {
    let (tx, rx) = sync_channel(2);
    let handle = std::thread::spawn(move || {
        for (k, expected) in done.iter().enumerate() {
            let Some(record) = input.next() else {
                let _ = tx.send(Err(anyhow::anyhow!(
                    "--resume: the output has {} lines but the input only {k} records; \
                     it is not this input's output",
                    done.len()
                )));
                return;
            };
            if &record.id != expected {
                let _ = tx.send(Err(anyhow::anyhow!(
                    "--resume: output line {} has id {:?} but input record {} has id {:?}; \
                     it is not this input's output",
                    k + 1,
                    expected,
                    record.position,
                    record.id
                )));
                return;
            }
        }
        let mut input = input.peekable();
        while input.peek().is_some() {
            let mut records = Vec::new();
            let mut bytes = 0;
            while records.len() < chunk.max(1) && bytes < chunk_bytes {
                let Some(r) = input.next() else { break };
                bytes += r.text.as_ref().map_or(0, String::len);
                records.push(r);
            }
            let prepared = analyzer
                .prepare(articles_of(&records))
                .map_err(|e| format!("{e}"));
            if tx.send(Ok(Chunk { records, prepared })).is_err() {
                return;
            }
        }
    });
    (rx, handle)
}

/// The records that have an id and a text, as articles, in order.
fn articles_of(records: &[InputRecord]) -> Vec<Article> {
    records
        .iter()
        .filter_map(|r| Some(Article::new(r.id.clone()?, r.text.clone().ok()?)))
        .collect()
}

/// Analyses a prepared chunk; if that fails, one article at a time, so that a failure stays
/// with its record.
fn analyze_chunk(
    analyzer: &Analyzer,
    chunk: Chunk,
) -> (Vec<InputRecord>, Vec<Result<Analysis, String>>) {
    let Chunk { records, prepared } = chunk;
    let all = prepared.and_then(|p| analyzer.analyze_prepared(p).map_err(|e| format!("{e}")));
    let results = match all {
        Ok(all) => all.into_iter().map(Ok).collect(),
        // Rare: the articles are rebuilt from their records only then.
        Err(_) => articles_of(&records)
            .iter()
            .map(|a| analyzer.analyze(a).map_err(|e| format!("{e}")))
            .collect(),
    };
    (records, results)
}

/// Progress on stderr: a redrawn line on a terminal, a plain line every 30 s otherwise.
struct Progress {
    enabled: bool,
    terminal: bool,
    total_bytes: Option<u64>,
    started: Instant,
    last: Instant,
    records: usize,
    bytes: u64,
    tokens: usize,
}

impl Progress {
    fn new(quiet: bool, total_bytes: Option<u64>) -> Self {
        let now = Instant::now();
        Progress {
            enabled: !quiet,
            terminal: std::io::stderr().is_terminal(),
            total_bytes,
            started: now,
            last: now,
            records: 0,
            bytes: 0,
            tokens: 0,
        }
    }

    fn add(&mut self, bytes: u64, tokens: usize) {
        self.records += 1;
        self.bytes += bytes;
        self.tokens += tokens;
    }

    fn show(&mut self, force: bool) {
        if !self.enabled {
            return;
        }
        let every = if self.terminal {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(30)
        };
        if !force && self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = self.records as f64 / secs;
        let mut line = format!(
            "{} records, {:.1} MB, {rate:.1} records/s, {:.0} tokens/s",
            self.records,
            self.bytes as f64 / 1e6,
            self.tokens as f64 / secs
        );
        if let Some(total) = self.total_bytes.filter(|&t| t > 0) {
            let done = (self.bytes as f64 / total as f64).min(1.0);
            let eta = if done > 0.0 {
                secs * (1.0 - done) / done
            } else {
                0.0
            };
            let width = 24;
            let filled = (done * width as f64) as usize;
            line = format!(
                "[{}{}] {:>5.1}% {line}, ETA {}",
                "#".repeat(filled),
                "-".repeat(width - filled),
                100.0 * done,
                clock(eta)
            );
        }
        if self.terminal {
            eprint!("\r\x1b[K{line}");
        } else {
            eprintln!("classify: {line}");
        }
    }

    fn finish(&mut self) {
        if self.enabled && self.terminal {
            self.show(true);
            eprintln!();
        }
    }
}

fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// Writes each line with one `write` call, so that a kill leaves no torn line.
struct LineWriter {
    out: Box<dyn Write>,
    buf: Vec<u8>,
}

impl LineWriter {
    fn write(&mut self, line: &OutputRow<'_>) -> anyhow::Result<()> {
        self.buf.clear();
        serde_json::to_writer(&mut self.buf, line)?;
        self.buf.push(b'\n');
        self.out.write_all(&self.buf)?;
        Ok(())
    }
}

fn run(args: Args) -> anyhow::Result<bool> {
    let mut builder = Analyzer::builder()
        .model(
            args.model
                .clone()
                .map_or(ModelSource::Default, ModelSource::Folder),
        )
        .device(themescan::device::select_device(&args.device)?)
        .embedder(|e| e.cpu_path(args.cpu_path));
    if let Some((main, sets)) = args.heads.split_first() {
        builder = builder.heads(main);
        for set in sets {
            builder = builder.theme_set(set);
        }
    }
    if let Some(t) = args.threads {
        builder = builder.threads(t);
    }
    if let Some(b) = args.batch_tokens {
        builder = builder.batch_tokens(b);
    }
    let analyzer = builder.build().context("loading the analyser")?;
    if !args.quiet {
        eprintln!(
            "classify: encoder {}",
            analyzer.embedder().describe_compute()
        );
    }

    let to_stdout = args.output.as_os_str() == "-";
    if args.resume && to_stdout {
        bail!("--resume needs --output FILE: it reads what an earlier run wrote there");
    }
    let done = if args.resume {
        read_done(&args.output)?
    } else {
        Done {
            ids: Vec::new(),
            errors: 0,
        }
    };
    let out: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        let mut f = OpenOptions::new()
            .create(true)
            .append(args.resume)
            .write(true)
            .truncate(!args.resume)
            .open(&args.output)
            .with_context(|| format!("opening {}", args.output.display()))?;
        f.seek(std::io::SeekFrom::End(0))?;
        Box::new(f)
    };
    let mut writer = LineWriter {
        out,
        buf: Vec::new(),
    };

    let (input, total_bytes) = open_input(&args)?;
    let resumed = done.ids.len();
    let mut failed = done.errors;
    let mut progress = Progress::new(args.quiet, total_bytes);
    if resumed > 0 && !args.quiet {
        eprintln!(
            "classify: resuming after {resumed} records already in {}",
            args.output.display()
        );
    }
    let (chunks, reader) = spawn_reader(
        analyzer.clone(),
        input,
        done.ids,
        args.chunk,
        args.chunk_bytes,
    );
    let mut per_theme = vec![0usize; analyzer.themes().len()];
    let mut records = 0usize;
    for chunk in chunks {
        let (inputs, results) = analyze_chunk(&analyzer, chunk?);
        let mut results = results.into_iter();
        for record in &inputs {
            records += 1;
            let result = match &record.text {
                Ok(_) if record.id.is_some() => results.next().expect("one result per article"),
                Ok(_) => Err("record without an id".to_string()),
                Err(e) => Err(e.clone()),
            };
            let mut tokens = 0;
            match &result {
                Ok(a) => {
                    tokens = a.tokens;
                    for label in &a.labels {
                        if let Some(k) = analyzer.themes().iter().position(|t| t == label) {
                            per_theme[k] += 1;
                        }
                    }
                    failed += usize::from(record.warning.is_some());
                    writer.write(&OutputRow {
                        id: Some(&a.id),
                        themes: &a.themes,
                        labels: &a.labels,
                        evidence: &a.evidence,
                        entities: &a.entities,
                        error: record.warning.as_deref(),
                    })?;
                }
                Err(e) => {
                    failed += 1;
                    writer.write(&OutputRow::failed(record.id.as_deref(), e))?;
                }
            }
            progress.add(record.bytes, tokens);
        }
        progress.show(false);
    }
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("the input reader thread panicked"))?;
    writer.out.flush()?;
    progress.finish();
    if !args.quiet {
        let secs = progress.started.elapsed().as_secs_f64().max(1e-9);
        let themes: Vec<String> = analyzer
            .themes()
            .iter()
            .zip(&per_theme)
            .map(|(t, n)| format!("{t} {n}"))
            .collect();
        eprintln!(
            "classify: {} records ({records} this run, {resumed} resumed), {failed} with errors; \
             {:.2} records/s, {:.0} tokens/s; labels this run: {}",
            records + resumed,
            records as f64 / secs,
            progress.tokens as f64 / secs,
            themes.join(", ")
        );
    }
    Ok(failed == 0)
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("classify: error: {e:#}");
            std::process::exit(2);
        }
    }
}
