//! The batch classifier loses no record: a 10,000-line input with 5% bad lines of every kind
//! keeps count and order, a run killed (SIGKILL) at any moment and resumed ends with every
//! record exactly once, and a folder input with a binary file gets one line per file.
//!
//! These tests are about bookkeeping, not accuracy, so they run the `classify` example on the
//! tiny BERT fixture with a random theme head written here: 10,000 records take seconds.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use common::*;

/// A heads folder with a random linear theme head for the tiny BERT (hidden 32, mean+max).
fn tiny_heads(dir: &Path) -> PathBuf {
    let heads = dir.join("heads");
    std::fs::create_dir_all(&heads).unwrap();
    let card = serde_json::json!({
        "labels": ["recruitment", "takedown", "foreign_interference", "financing"],
        "input_size": 64, "pooling": "mean_max", "hidden_size": 0, "members": 1,
        "thresholds": [0.5, 0.5, 0.5, 0.5],
        "encoder": "tiny random BERT (test fixture)", "training_data_sha256": "none",
        "examples": 0, "dev_examples": 0, "seed": 1, "epochs": 0,
        "dev_metrics": [], "dev_macro_f1": 0.0, "dev_macro_f1_by_language": {}
    });
    std::fs::write(heads.join("themes.json"), card.to_string()).unwrap();
    let weights: Vec<f32> = (0..4 * 64)
        .map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0)
        .collect();
    let tensors = HashMap::from([
        (
            "m0.output.weight".to_string(),
            Tensor::from_vec(weights, (4, 64), &Device::Cpu).unwrap(),
        ),
        (
            "m0.output.bias".to_string(),
            Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap(),
        ),
    ]);
    candle_core::safetensors::save(&tensors, heads.join("themes.safetensors")).unwrap();
    heads
}

fn classify(heads: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(example_binary("classify"));
    cmd.args([
        "--model",
        repo_path("tests/fixtures/tiny/bert").to_str().unwrap(),
        "--heads",
        heads.to_str().unwrap(),
        "--threads",
        "2",
        "--quiet",
    ])
    .args(args);
    cmd
}

/// One input line and what its output line must say.
struct Expected {
    line: Vec<u8>,
    id: Option<String>,
    error: bool,
}

