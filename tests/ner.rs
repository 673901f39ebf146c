//! Named entities on the shared encoder pass: offsets always slice the original text (a
//! property test over random multilingual text), long texts give no duplicate mentions, and the
//! seed articles yield the entities an analyst expects. Needs the default model and an NER head
//! in `models/heads/` (committed; retrain with `cargo run --release --example train_ner`).

mod common;

use common::*;
use themescan::{Analyzer, Article, ModelSource};

fn analyzer() -> Analyzer {
    let a = Analyzer::builder()
        .model(ModelSource::Folder(default_model_folder()))
        .threads(2)
        .build()
        .unwrap();
    assert!(
        a.ner_card().is_some(),
        "models/heads has no NER head: run `cargo run --release --example train_ner`"
    );
    a
}

/// Seeded xorshift, so failures reproduce.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Random texts built from pieces that stress offsets: Arabic with harakat and tatweel,
/// combining accents, NFKC-changing characters, emoji, zero-width and bidi marks, odd spacing.
fn random_text(rng: &mut Rng) -> String {
    const PIECES: &[&str] = &[
        "Europol",
        "Telegram",
        "Amsterdam",
        "Jan de Vries",
        "موسكو",
        "يوروبول",
        "تنظيم داعش",
        "وَقَّعَ",
        "مـــرحبا",
        "e\u{301}te\u{301}",
        "Ｅｕｒｏｐｏｌ",
        "ﬁnance",
        "🚨",
        "👩‍👩‍👧",
        "\u{200b}",
        "\u{200f}",
        "\u{feff}",
        " ",
        "  ",
        "\n",
        "\t",
        ",",
        ".",
        "«",
        "»",
        "(",
        ")",
        "-",
        "Roskomnadzor",
        "VKontakte",
        "QIWI",
        "İstanbul",
        "Straße",
        "Москва",
        "ФСБ",
        "Ñandú",
        "x",
        "123",
        "'s",
        "l'État",
    ];
    let n = 1 + rng.below(40);
    (0..n)
        .map(|_| PIECES[rng.below(PIECES.len())])
        .collect::<Vec<_>>()
        .join(if rng.below(3) == 0 { "" } else { " " })
}

/// Issue 4: for every entity, `text[start..end]` is its surface form, on char boundaries.
#[test]
fn entity_offsets_slice_random_multilingual_text() {
    let analyzer = analyzer();
    let mut rng = Rng(0x5eed_1234_abcd);
    let texts: Vec<String> = (0..200).map(|_| random_text(&mut rng)).collect();
    let articles: Vec<Article> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| Article::new(i.to_string(), t.clone()))
        .collect();
    let mut found = 0;
    for (text, analysis) in texts.iter().zip(analyzer.analyze_many(&articles).unwrap()) {
        let mut last_end = 0;
        for e in &analysis.entities {
            assert!(
                text.is_char_boundary(e.start) && text.is_char_boundary(e.end),
                "{e:?} in {text:?}"
            );
            assert_eq!(&text[e.start..e.end], e.text, "in {text:?}");
            assert!(
                e.start < e.end && e.start >= last_end,
                "mentions overlap or go backwards: {e:?}"
            );
            assert!((0.0..=1.0).contains(&e.score));
            last_end = e.end;
            found += 1;
        }
    }
    assert!(
        found > 50,
        "only {found} entities in 200 texts full of names"
    );
}

/// A long text, with overlapping windows, lists each mention once and still finds the names
/// in every part of it (the windows' seams included).
#[test]
fn long_text_mentions_are_not_duplicated() {
    let cities = [
        "Antwerpen",
        "Rotterdam",
        "Gent",
        "Utrecht",
        "Brussel",
        "Leuven",
        "Groningen",
        "Brugge",
    ];
    let people = [
        "Jan Peeters",
        "Sofie Claes",
        "Ahmed El Amrani",
        "Marieke de Jong",
    ];
    let verbs = ["sprak met", "ontmoette", "belde", "waarschuwde"];
    let text = (0..120)
        .map(|i| {
            format!(
                "Op dag {i} {} {} de burgemeester van {} over het onderzoek. ",
                verbs[i % 4],
                people[(i / 4) % 4],
                cities[(i * 3) % 8]
            )
        })
        .collect::<String>();
    assert_long_text_covered(&text, &cities);
}

