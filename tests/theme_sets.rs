//! Issue 15, custom theme sets end to end: a theme-set file becomes a heads folder
//! (`train_themes --theme-set`), zero-shot and few-shot themes score beside the built-in four
//! on the same encoder pass, `classify` and `evaluate` take several `--heads`. Needs the
//! default model (`bash models/fetch.sh`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use themescan::heads::theme::ThemeSetMode;
use themescan::heads::ThemeCard;
use themescan::{Analyzer, Article, ModelSource, Theme};

const WEAPONS: &str = "Police dismantle arms trafficking ring\nInvestigators said the network \
    smuggled hundreds of assault rifles, pistols and hand grenades from the Balkans in hidden \
    truck compartments and sold them to criminal buyers on dark-web markets. Four suspected arms \
    dealers were arrested and 300 weapons and 40,000 rounds of ammunition were seized.";
const WEATHER: &str = "Rain and wind expected on Sunday\nThe national weather service forecasts \
    heavy showers in the north and gusts of up to 70 km/h along the coast. Temperatures stay \
    around twelve degrees, and the weekend market in the town centre goes ahead as planned.";

/// A set of two themes: `weapons_trade` from descriptions only, `hate_speech` with four
/// examples (few-shot), trained into a temporary folder with `train_themes`' `extra` flags.
fn train_set(dir: &Path, extra: &[&std::ffi::OsStr]) -> PathBuf {
    let set = dir.join("set.toml");
    std::fs::write(
        &set,
        r#"name = "test-set"

[[theme]]
name = "weapons_trade"
descriptions = [
  "News about arms trafficking: smuggling and illegal sales of guns, ammunition and explosives.",
  "Nieuws over illegale wapenhandel en wapensmokkel.",
]

[[theme]]
name = "hate_speech"
descriptions = ["News about hate speech against people for their religion or origin."]
examples = [
  "A man was convicted for posting messages inciting hatred against Muslims on social media.",
  "Prosecutors charged a blogger with incitement to hatred for antisemitic posts.",
  "Een man is veroordeeld voor haatzaaiende berichten over vluchtelingen op Facebook.",
  "The report counted thousands of racist slurs against migrants online last year.",
]
negatives = ["The city council approved a new budget for road repairs."]
"#,
    )
    .unwrap();
    let out = dir.join("set");
    let status = Command::new(example_binary("train_themes"))
        .current_dir(repo_path("."))
        .args(["--theme-set", set.to_str().unwrap(), "--out"])
        .arg(&out)
        .args(["--threads", "2"])
        .args(extra)
        .env("THEMESCAN_MODEL_DIR", default_model_folder())
        .status()
        .unwrap();
    assert!(status.success(), "train_themes --theme-set failed");
    out
}

fn analyzer(sets: &[&Path]) -> themescan::Result<Analyzer> {
    let mut builder = Analyzer::builder()
        .model(ModelSource::Folder(default_model_folder()))
        .threads(2);
    for set in sets {
        builder = builder.theme_set(*set);
    }
    builder.build()
}

