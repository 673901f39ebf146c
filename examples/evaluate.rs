//! Scores the library against labelled data.
//!
//! ```text
//! cargo run --release --example evaluate -- themes --input LABELLED.jsonl [--split dev]
//! ```
//! `themes`: objects with `id`, `text`, `labels` (and optionally `lang`, `story`); `--input` may
//! also be a folder of such files. Prints per-theme precision/recall/F1, per-language macro-F1
//! when `lang` is present, and last a line `macro_f1 <value>`. `--split dev|train` keeps only the
//! stories of that side of the training split (see `themescan::train::is_dev_story`). Also
//! prints how many negatives (and `near_miss` records) got a label and the expected calibration
//! error of the scores; `--predictions OUT.jsonl` writes each article's labels and scores.
//!
//! ```text
//! cargo run --release --example evaluate -- ner --conll FILE [--predictions OUT.conll]
//! ```
//! `ner`: entity-level precision/recall/F1 per type (exact span and type, the conlleval
//! definition) and last a line `micro_f1 <value>`; `--predictions` writes every token as
//! `token TAB gold TAB predicted`, sentences separated by blank lines, in the input's order.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use themescan::entities::Tag;
use themescan::train::conll::{read_conll, score_entities};
use themescan::train::{
    expected_calibration_error, is_dev_story, macro_f1, read_theme_data, theme_metrics,
    ThemeExample,
};
use themescan::{Analyzer, Article, CpuPath, ModelSource};

#[derive(Parser)]
#[command(about = "Evaluate themescan against labelled data")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Split {
    All,
    Train,
    Dev,
}

#[derive(Subcommand)]
enum Command {
    /// Theme classification: per-theme P/R/F1 and macro-F1.
    Themes {
        /// A labelled JSONL file, or a folder of them.
        #[arg(long)]
        input: PathBuf,
        /// Which stories to keep.
        #[arg(long, value_enum, default_value = "all")]
        split: Split,
        /// Encoder model folder (default: models/multilingual-e5-small).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Heads folder; repeat it to score several theme sets together (default:
        /// models/heads). Every theme of the folders is scored; gold labels of other themes
        /// are ignored (and counted).
        #[arg(long)]
        heads: Vec<PathBuf>,
        /// Encoder threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// CPU code path: auto (int8 where the CPU has AVX-512 VNNI), int8 or reference.
        #[arg(long, default_value = "auto")]
        cpu_path: CpuPath,
        /// Also write one JSON line per article: id, lang, kind, gold and predicted labels,
        /// scores.
        #[arg(long)]
        predictions: Option<PathBuf>,
    },
    /// Entity-level NER scoring of a CoNLL file (`token TAB tag`, blank line between sentences).
    Ner {
        /// The gold CoNLL file.
        #[arg(long)]
        conll: PathBuf,
        /// Also write `token TAB gold TAB predicted` lines here.
        #[arg(long)]
        predictions: Option<PathBuf>,
        /// Encoder model folder (default: models/multilingual-e5-small).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Heads folder (default: models/heads).
        #[arg(long)]
        heads: Option<PathBuf>,
        /// Encoder threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// CPU code path: auto (int8 where the CPU has AVX-512 VNNI), int8 or reference.
        #[arg(long, default_value = "auto")]
        cpu_path: CpuPath,
    },
}

fn analyzer(
    model: Option<PathBuf>,
    heads: &[PathBuf],
    threads: Option<usize>,
    cpu_path: CpuPath,
) -> Result<Analyzer> {
    let mut builder = Analyzer::builder()
        .model(model.map_or(ModelSource::Default, ModelSource::Folder))
        .embedder(|e| e.cpu_path(cpu_path));
    if let Some((main, sets)) = heads.split_first() {
        builder = builder.heads(main);
        for set in sets {
            builder = builder.theme_set(set);
        }
    }
    if let Some(t) = threads {
        builder = builder.threads(t);
    }
    Ok(builder.build()?)
}

