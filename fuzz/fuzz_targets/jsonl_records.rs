//! The JSONL reader: any bytes give exactly one record per line, in order, accounting for every
//! input byte, and never a panic. A small line limit exercises the over-long-line path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use themescan::records::{parse_jsonl_line, JsonlRecords};

fuzz_target!(|data: &[u8]| {
    let lines = data.split(|&b| b == b'\n').count() - usize::from(data.ends_with(b"\n"));
    let lines = if data.is_empty() { 0 } else { lines };
    // A tiny buffer makes lines span many refills.
    let reader = std::io::BufReader::with_capacity(7, data);
    let records: Vec<_> = JsonlRecords::with_max_line_bytes(reader, 64)
        .map(|r| r.expect("reading from memory cannot fail"))
        .collect();
    assert_eq!(records.len(), lines);
    assert_eq!(
        records.iter().map(|r| r.bytes).sum::<u64>(),
        data.len() as u64
    );
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.position, i + 1);
        if let Ok(text) = &r.text {
            assert!(!text.contains('\0'), "NULs are read as spaces");
            assert!(!text.trim().is_empty(), "empty texts are errors");
            assert!(r.id.is_some(), "a text always comes with its id");
        }
    }
    let _ = parse_jsonl_line(data, 1);
});