/// `n` records, every 20th one bad, cycling through every kind of bad record.
fn generate(n: usize) -> Vec<Expected> {
    let words = [
        "Europol",
        "haalde",
        "kanalen",
        "offline",
        "التجنيد",
        "вербовка",
        "finansman",
        "the",
        "police",
        "said",
        "é",
        "👩‍👩‍👧",
    ];
    (0..n)
        .map(|i| {
            let id = format!("r{i:05}");
            let text: String = (0..5 + i % 40)
                .map(|k| words[(i * 7 + k * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ");
            let good = |line: String| Expected {
                line: line.into_bytes(),
                id: Some(id.clone()),
                error: false,
            };
            if i % 20 != 7 {
                return good(serde_json::json!({"id": id, "text": text, "lang": "x"}).to_string());
            }
            let bad = |line: Vec<u8>, id: Option<String>| Expected {
                line,
                id,
                error: true,
            };
            match (i / 20) % 10 {
                0 => bad(format!("{{\"id\": \"{id}\", \"text\": ").into_bytes(), None),
                1 => bad(
                    serde_json::json!({"text": text}).to_string().into_bytes(),
                    None,
                ),
                2 => bad(
                    serde_json::json!({"id": i, "text": text})
                        .to_string()
                        .into_bytes(),
                    None,
                ),
                3 => bad(
                    serde_json::json!({"id": id}).to_string().into_bytes(),
                    Some(id.clone()),
                ),
                4 => bad(
                    serde_json::json!({"id": id, "text": ["x"]})
                        .to_string()
                        .into_bytes(),
                    Some(id.clone()),
                ),
                5 => {
                    let mut line = format!("{{\"id\": \"{id}\", \"text\": \"caf").into_bytes();
                    line.extend_from_slice(b"\xe9 \xff\"}");
                    bad(line, Some(id.clone()))
                }
                6 => bad(
                    serde_json::json!({"id": id, "text": ""})
                        .to_string()
                        .into_bytes(),
                    Some(id.clone()),
                ),
                // Analysed, NULs read as spaces, and the line says so.
                7 => bad(
                    serde_json::json!({"id": id, "text": format!("{text}\u{0}{text}")})
                        .to_string()
                        .into_bytes(),
                    Some(id.clone()),
                ),
                8 => bad(Vec::new(), None),
                _ => bad(b"[1, 2, 3]".to_vec(), None),
            }
        })
        .collect()
}

fn write_input(path: &Path, records: &[Expected]) {
    let mut data = Vec::new();
    for r in records {
        data.extend_from_slice(&r.line);
        data.push(b'\n');
    }
    std::fs::write(path, data).unwrap();
}

fn read_output(path: &Path) -> Vec<serde_json::Value> {
    let data = std::fs::read(path).unwrap();
    assert!(
        data.is_empty() || data.ends_with(b"\n"),
        "the output ends with a whole line"
    );
    data.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_slice(l)
                .unwrap_or_else(|e| panic!("torn or invalid output line ({e}): {l:?}"))
        })
        .collect()
}

fn check(out: &[serde_json::Value], expected: &[Expected]) {
    assert_eq!(out.len(), expected.len(), "one output line per input line");
    for (k, (o, e)) in out.iter().zip(expected).enumerate() {
        assert_eq!(o["id"].as_str(), e.id.as_deref(), "line {}: id", k + 1);
        assert_eq!(
            !o["error"].is_null(),
            e.error,
            "line {}: error field: {o}",
            k + 1
        );
        let analysed = o["themes"].as_array().unwrap().len() == 4;
        let nul = e.error && e.line.windows(6).any(|w| w == b"\\u0000");
        assert_eq!(analysed, !e.error || nul, "line {}: analysed: {o}", k + 1);
    }
}

#[test]
fn ten_thousand_lines_with_bad_ones_keep_count_and_order() {
    let dir = tempfile::tempdir().unwrap();
    let heads = tiny_heads(dir.path());
    let mut records = generate(10_000);
    // And one 20 MB text, analysed in full. Long runs of a letter the tiny tokenizer does not
    // know become one token each, which keeps this test fast; the segmenting, reading and
    // memory bounds it checks do not depend on the token count.
    let huge: String = format!(
        "{} Europol haalde de kanalen offline. ",
        "ж".repeat(1 << 20)
    )
    .repeat(10);
    assert!(huge.len() > 20 << 20);
    records.push(Expected {
        line: serde_json::json!({"id": "huge", "text": huge})
            .to_string()
            .into_bytes(),
        id: Some("huge".into()),
        error: false,
    });
    let bad = records.iter().filter(|r| r.error).count();
    assert_eq!(bad, 500, "5% bad lines");
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    write_input(&input, &records);
    let status = classify(
        &heads,
        &[
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ],
    )
    .status()
    .unwrap();
    assert_eq!(status.code(), Some(1), "bad records make the exit status 1");
    let out = read_output(&output);
    check(&out, &records);
    let last = out.last().unwrap();
    assert!(
        last["error"].is_null() && last["themes"].as_array().unwrap().len() == 4,
        "the 20 MB text is analysed"
    );
}

/// Kills the run (SIGKILL) once the output has at least `lines` lines.
fn kill_after(mut cmd: Command, output: &Path, lines: usize) -> bool {
    let mut child = cmd.stdout(Stdio::null()).spawn().unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.code().is_some(),
                "classify died of a signal: {status}"
            );
            return false;
        }
        let have = std::fs::read(output)
            .map(|d| d.iter().filter(|&&b| b == b'\n').count())
            .unwrap_or(0);
        if have >= lines {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "classify made no progress"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn killed_and_resumed_runs_write_every_record_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let heads = tiny_heads(dir.path());
    let records = generate(4_000);
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    write_input(&input, &records);
    let args = |resume: bool| {
        let mut a = vec![
            "--input".to_string(),
            input.to_str().unwrap().to_string(),
            "--output".to_string(),
            output.to_str().unwrap().to_string(),
            "--chunk".to_string(),
            "4".to_string(),
        ];
        if resume {
            a.push("--resume".to_string());
        }
        a
    };
    let run = |resume: bool| {
        let a = args(resume);
        classify(&heads, &a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    assert!(kill_after(run(false), &output, 300), "killed the first run");
    let mut kills = 1;
    for target in [900, 1700, 2600] {
        if kill_after(run(true), &output, target) {
            kills += 1;
        }
    }
    // A torn last line, as a crash in the middle of a write would leave.
    let mut data = std::fs::read(&output).unwrap();
    data.extend_from_slice(b"{\"id\": \"r0");
    std::fs::write(&output, data).unwrap();
    let status = run(true).status().unwrap();
    assert_eq!(status.code(), Some(1), "the bad records still count");
    check(&read_output(&output), &records);
    assert!(
        kills >= 2,
        "at least two runs were killed mid-way ({kills})"
    );

    // A resumed run over another input's output is refused, not silently mixed.
    let other = dir.path().join("other.jsonl");
    write_input(&other, &generate(10)[5..]);
    let status = classify(
        &heads,
        &[
            "--input",
            other.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--resume",
        ],
    )
    .stderr(Stdio::null())
    .status()
    .unwrap();
    assert_eq!(status.code(), Some(2));
}

#[test]
fn folder_input_gives_one_line_per_file_and_reports_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let heads = tiny_heads(dir.path());
    let articles = dir.path().join("articles");
    std::fs::create_dir_all(articles.join("nl")).unwrap();
    std::fs::write(articles.join("nl/a.txt"), "Europol haalde kanalen offline.").unwrap();
    std::fs::write(articles.join("b.txt"), "الشرطة أغلقت القنوات").unwrap();
    std::fs::write(articles.join("photo.jpg"), b"\xff\xd8\xff\xe0\0\x10JFIF\0").unwrap();
    std::fs::write(articles.join("empty.txt"), "").unwrap();
    let output = dir.path().join("out.jsonl");
    let status = classify(
        &heads,
        &[
            "--input",
            articles.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ],
    )
    .status()
    .unwrap();
    assert_eq!(status.code(), Some(1));
    let out = read_output(&output);
    let got: Vec<(Option<&str>, bool)> = out
        .iter()
        .map(|o| (o["id"].as_str(), o["error"].is_null()))
        .collect();
    assert_eq!(
        got,
        [
            (Some("b.txt"), true),
            (Some("empty.txt"), false),
            (Some("nl/a.txt"), true),
            (Some("photo.jpg"), false),
        ]
    );
    assert!(out[3]["error"].as_str().unwrap().contains("binary"));
}
