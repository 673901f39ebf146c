//! The compact Unigram model against the `tokenizers` crate's own, on the default model's
//! `tokenizer.json`: the same ids, offsets and special-token marks on every text the project
//! ships, the NER dev sentences, and random strings of many scripts, combining marks, emoji,
//! control and private-use characters and literal special tokens.

mod common;

use common::*;
use themescan::text::TextTokenizer;
use tokenizers::Tokenizer;

fn tokenizers() -> (TextTokenizer, Tokenizer) {
    let path = default_model_folder().join("tokenizer.json");
    let json = std::fs::read(&path).unwrap();
    let compact = TextTokenizer::from_bytes(&json).unwrap();
    assert!(
        matches!(compact, TextTokenizer::Compact(_)),
        "the default model's Unigram tokenizer should load compact"
    );
    (compact, Tokenizer::from_bytes(&json).unwrap())
}

fn assert_same(compact: &TextTokenizer, standard: &Tokenizer, text: &str) {
    for specials in [false, true] {
        let a = compact.encode(text, specials).unwrap();
        let b = standard.encode(text, specials).unwrap();
        assert_eq!(a.get_ids(), b.get_ids(), "ids of {text:?}");
        assert_eq!(a.get_offsets(), b.get_offsets(), "offsets of {text:?}");
        assert_eq!(
            a.get_special_tokens_mask(),
            b.get_special_tokens_mask(),
            "special marks of {text:?}"
        );
    }
}

fn jsonl_texts(rel: &str) -> Vec<String> {
    std::fs::read_to_string(repo_path(rel))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn compact_model_tokenises_the_shipped_texts_as_the_crate_does() {
    let (compact, standard) = tokenizers();
    let mut texts: Vec<String> = texts().into_iter().map(|t| t.text).collect();
    texts.extend(jsonl_texts("benches/data/news.jsonl"));
    texts.extend(jsonl_texts("examples/data/sample.jsonl"));
    let mut files: Vec<_> = std::fs::read_dir(repo_path("training-data/themes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    for f in files {
        texts.extend(jsonl_texts(
            f.strip_prefix(repo_path("")).unwrap().to_str().unwrap(),
        ));
    }
    assert!(texts.len() > 1000, "only {} texts", texts.len());
    for t in &texts {
        assert_same(&compact, &standard, t);
    }
}

#[test]
fn compact_model_tokenises_the_ner_dev_sentences_as_the_crate_does() {
    let (compact, standard) = tokenizers();
    let Some(data) = shared_data(
        "compact_model_tokenises_the_ner_dev_sentences_as_the_crate_does",
        "ner-data",
    ) else {
        return;
    };
    let mut sentences = 0;
    for lang in ["nl", "ar", "en", "es", "de", "ru", "tr", "id", "fr"] {
        let text = std::fs::read_to_string(data.join(lang).join("dev.conll")).unwrap();
        for block in text.split("\n\n") {
            let words: Vec<&str> = block
                .lines()
                .filter_map(|l| l.split('\t').next())
                .filter(|w| !w.is_empty())
                .collect();
            if words.is_empty() {
                continue;
            }
            assert_same(&compact, &standard, &words.join(" "));
            sentences += 1;
        }
    }
    assert!(sentences > 5000, "only {sentences} sentences");
}

#[test]
fn compact_model_tokenises_random_text_as_the_crate_does() {
    let (compact, standard) = tokenizers();
    let pool: Vec<char> = concat!(
        "abcxyzABCXYZ0123456789 .,;:!?'\"-()[]{}/\\@#%&*_+=~",
        "éèêëçñüöäßøåæœ ÀÉÎÕÜ",
        "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
        "ابتثجحخدذرزسشصضطظعغفقكلمنهوي ءآأؤإئ ًٌٍَُِّْ",
        "אבגדהוזחטיכלמנסעפצקרשת",
        "αβγδεζηθικλμνξοπρστυφχψω",
        "中文日本語한국어ひらがなカタカナ",
        "हिन्दीবাংলাதமிழ்ไทย",
        "\u{301}\u{308}\u{200b}\u{200d}\u{feff}\u{a0}\t\n\r\u{7}\u{1b}",
        "\u{e000}\u{f8ff}\u{10ffff}\u{1f600}\u{1f44d}\u{1f3fd}\u{2764}\u{fe0f}",
        "ǅﬁ①Ⅳ㎏％＠ｗ",
    )
    .chars()
    .collect();
    let specials = ["<s>", "</s>", "<unk>", "<mask>", "<pad>", "passage: ", "▁"];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    for _ in 0..3000 {
        let len = next(60);
        let mut text = String::new();
        for _ in 0..len {
            if next(40) == 0 {
                text.push_str(specials[next(specials.len())]);
            } else {
                text.push(pool[next(pool.len())]);
            }
        }
        assert_same(&compact, &standard, &text);
    }
}

#[test]
fn a_wordpiece_tokenizer_loads_the_standard_way_and_a_tiny_unigram_compact() {
    let json = r###"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordPiece", "unk_token": "[UNK]",
        "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
        "vocab": {"[UNK]": 0, "de": 1, "##n": 2}}}"###;
    let loaded = TextTokenizer::from_bytes(json.as_bytes()).unwrap();
    assert!(matches!(loaded, TextTokenizer::Standard(_)));
    assert_eq!(loaded.encode("den", false).unwrap().get_ids(), &[1, 2]);

    let xlmr = std::fs::read(repo_path("tests/fixtures/tiny/xlm-roberta/tokenizer.json")).unwrap();
    let compact = TextTokenizer::from_bytes(&xlmr).unwrap();
    assert!(matches!(compact, TextTokenizer::Compact(_)));
    let standard = Tokenizer::from_bytes(&xlmr).unwrap();
    for t in texts() {
        assert_same(&compact, &standard, &t.text);
    }
}