#[test]
fn a_theme_set_scores_beside_the_built_in_themes_on_one_pass() {
    let dir = tempfile::tempdir().unwrap();
    let set = train_set(dir.path(), &[]);

    let card = ThemeCard::read(&set.join("themes.json")).unwrap();
    assert_eq!(card.set_name.as_deref(), Some("test-set"));
    let entries = card
        .theme_set
        .as_ref()
        .expect("a set card says how each theme is scored");
    assert_eq!(entries[0].mode, ThemeSetMode::ZeroShot);
    assert_eq!(entries[1].mode, ThemeSetMode::FewShot);
    assert_eq!((entries[1].positives, entries[1].negatives), (4, 1));
    assert_eq!(card.thresholds.len(), 2);
    // Few-shot rows are fitted without the background's language directions (16 languages).
    assert!(
        card.encoder
            .contains("without the 15 directions that separate the background's languages"),
        "{}",
        card.encoder
    );

    let built_in = analyzer(&[]).unwrap();
    let both = analyzer(&[&set]).unwrap();
    let names: Vec<&str> = both.themes().iter().map(Theme::as_str).collect();
    assert_eq!(
        names,
        [
            "recruitment",
            "takedown",
            "foreign_interference",
            "financing",
            "weapons_trade",
            "hate_speech"
        ]
    );
    let articles = [Article::new("w", WEAPONS), Article::new("r", WEATHER)];
    let alone = built_in.analyze_many(&articles).unwrap();
    let together = both.analyze_many(&articles).unwrap();
    for (a, b) in alone.iter().zip(&together) {
        // The built-in themes are untouched by the added set: same pass, same scores.
        assert_eq!(a.themes[..], b.themes[..4]);
        assert_eq!(a.entities, b.entities);
        assert_eq!(b.themes.len(), 6);
        assert!(b.themes.iter().all(|t| (0.0..=1.0).contains(&t.score)));
    }
    let weapons = Theme::new("weapons_trade").unwrap();
    let score = |i: usize, t: &Theme| {
        together[i]
            .themes
            .iter()
            .find(|s| &s.theme == t)
            .unwrap()
            .score
    };
    assert!(
        together[0].labels.contains(&weapons),
        "the trafficking article gets weapons_trade: {:?}",
        together[0].themes
    );
    assert!(
        together[1].labels.is_empty(),
        "the weather report gets no theme: {:?}",
        together[1].themes
    );
    assert!(score(0, &weapons) > score(1, &weapons) + 0.3);
    // Evidence works for a custom theme: sentences of the text, for the theme.
    let evidence: Vec<_> = together[0]
        .evidence
        .iter()
        .filter(|e| e.theme == weapons)
        .collect();
    assert!(!evidence.is_empty());
    for e in evidence {
        assert!(WEAPONS.is_char_boundary(e.start) && e.end <= WEAPONS.len());
    }

    // The same set twice: theme names clash, and the error names both folders.
    let Err(err) = analyzer(&[&set, &set]) else {
        panic!("a theme loaded twice is refused");
    };
    let message = err.to_string();
    assert!(
        message.contains("weapons_trade") && message.matches(set.to_str().unwrap()).count() == 2,
        "{message}"
    );

    // `classify --heads models/heads --heads SET`: every theme of both folders in every line.
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    std::fs::write(
        &input,
        format!(
            "{}\n{}\n",
            serde_json::json!({"id": "w", "text": WEAPONS}),
            serde_json::json!({"id": "r", "text": WEATHER})
        ),
    )
    .unwrap();
    let status = Command::new(example_binary("classify"))
        .args(["--input", input.to_str().unwrap()])
        .args(["--output", output.to_str().unwrap()])
        .args(["--heads", repo_path("models/heads").to_str().unwrap()])
        .args(["--heads", set.to_str().unwrap()])
        .args(["--threads", "2", "--quiet"])
        .env("THEMESCAN_MODEL_DIR", default_model_folder())
        .status()
        .unwrap();
    assert!(status.success());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let themes: Vec<&str> = lines[0]["themes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["theme"].as_str().unwrap())
        .collect();
    assert_eq!(themes, names);
    assert!(lines[0]["labels"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l == "weapons_trade"));
    assert!(!lines[0]["entities"].as_array().unwrap().is_empty());

    // `evaluate themes --heads SET` scores the set's own themes on a labelled file.
    let labelled = dir.path().join("labelled.jsonl");
    std::fs::write(
        &labelled,
        format!(
            "{}\n{}\n",
            serde_json::json!({"id": "w", "text": WEAPONS, "labels": ["weapons_trade"]}),
            serde_json::json!({"id": "r", "text": WEATHER, "labels": []})
        ),
    )
    .unwrap();
    let report = Command::new(example_binary("evaluate"))
        .args(["themes", "--input", labelled.to_str().unwrap()])
        .args(["--heads", set.to_str().unwrap(), "--threads", "2"])
        .env("THEMESCAN_MODEL_DIR", default_model_folder())
        .output()
        .unwrap();
    assert!(report.status.success());
    let stdout = String::from_utf8_lossy(&report.stdout);
    assert!(
        stdout.contains("weapons_trade") && stdout.contains("hate_speech"),
        "{stdout}"
    );
    assert!(!stdout.contains("recruitment"), "{stdout}");
    assert!(
        stdout.lines().last().unwrap().starts_with("macro_f1 "),
        "{stdout}"
    );
}

#[test]
fn a_bad_theme_set_file_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let set = dir.path().join("bad.toml");
    std::fs::write(
        &set,
        "name = \"bad\"\n\n[[theme]]\nname = \"ok\"\ndescriptions = [\"fine\"]\n\n[[theme]]\nname = \"Not OK\"\ndescriptions = [\"x\"]\n",
    )
    .unwrap();
    let out = Command::new(example_binary("train_themes"))
        .current_dir(repo_path("."))
        .args(["--theme-set", set.to_str().unwrap(), "--out"])
        .arg(dir.path().join("never"))
        .env("THEMESCAN_MODEL_DIR", default_model_folder())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("line 7") && stderr.contains("`name`"),
        "{stderr}"
    );
    assert!(!dir.path().join("never").exists());
}