fn main() -> Result<()> {
    match Args::parse().command {
        Command::Themes {
            input,
            split,
            model,
            heads,
            threads,
            cpu_path,
            predictions,
        } => {
            let examples: Vec<ThemeExample> = read_theme_data(&input)?
                .into_iter()
                .filter(|e| match split {
                    Split::All => true,
                    Split::Dev => is_dev_story(&e.story),
                    Split::Train => !is_dev_story(&e.story),
                })
                .collect();
            if examples.is_empty() {
                bail!("no labelled examples in {}", input.display());
            }
            let analyzer = analyzer(model, &heads, threads, cpu_path)?;
            let themes = analyzer.themes().to_vec();
            let other: std::collections::BTreeSet<&str> = examples
                .iter()
                .flat_map(|e| &e.labels)
                .filter(|l| !themes.contains(l))
                .map(|l| l.as_str())
                .collect();
            if !other.is_empty() {
                eprintln!(
                    "evaluate: gold labels that no loaded head scores are ignored: {}",
                    other.into_iter().collect::<Vec<_>>().join(", ")
                );
            }
            let started = std::time::Instant::now();
            let mut predicted: Vec<Vec<bool>> = Vec::with_capacity(examples.len());
            let mut scores: Vec<Vec<f32>> = Vec::with_capacity(examples.len());
            let mut out = match &predictions {
                Some(p) => Some(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("creating {}", p.display()))?,
                )),
                None => None,
            };
            for chunk in examples.chunks(32) {
                let articles: Vec<Article> =
                    chunk.iter().map(|e| Article::new(&e.id, &e.text)).collect();
                for (e, a) in chunk.iter().zip(analyzer.analyze_many(&articles)?) {
                    predicted.push(themes.iter().map(|t| a.labels.contains(t)).collect());
                    // `themes` follows the analyzer's order, as `a.themes` does.
                    let s: Vec<f32> = a.themes.iter().map(|t| t.score).collect();
                    if let Some(out) = &mut out {
                        let line = serde_json::json!({
                            "id": e.id, "lang": e.lang, "kind": e.kind,
                            "gold": e.labels, "predicted": a.labels,
                            "scores": themes.iter().zip(&s).map(|(t, v)| (t.as_str(), v))
                                .collect::<BTreeMap<_, _>>(),
                        });
                        writeln!(out, "{line}")?;
                    }
                    scores.push(s);
                }
            }
            if let Some(mut out) = out {
                out.flush()?;
            }
            let secs = started.elapsed().as_secs_f64();
            let gold: Vec<Vec<bool>> = examples.iter().map(|e| e.flags(&themes)).collect();
            let metrics = theme_metrics(&themes, &gold, &predicted);
            println!(
                "{} articles, {:.2} articles/s",
                examples.len(),
                examples.len() as f64 / secs.max(1e-9)
            );
            println!(
                "{:<22} {:>9} {:>9} {:>9} {:>8}",
                "theme", "precision", "recall", "f1", "support"
            );
            for m in &metrics {
                println!(
                    "{:<22} {:>9.3} {:>9.3} {:>9.3} {:>8}",
                    m.theme.as_str(),
                    m.precision,
                    m.recall,
                    m.f1,
                    m.support
                );
            }
            let mut by_lang: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
            for (i, e) in examples.iter().enumerate() {
                if !e.lang.is_empty() {
                    by_lang.entry(e.lang.as_str()).or_default().push(i);
                }
            }
            for (lang, rows) in &by_lang {
                let g: Vec<_> = rows.iter().map(|&r| gold[r].clone()).collect();
                let p: Vec<_> = rows.iter().map(|&r| predicted[r].clone()).collect();
                println!(
                    "macro_f1[{lang}] {:.4} ({} articles)",
                    macro_f1(&theme_metrics(&themes, &g, &p)),
                    rows.len()
                );
            }
            let negatives: Vec<usize> = (0..examples.len())
                .filter(|&i| gold[i].iter().all(|g| !g))
                .collect();
            let labelled = negatives
                .iter()
                .filter(|&&i| predicted[i].iter().any(|&p| p))
                .count();
            let near: Vec<usize> = negatives
                .iter()
                .copied()
                .filter(|&i| examples[i].kind == "near_miss")
                .collect();
            println!(
                "negatives given a label: {labelled} of {} ({} of {} near misses)",
                negatives.len(),
                near.iter()
                    .filter(|&&i| predicted[i].iter().any(|&p| p))
                    .count(),
                near.len()
            );
            let flat_scores: Vec<f32> = scores.iter().flatten().copied().collect();
            let flat_gold: Vec<bool> = gold.iter().flatten().copied().collect();
            println!(
                "expected_calibration_error {:.4} (10 bins over every article-theme score)",
                expected_calibration_error(&flat_scores, &flat_gold, 10)
            );
            println!("macro_f1 {:.4}", macro_f1(&metrics));
            Ok(())
        }
        Command::Ner {
            conll,
            predictions,
            model,
            heads,
            threads,
            cpu_path,
        } => {
            let sentences = read_conll(&conll)?;
            let analyzer = analyzer(model, heads.as_slice(), threads, cpu_path)?;
            if analyzer.ner_card().is_none() {
                bail!("the heads folder has no NER head (ner.json, ner.safetensors)");
            }
            let started = std::time::Instant::now();
            let words: Vec<Vec<String>> = sentences.iter().map(|s| s.tokens.clone()).collect();
            let predicted = analyzer.tag_words(&words)?;
            let gold: Vec<Vec<Tag>> = sentences.iter().map(|s| s.tags.clone()).collect();
            let scores = score_entities(&gold, &predicted);
            let words: usize = gold.iter().map(Vec::len).sum();
            let rate = words as f64 / started.elapsed().as_secs_f64().max(1e-9);
            println!(
                "{} sentences, {words} tokens, {rate:.0} tokens/s",
                sentences.len()
            );
            println!(
                "{:<6} {:>9} {:>9} {:>9} {:>8}",
                "type", "precision", "recall", "f1", "gold"
            );
            for (label, s) in &scores.per_label {
                println!(
                    "{:<6} {:>9.3} {:>9.3} {:>9.3} {:>8}",
                    label.as_str(),
                    s.precision(),
                    s.recall(),
                    s.f1(),
                    s.gold
                );
            }
            if let Some(out) = predictions {
                let mut text = String::new();
                for ((s, g), p) in sentences.iter().zip(&gold).zip(&predicted) {
                    for ((tok, g), p) in s.tokens.iter().zip(g).zip(p) {
                        text.push_str(&format!("{tok}\t{g}\t{p}\n"));
                    }
                    text.push('\n');
                }
                std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
            }
            println!("micro_f1 {:.4}", scores.micro.f1());
            Ok(())
        }
    }
}
