//! Theme classification end to end: the user's five seed articles, evidence offsets, long
//! articles, and the `classify` JSONL contract. Needs the default model (`bash models/fetch.sh`)
//! and the committed heads; the seed articles are read in place from `../shared/seeds/`.

mod common;

use std::collections::HashSet;

use common::*;
use themescan::text::sentence_spans;
use themescan::{Analyzer, Article, ModelSource, Theme};

fn analyzer() -> Analyzer {
    Analyzer::builder()
        .model(ModelSource::Folder(default_model_folder()))
        .threads(2)
        .build()
        .expect("analyzer loads")
}

#[derive(serde::Deserialize)]
struct Seed {
    id: String,
    text: String,
    primary: Vec<Theme>,
    allowed: Vec<Theme>,
}

/// The seed articles, or `None` (skipped, reason printed) when `../shared` is not beside the
/// repository.
fn seeds(test: &str) -> Option<Vec<Seed>> {
    let path = shared_data(test, "seeds/articles.jsonl")?;
    let data = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Some(
        data.lines()
            .map(|l| serde_json::from_str(l).expect("seed article"))
            .collect(),
    )
}

/// Issue 3: every seed article gets all its primary themes and nothing outside primary ∪ allowed.
#[test]
fn seed_articles_get_their_themes() {
    let Some(seeds) = seeds("seed_articles_get_their_themes") else {
        return;
    };
    let analyzer = analyzer();
    assert_eq!(seeds.len(), 5);
    let articles: Vec<Article> = seeds.iter().map(|s| Article::new(&s.id, &s.text)).collect();
    let results = analyzer.analyze_many(&articles).unwrap();
    let mut wrong = Vec::new();
    for (seed, got) in seeds.iter().zip(&results) {
        let labels: HashSet<Theme> = got.labels.iter().cloned().collect();
        let ok_set: HashSet<Theme> = seed.primary.iter().chain(&seed.allowed).cloned().collect();
        let missing: Vec<_> = seed
            .primary
            .iter()
            .filter(|t| !labels.contains(t))
            .collect();
        let extra: Vec<_> = labels.iter().filter(|t| !ok_set.contains(t)).collect();
        let scores: Vec<String> = got
            .themes
            .iter()
            .map(|s| format!("{} {:.2}", s.theme, s.score))
            .collect();
        eprintln!(
            "{}: labels {:?} primary {:?} allowed {:?} [{}]",
            seed.id,
            got.labels,
            seed.primary,
            seed.allowed,
            scores.join(", ")
        );
        if !missing.is_empty() || !extra.is_empty() {
            wrong.push(format!("{}: missing {missing:?}, extra {extra:?}", seed.id));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("; "));
}

/// Evidence offsets slice the original text exactly, at sentence boundaries, and evidence is
/// only given for reported themes.
#[test]
fn evidence_offsets_slice_the_original_text() {
    let Some(seeds) = seeds("evidence_offsets_slice_the_original_text") else {
        return;
    };
    let analyzer = analyzer();
    for seed in &seeds {
        let analysis = analyzer
            .analyze(&Article::new(&seed.id, &seed.text))
            .unwrap();
        let sentences: HashSet<(usize, usize)> = sentence_spans(&seed.text)
            .iter()
            .map(|s| (s.start, s.end))
            .collect();
        for ev in &analysis.evidence {
            assert!(
                analysis.labels.contains(&ev.theme),
                "{}: evidence for unreported {}",
                seed.id,
                ev.theme
            );
            assert!(
                seed.text.get(ev.start..ev.end).is_some(),
                "{}: {}..{} not on char boundaries",
                seed.id,
                ev.start,
                ev.end
            );
            assert!(
                sentences.contains(&(ev.start, ev.end)),
                "{}: {}..{} is not a sentence",
                seed.id,
                ev.start,
                ev.end
            );
            assert!((0.0..=1.0).contains(&ev.score));
        }
        for label in &analysis.labels {
            assert!(
                analysis.evidence.iter().any(|e| e.theme == *label),
                "{}: no evidence for {label}",
                seed.id
            );
        }
    }
}

/// An article of more than 5,000 tokens is covered by its windows to the last sentence.
#[test]
fn long_article_is_fully_covered() {
    let Some(seeds) = seeds("long_article_is_fully_covered") else {
        return;
    };
    let seed = &seeds[0];
    let filler = texts()
        .into_iter()
        .find(|t| t.id == "nl-long")
        .unwrap()
        .text;
    // The themed article at the END, after ~4,700 tokens of unrelated council news.
    let filler = format!(
        "{}\n\n{}\n\n{}",
        filler,
        filler.replace("gemeente", "stad"),
        filler.replace("raad", "gemeenteraad")
    );
    let text = format!("{filler}\n\n{}", seed.text);
    let filler_text = format!("{filler}\n\n{filler}");
    let analyzer = analyzer();
    let results = analyzer
        .analyze_many(&[
            Article::new("long", text.clone()),
            Article::new("plain", filler_text),
        ])
        .unwrap();
    let (long, plain) = (&results[0], &results[1]);
    assert!(long.tokens > 5000, "only {} tokens", long.tokens);
    assert!(long.windows >= 10);
    for t in &seed_primary(seed) {
        assert!(
            long.labels.contains(t),
            "theme {t} at the end of a long article was lost: {:?}",
            long.themes
        );
    }
    assert!(
        plain.labels.is_empty(),
        "council news got {:?}",
        plain.labels
    );
    let tail_start = text.len() - seed.text.len();
    assert!(
        long.evidence.iter().any(|e| e.start >= tail_start),
        "evidence should point into the last part"
    );
}

fn seed_primary(seed: &Seed) -> Vec<Theme> {
    seed.primary.clone()
}

/// The `classify` contract: one line out per line in, same order, all four themes, `entities`
/// whose offsets slice the input text,
/// and an `error` line (not a crash, not a lost line) for each bad input line.
#[test]
fn classify_keeps_the_jsonl_contract() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let lines = [
        r#"{"id": "a", "text": "De politie haalde propagandakanalen van IS offline.", "extra": 1}"#,
        r#"{"id": "b", "text": ""}"#,
        r#"{"id": "c", "text": 42}"#,
        r#"{"text": "no id"}"#,
        r#"this is not json"#,
        r#"{"id": "d", "text": "Het regent morgen in Utrecht."}"#,
    ];
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let status = std::process::Command::new(example_binary("classify"))
        .args([
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--threads",
            "2",
            "--quiet",
        ])
        .env("THEMESCAN_MODEL_DIR", default_model_folder())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1), "bad lines make the exit status 1");
    let out: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(out.len(), lines.len());
    let ids: Vec<Option<&str>> = out.iter().map(|v| v["id"].as_str()).collect();
    assert_eq!(
        ids,
        [Some("a"), Some("b"), Some("c"), None, None, Some("d")]
    );
    for (i, v) in out.iter().enumerate() {
        let error = v["error"].as_str();
        let expect_error = matches!(i, 1..=4);
        assert_eq!(error.is_some(), expect_error, "line {i}: {v}");
        let entities = v["entities"]
            .as_array()
            .unwrap_or_else(|| panic!("line {i}: entities is not an array: {v}"));
        if expect_error {
            assert!(entities.is_empty(), "line {i}: entities on an error line");
        }
        let input: Option<String> = serde_json::from_str::<serde_json::Value>(lines[i])
            .ok()
            .and_then(|l| l["text"].as_str().map(str::to_string));
        if let Some(text) = input {
            for e in entities {
                let start = e["start"].as_u64().unwrap() as usize;
                let end = e["end"].as_u64().unwrap() as usize;
                assert_eq!(
                    &text[start..end],
                    e["text"].as_str().unwrap(),
                    "line {i}: entity offsets"
                );
            }
        }
        if !expect_error {
            let themes: Vec<&str> = v["themes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["theme"].as_str().unwrap())
                .collect();
            assert_eq!(
                themes,
                [
                    "recruitment",
                    "takedown",
                    "foreign_interference",
                    "financing"
                ]
            );
        }
    }
    assert!(
        out[2]["error"].as_str().unwrap().contains("line 3")
            && out[4]["error"].as_str().unwrap().contains("broken JSON")
    );
    assert!(
        out[0]["labels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "takedown"),
        "{}",
        out[0]
    );
    assert!(
        out[5]["labels"].as_array().unwrap().is_empty(),
        "{}",
        out[5]
    );
}

/// Copies the shipped heads into a temporary folder and edits the theme card there.
fn heads_with_theme_card(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(themescan::default_heads_folder()).unwrap() {
        let p = entry.unwrap().path();
        if p.extension()
            .is_some_and(|e| e == "json" || e == "safetensors")
        {
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let card_path = dir.path().join(themescan::heads::theme::THEME_HEAD_CARD);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&card_path).unwrap()).unwrap();
    edit(&mut json);
    if json["aggregation"] != "sentences" && !json["sentence_context"].is_null() {
        window_head_from_context_head(dir.path(), &mut json);
    }
    std::fs::write(&card_path, json.to_string()).unwrap();
    dir
}

/// Makes the folder's sentence head with context (rows twice the pooled width) into one that
/// reads the pooled rows alone, keeping its first layer's columns for the sentence part, so
/// the tests can put any aggregation in its card: they check what the card's rules do to the
/// scores, which any weights show.
fn window_head_from_context_head(dir: &std::path::Path, card: &mut serde_json::Value) {
    let pooled = card["input_size"].as_u64().unwrap() as usize / 2;
    let first = match card["hidden_size"].as_u64().unwrap() {
        0 => "output.weight",
        _ => "hidden.weight",
    };
    let path = dir.join(themescan::heads::theme::THEME_HEAD_WEIGHTS);
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let narrowed: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(name, t)| match name.ends_with(first) {
            true => (name, t.narrow(1, 0, pooled).unwrap()),
            false => (name, t),
        })
        .collect();
    candle_core::safetensors::save(&narrowed, &path).unwrap();
    card["input_size"] = pooled.into();
    card["sentence_context"] = serde_json::Value::Null;
}

