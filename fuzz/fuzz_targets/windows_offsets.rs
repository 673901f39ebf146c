//! Windowing and offset mapping: for any text, the windows hold every content token exactly as
//! planned, every token span lies inside the text on character boundaries and in order, no
//! span points into the internal `passage: ` prefix, and segments of the text cover it exactly.
//! Uses the default model's tokenizer (`bash models/fetch.sh`).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use themescan::text::{plan_windows, TextEncoder, WindowConfig};

fn encoder() -> &'static TextEncoder {
    static ENCODER: OnceLock<TextEncoder> = OnceLock::new();
    ENCODER.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/multilingual-e5-small/tokenizer.json"
        );
        // Small windows, so that short inputs span several of them.
        let window = WindowConfig {
            max_tokens: 24,
            overlap: 5,
        };
        TextEncoder::from_file(std::path::Path::new(path), "passage: ", window)
            .expect("run `bash models/fetch.sh` first")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let tokenized = encoder().encode(text).expect("any UTF-8 text tokenises");
    let mut covered = 0;
    let mut last_start = 0;
    for w in &tokenized.windows {
        assert!(w.content.start <= covered, "windows leave no gap");
        covered = covered.max(w.content.end);
        assert_eq!(w.ids.len(), w.spans.len());
        assert!(w.ids.len() <= 24);
        let spans: Vec<_> = w.spans.iter().flatten().collect();
        assert_eq!(spans.len(), w.content.len(), "one span per content token");
        for s in spans {
            assert!(s.start <= s.end && s.end <= text.len());
            assert!(text.is_char_boundary(s.start) && text.is_char_boundary(s.end));
            if w.content.start == 0 {
                assert!(s.start >= last_start, "spans in text order");
                last_start = s.start;
            }
        }
    }
    assert_eq!(covered, tokenized.content_tokens);

    let segments = themescan::segment_text(text, 1 + data.len() % 97);
    assert_eq!(segments.first().map(|r| r.start), Some(0));
    assert_eq!(segments.last().map(|r| r.end), Some(text.len()));
    for pair in segments.windows(2) {
        assert_eq!(pair[0].end, pair[1].start);
    }

    let len = data.len();
    let capacity = 2 + data.first().map_or(0, |&b| b as usize % 40);
    let overlap = data.get(1).map_or(0, |&b| b as usize) % capacity;
    let windows = plan_windows(len, capacity, overlap);
    let mut next = 0;
    for w in &windows {
        assert!(w.start <= next && w.len() <= capacity);
        next = next.max(w.end);
    }
    assert_eq!(next, len);
});