/// Heads shipped with fine-tuned layers: a set trained beside them (`--beside`) is trained on
/// the same encoder, carries the layers in its folder and records their sha256, so it loads
/// beside them (and alone), and is refused beside heads that make another encoder.
#[test]
fn a_set_trained_beside_fine_tuned_heads_runs_on_their_layers() {
    let dir = tempfile::tempdir().unwrap();
    let heads = dir.path().join("heads");
    std::fs::create_dir_all(&heads).unwrap();
    for entry in std::fs::read_dir(themescan::default_heads_folder()).unwrap() {
        let p = entry.unwrap().path();
        if p.extension()
            .is_some_and(|e| e == "json" || e == "safetensors")
        {
            std::fs::copy(&p, heads.join(p.file_name().unwrap())).unwrap();
        }
    }
    // The top layer as the checkpoint has it, in f16: an encoder of its own sha256.
    let files = ModelSource::Folder(default_model_folder())
        .resolve()
        .unwrap();
    let checkpoint = themescan::weights::Checkpoint::load(
        &files,
        &themescan::Device::Cpu,
        themescan::DType::F32,
    )
    .unwrap();
    let layers = heads.join(themescan::heads::ENCODER_LAYERS);
    themescan::encoder::trainable::TrainableLayers::top(checkpoint, 1)
        .unwrap()
        .save_f16(&layers)
        .unwrap();
    let sha = themescan::heads::encoder_layers_sha256(&heads)
        .unwrap()
        .unwrap();
    for card in ["ner.json", "themes.json"] {
        let path = heads.join(card);
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        json["encoder_layers_sha256"] = serde_json::json!(sha);
        std::fs::write(&path, json.to_string()).unwrap();
    }

    let set = train_set(dir.path(), &["--beside".as_ref(), heads.as_os_str()]);
    let card = ThemeCard::read(&set.join("themes.json")).unwrap();
    assert_eq!(card.encoder_layers_sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(
        std::fs::read(set.join(themescan::heads::ENCODER_LAYERS)).unwrap(),
        std::fs::read(&layers).unwrap()
    );
    let with_heads = |heads: &Path| {
        Analyzer::builder()
            .model(ModelSource::Folder(default_model_folder()))
            .heads(heads)
            .theme_set(&set)
            .threads(2)
            .build()
    };
    let analyzer = with_heads(&heads).expect("the set loads beside the heads it was trained for");
    let analysis = analyzer.analyze(&Article::new("w", WEAPONS)).unwrap();
    assert_eq!(analysis.themes.len(), 6);
    assert!(
        analysis
            .labels
            .iter()
            .any(|t| t.as_str() == "weapons_trade"),
        "{:?}",
        analysis.themes
    );
    let Err(err) = with_heads(&themescan::default_heads_folder()) else {
        panic!("a set trained on other layers than the built-in heads' is refused")
    };
    assert!(err.to_string().contains("--theme-set"), "{err}");
}