fn analyzer_with(heads: &std::path::Path) -> themescan::Result<Analyzer> {
    Analyzer::builder()
        .model(ModelSource::Folder(default_model_folder()))
        .heads(heads)
        .threads(2)
        .build()
}

/// Issue 12: a card's calibration and aggregation rule reach the scores; scores stay in
/// [0, 1] and a theme is a label exactly when its calibrated score reaches its threshold.
#[test]
fn calibration_and_aggregation_from_the_card_reach_the_scores() {
    let text = texts()[0].text.clone();
    // The head scoring windows by the best one, uncalibrated, without a vote.
    let uncalibrated = heads_with_theme_card(|card| {
        card["calibration"] = serde_json::json!([]);
        card["aggregation"] = serde_json::json!("max");
        card["neighbours"] = serde_json::Value::Null;
    });
    let plain = analyzer_with(uncalibrated.path())
        .unwrap()
        .analyze(&Article::new("x", text.clone()))
        .unwrap();
    let sharpen = serde_json::json!({"slope": 3.0, "intercept": -1.0});
    let dir = heads_with_theme_card(|card| {
        card["calibration"] = serde_json::json!([sharpen, sharpen, sharpen, sharpen]);
        card["aggregation"] = serde_json::json!("max");
        card["neighbours"] = serde_json::Value::Null;
    });
    let analyzer = analyzer_with(dir.path()).unwrap();
    let calibrated = analyzer.analyze(&Article::new("x", text)).unwrap();
    let platt = themescan::heads::theme::Platt {
        slope: 3.0,
        intercept: -1.0,
    };
    for (raw, cal) in plain.themes.iter().zip(&calibrated.themes) {
        // The same raw scores, calibrated by the card.
        assert!(
            (platt.apply(raw.score) - cal.score).abs() < 1e-5,
            "{raw:?} {cal:?}"
        );
        assert!((0.0..=1.0).contains(&cal.score));
        let over = cal.score >= analyzer.threshold(&cal.theme).expect("a loaded theme");
        assert_eq!(over, calibrated.labels.contains(&cal.theme));
    }
}