/// Issue 13: the same for French, the ninth NER language.
#[test]
fn long_french_text_mentions_are_not_duplicated() {
    let cities = [
        "Marseille",
        "Lyon",
        "Toulouse",
        "Nantes",
        "Strasbourg",
        "Bordeaux",
        "Lille",
        "Rennes",
    ];
    let people = [
        "Claire Dubois",
        "Karim Benali",
        "Julien Moreau",
        "Sophie Lefèvre",
    ];
    let verbs = ["a rencontré", "a appelé", "a averti", "a reçu"];
    let text = (0..120)
        .map(|i| {
            format!(
                "Le jour {i}, {} {} le maire de {} au sujet de l'enquête. ",
                people[(i / 4) % 4],
                verbs[i % 4],
                cities[(i * 3) % 8]
            )
        })
        .collect::<String>();
    assert_long_text_covered(&text, &cities);
}

/// `text` spans at least four windows, its mentions are listed once, in order, without
/// overlaps, and the places are found in nearly every sentence, seams included.
fn assert_long_text_covered(text: &str, cities: &[&str]) {
    let analyzer = analyzer();
    assert!(
        analyzer
            .embedder()
            .text_encoder()
            .encode(text)
            .unwrap()
            .windows
            .len()
            >= 4
    );
    let entities = analyzer.entities(text).unwrap();
    let starts: std::collections::HashSet<usize> = entities.iter().map(|e| e.start).collect();
    assert_eq!(starts.len(), entities.len(), "duplicate mentions");
    for pair in entities.windows(2) {
        assert!(
            pair[0].end <= pair[1].start,
            "overlapping mentions: {pair:?}"
        );
    }
    let places = entities
        .iter()
        .filter(|e| cities.contains(&e.text.as_str()))
        .count();
    assert!(places >= 100, "cities found {places} times of 120");
    // A mention's score is a probability, however long the text it was decoded in.
    for e in &entities {
        assert!((0.0..=1.0 + 1e-4).contains(&e.score), "{e:?}");
    }
}

/// Issue 13: a French news paragraph (written for this test) yields its people,
/// organisations and places with their types.
#[test]
fn french_news_names_people_organisations_and_places() {
    let text = "Le parquet national antiterroriste a ouvert une enquête après l'arrestation \
        à Lyon de deux hommes soupçonnés d'avoir diffusé des vidéos de l'État islamique. \
        Selon la porte-parole du ministère, Hélène Marchetti, la Direction générale de la \
        sécurité intérieure suivait le groupe depuis plusieurs mois. Europol a aidé les \
        enquêteurs à identifier un serveur installé en Belgique.";
    let entities = analyzer().entities(text).unwrap();
    let found: Vec<(String, String)> = entities
        .iter()
        .map(|e| (e.label.to_string(), e.text.clone()))
        .collect();
    for (label, name) in [
        ("LOC", "Lyon"),
        ("PER", "Hélène Marchetti"),
        ("ORG", "Europol"),
        ("LOC", "Belgique"),
    ] {
        assert!(
            found.iter().any(|(l, t)| l == label && t == name),
            "{label} {name} not in {found:?}"
        );
    }
}

/// Issue 4: the seed articles yield the entities an analyst expects.
#[test]
fn seed_articles_name_the_expected_entities() {
    let Some(path) = shared_data(
        "seed_articles_name_the_expected_entities",
        "seeds/articles.jsonl",
    ) else {
        return;
    };
    let data = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let analyzer = analyzer();
    let mut names = Vec::new();
    for line in data.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let analysis = analyzer
            .analyze(&Article::new(
                v["id"].as_str().unwrap(),
                v["text"].as_str().unwrap(),
            ))
            .unwrap();
        let groups: Vec<String> = analysis
            .entity_groups
            .iter()
            .map(|g| format!("{} {}", g.label, g.text))
            .collect();
        eprintln!("{}: {}", v["id"], groups.join(" | "));
        names.extend(analysis.entity_groups.into_iter().map(|g| g.text));
    }
    let expected = [
        "Europol",
        "Telegram",
        "Amaq",
        "VKontakte",
        "QIWI",
        "Roskomnadzor",
    ];
    let names: Vec<String> = names.iter().map(|n| n.to_lowercase()).collect();
    let missing: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|x| !names.iter().any(|n| n.contains(&x.to_lowercase())))
        .collect();
    let moscow = names
        .iter()
        .any(|n| n.contains("moskou") || n.contains("موسكو"));
    assert!(
        missing.is_empty() && moscow,
        "missing {missing:?}, Moskou/موسكو found: {moscow}"
    );
}