/// Issue 12: the theme and NER heads share one layer mean per encoder pass; a folder whose
/// theme card asks for another layer mean than the NER head's is refused, naming the fix.
#[test]
fn theme_card_with_another_layer_mean_than_the_ner_head_is_refused() {
    let dir = heads_with_theme_card(|card| {
        card["pooling"] = serde_json::json!("mean_max_with_layer_mean");
        card["layer_mean"] = serde_json::json!([4, 12]);
    });
    let Err(err) = analyzer_with(dir.path()) else {
        panic!("a theme card asking for another layer mean than the NER head's is refused")
    };
    assert!(err.to_string().contains("train_themes"), "{err}");
}

/// Issue 12: the neighbour vote named in the card reaches the scores, and a card that asks
/// for it in a folder without its index is refused, naming the file.
#[test]
fn neighbour_vote_from_the_card_reaches_the_scores() {
    let text = texts()[0].text.clone();
    let scores_with = |weight: f64| {
        let dir = heads_with_theme_card(|card| {
            card["calibration"] = serde_json::json!([]);
            card["aggregation"] = serde_json::json!("top_two_mean");
            card["neighbours"] = serde_json::json!({
                "k": 10, "temperature": 0.0, "weight": weight, "dims": 256,
                "projection_seed": 20261121
            });
        });
        // An index of its own (the shipped head may have none): 40 seeded rows and labels.
        let settings = themescan::heads::neighbours::NeighbourSettings {
            k: 10,
            temperature: 0.0,
            weight: weight as f32,
            dims: 256,
            projection_seed: 20261121,
        };
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let width = 1536;
        let rows: Vec<f32> = (0..40 * width).map(|_| next() - 0.5).collect();
        let labels: Vec<Vec<bool>> = (0..40)
            .map(|_| (0..4).map(|_| next() < 0.3).collect())
            .collect();
        themescan::heads::neighbours::NeighbourIndex::build(&rows, width, &labels, settings)
            .unwrap()
            .save(
                &dir.path()
                    .join(themescan::heads::neighbours::NEIGHBOUR_INDEX),
            )
            .unwrap();
        let analysis = analyzer_with(dir.path())
            .unwrap()
            .analyze(&Article::new("x", text.clone()))
            .unwrap();
        analysis
            .themes
            .iter()
            .map(|t| t.score)
            .collect::<Vec<f32>>()
    };
    let (mlp, vote) = (scores_with(0.0), scores_with(1.0));
    // With equal votes from 10 neighbours and one window, a vote is a multiple of 0.1.
    for v in &vote {
        assert!(((v * 10.0).round() - v * 10.0).abs() < 1e-4, "{vote:?}");
    }
    assert_ne!(mlp, vote);
    let half = scores_with(0.5);
    for ((m, v), h) in mlp.iter().zip(&vote).zip(&half) {
        assert!(
            (0.5 * m + 0.5 * v - h).abs() < 1e-5,
            "{mlp:?} {vote:?} {half:?}"
        );
    }

    let dir = heads_with_theme_card(|card| {
        card["aggregation"] = serde_json::json!("top_two_mean");
        card["neighbours"] = serde_json::json!({
            "k": 10, "temperature": 0.0, "weight": 0.5, "dims": 256, "projection_seed": 1
        });
    });
    let index = dir
        .path()
        .join(themescan::heads::neighbours::NEIGHBOUR_INDEX);
    if index.is_file() {
        std::fs::remove_file(&index).unwrap();
    }
    let Err(err) = analyzer_with(dir.path()) else {
        panic!("a card asking for a neighbour index the folder lacks is refused")
    };
    assert!(
        err.to_string().contains("themes-neighbours.safetensors"),
        "{err}"
    );
}

/// The first `n` test texts as one article, a line apart.
fn first_texts_joined(n: usize) -> String {
    texts()
        .iter()
        .take(n)
        .map(|t| t.text.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A card naming the sentence rule makes the article's scores the smooth maximum of its
/// sentences' (the rows `pooled_sentences` gives training), a long article's over all its
/// segments' sentences, and the evidence the head's sentence scores; a sentence head with a
/// neighbour vote is refused.
#[test]
fn sentence_rule_from_the_card_scores_the_sentences() {
    use themescan::heads::theme::{join_context, log_mean_exp, SENTENCE_SHARPNESS};
    use themescan::heads::ThemeHead;
    let text = first_texts_joined(4);
    let dir = heads_with_theme_card(|card| {
        card["calibration"] = serde_json::json!([]);
        card["neighbours"] = serde_json::Value::Null;
        card["aggregation"] = serde_json::json!("sentences");
        card["thresholds"] = serde_json::json!([0.0, 0.0, 0.0, 0.0]);
    });
    let analyzer = analyzer_with(dir.path()).unwrap();
    let analysis = analyzer.analyze(&Article::new("x", text.clone())).unwrap();

    let (head, card) = ThemeHead::from_folder(dir.path(), &themescan::Device::Cpu).unwrap();
    let states = analyzer.embedder().token_states(&[text.as_str()]).unwrap();
    let (spans, rows) = themescan::pooled_sentences(&text, &states[0], card.pooling);
    assert!(spans.len() > 1, "the test text has several sentences");
    // A head with context reads each sentence's row joined by its neighbourhood's mean.
    let head_rows = |rows: Vec<f32>, sentences: usize| match card.sentence_context {
        Some(radius) => join_context(&rows, rows.len() / sentences.max(1), radius),
        None => rows,
    };
    let rows = head_rows(rows, spans.len());
    let logits = head
        .logits(&rows, card.input_size, &themescan::Device::Cpu)
        .unwrap();
    for (k, score) in analysis.themes.iter().enumerate() {
        let z = log_mean_exp(logits.iter().map(|l| l[k]), SENTENCE_SHARPNESS).unwrap();
        let expect = 1.0 / (1.0 + (-z).exp());
        assert!(
            (score.score - expect).abs() < 1e-4,
            "{score:?} against {expect}"
        );
        // Between the mean and the best sentence.
        let best = logits.iter().map(|l| l[k]).fold(f32::MIN, f32::max);
        let mean = logits.iter().map(|l| l[k]).sum::<f32>() / logits.len() as f32;
        assert!(z <= best + 1e-5 && z >= mean - 1e-5);
        // Every theme is a label at threshold 0; its first evidence is its best sentence.
        let first = analysis
            .evidence
            .iter()
            .find(|e| e.theme == score.theme)
            .expect("evidence for a label");
        let best_prob = 1.0 / (1.0 + (-best).exp());
        assert!(
            (first.score - best_prob).abs() < 1e-4,
            "{first:?} against {best_prob}"
        );
        assert!(spans
            .iter()
            .any(|s| s.start == first.start && s.end == first.end));
    }

    // A long article, cut into segments that are encoded apart: its score is the smooth
    // maximum over every segment's sentences together, and its evidence points into the
    // whole text.
    let long = first_texts_joined(12);
    let segmented = Analyzer::builder()
        .model(ModelSource::Folder(default_model_folder()))
        .heads(dir.path())
        .threads(2)
        .segment_bytes(1024)
        .build()
        .unwrap();
    let analysis = segmented
        .analyze(&Article::new("long", long.clone()))
        .unwrap();
    let segments = themescan::segment_text(&long, 1024);
    assert!(segments.len() > 2, "the long text is cut into segments");
    let mut logits = Vec::new();
    for range in &segments {
        let piece = &long[range.clone()];
        let states = segmented.embedder().token_states(&[piece]).unwrap();
        let (spans, rows) = themescan::pooled_sentences(piece, &states[0], card.pooling);
        let rows = head_rows(rows, spans.len());
        logits.extend(
            head.logits(&rows, card.input_size, &themescan::Device::Cpu)
                .unwrap(),
        );
    }
    for (k, score) in analysis.themes.iter().enumerate() {
        let z = log_mean_exp(logits.iter().map(|l| l[k]), SENTENCE_SHARPNESS).unwrap();
        let expect = 1.0 / (1.0 + (-z).exp());
        assert!(
            (score.score - expect).abs() < 1e-4,
            "long article: {score:?} against {expect}"
        );
        let first = analysis
            .evidence
            .iter()
            .find(|e| e.theme == score.theme)
            .expect("evidence for a label");
        let best = logits.iter().map(|l| l[k]).fold(f32::MIN, f32::max);
        assert!((first.score - 1.0 / (1.0 + (-best).exp())).abs() < 1e-4);
        assert!(long.is_char_boundary(first.start) && first.end <= long.len());
    }

    let dir = heads_with_theme_card(|card| {
        card["aggregation"] = serde_json::json!("sentences");
        card["neighbours"] = serde_json::json!({
            "k": 10, "temperature": 0.0, "weight": 0.5, "dims": 256, "projection_seed": 1
        });
    });
    let Err(err) = analyzer_with(dir.path()) else {
        panic!("a sentence head with a neighbour vote is refused")
    };
    assert!(err.to_string().contains("neighbour"), "{err}");
}
