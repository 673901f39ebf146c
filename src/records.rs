//! Input records for batch jobs: a JSONL stream or a folder of text files, read lazily so that
//! memory stays bounded whatever the input's size. Every record becomes exactly one
//! [`InputRecord`]; a malformed one carries the reason instead of a text, so a caller can write
//! one output line per input record and lose nothing.
//!
//! ```
//! use themescan::records::JsonlRecords;
//!
//! let input = b"{\"id\": \"a\", \"text\": \"Europol\"}\nnot json\n" as &[u8];
//! let records: Vec<_> = JsonlRecords::new(input).collect::<std::io::Result<_>>().unwrap();
//! assert_eq!(records[0].text.as_deref(), Ok("Europol"));
//! assert!(records[1].text.as_ref().unwrap_err().contains("line 2"));
//! ```

use std::io::{self, BufRead, Read};
use std::path::{Path, PathBuf};

/// Longest JSONL line read; a longer line is skipped (read through, not kept) with an error.
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 << 20;

/// One input record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRecord {
    /// 1-based position: the line number in a JSONL input, the file's ordinal in a folder.
    pub position: usize,
    /// The record's id, when one could be read (for a folder: the file's relative path).
    pub id: Option<String>,
    /// The text to analyse, or why there is none.
    pub text: Result<String, String>,
    /// A problem that did not stop the text from being analysed (NUL bytes read as spaces).
    pub warning: Option<String>,
    /// Input bytes this record took, for progress.
    pub bytes: u64,
}

/// Reads one JSONL line into `(id, text)`, or says exactly what is wrong with it. `number` is
/// the line's 1-based number, used in messages.
///
/// Accepted: a JSON object with string fields `id` and `text` (other fields ignored), a
/// trailing `\r`. Refused, with the id when it could still be read: invalid UTF-8, broken JSON,
/// a non-object, a missing or non-string `id` or `text`, an empty or all-whitespace text.
pub fn parse_jsonl_line(line: &[u8], number: usize) -> (Option<String>, Result<String, String>) {
    let at = |msg: String| format!("line {number}: {msg}");
    if let Err(e) = std::str::from_utf8(line) {
        // Try to name the record anyway: the damage is often inside the text only.
        let lossy = String::from_utf8_lossy(line);
        let id = serde_json::from_str::<serde_json::Value>(&lossy)
            .ok()
            .and_then(|v| v.get("id")?.as_str().map(str::to_string));
        return (
            id,
            Err(at(format!(
                "invalid UTF-8 at byte {} of the line",
                e.valid_up_to()
            ))),
        );
    }
    let value: serde_json::Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return (None, Err(at(format!("broken JSON: {e}")))),
    };
    let Some(object) = value.as_object() else {
        return (
            None,
            Err(at(format!(
                "expected a JSON object with `id` and `text`, found {}",
                json_kind(&value)
            ))),
        );
    };
    let id = match object.get("id") {
        None => return (None, Err(at("no `id` field".into()))),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => {
            return (
                None,
                Err(at(format!(
                    "`id` must be a string, found {}",
                    json_kind(other)
                ))),
            )
        }
    };
    let text = match object.get("text") {
        None => return (Some(id), Err(at("no `text` field".into()))),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => {
            return (
                Some(id),
                Err(at(format!(
                    "`text` must be a string, found {}",
                    json_kind(other)
                ))),
            )
        }
    };
    if text.trim().is_empty() {
        return (Some(id), Err(at("empty text".into())));
    }
    (Some(id), Ok(text))
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// One output line of batch classification (`classify`, the Python package): an article's
/// results, or empty results and the reason in `error`. Serialised with serde, so every tool
/// writes the same fields in the same order.
#[derive(Debug, serde::Serialize)]
pub struct OutputRow<'a> {
    /// The record's id, if it had one.
    pub id: Option<&'a str>,
    /// Every theme with its score.
    pub themes: &'a [crate::ThemeScore],
    /// Themes over their threshold.
    pub labels: &'a [crate::Theme],
    /// Sentences that carry each label.
    pub evidence: &'a [crate::Evidence],
    /// Named-entity mentions.
    pub entities: &'a [crate::entities::Entity],
    /// Why the record has no results, or a warning about it.
    pub error: Option<&'a str>,
}

impl<'a> OutputRow<'a> {
    /// A row with no results and `error` set.
    pub fn failed(id: Option<&'a str>, error: &'a str) -> Self {
        OutputRow {
            id,
            themes: &[],
            labels: &[],
            evidence: &[],
            entities: &[],
            error: Some(error),
        }
    }
}

/// NUL bytes are read as spaces (same length, so offsets still point into the original text);
/// the record keeps a warning saying so.
pub fn replace_nuls(text: String) -> (String, Option<String>) {
    let nuls = text.bytes().filter(|&b| b == 0).count();
    if nuls == 0 {
        return (text, None);
    }
    (
        text.replace('\0', " "),
        Some(format!(
            "the text has {nuls} NUL byte(s); they were read as spaces"
        )),
    )
}

/// The records of a JSONL stream, one per line, lazily. Blank lines are records too (with an
/// error), so output line N always answers input line N.
pub struct JsonlRecords<R> {
    reader: R,
    line: usize,
    max_line_bytes: usize,
    buf: Vec<u8>,
}

impl<R: BufRead> JsonlRecords<R> {
    /// Records of `reader`, lines up to [`DEFAULT_MAX_LINE_BYTES`].
    pub fn new(reader: R) -> Self {
        Self::with_max_line_bytes(reader, DEFAULT_MAX_LINE_BYTES)
    }

    /// Records of `reader`; a line over `max` bytes is read through and reported, not kept.
    pub fn with_max_line_bytes(reader: R, max: usize) -> Self {
        JsonlRecords {
            reader,
            line: 0,
            max_line_bytes: max,
            buf: Vec::new(),
        }
    }

    /// Reads one line into `buf` up to the limit; returns (bytes consumed, whether it was cut).
    fn read_line(&mut self) -> io::Result<(u64, bool)> {
        self.buf.clear();
        let mut consumed = 0u64;
        let mut too_long = false;
        loop {
            let available = match self.reader.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                return Ok((consumed, too_long));
            }
            let (piece, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..=i], true),
                None => (available, false),
            };
            let n = piece.len();
            if !too_long {
                if self.buf.len() + n > self.max_line_bytes + 1 {
                    too_long = true;
                    self.buf.clear();
                } else {
                    self.buf.extend_from_slice(piece);
                }
            }
            self.reader.consume(n);
            consumed += n as u64;
            if done {
                return Ok((consumed, too_long));
            }
        }
    }
}

impl<R: BufRead> Iterator for JsonlRecords<R> {
    type Item = io::Result<InputRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        let (bytes, too_long) = match self.read_line() {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        if bytes == 0 {
            return None;
        }
        self.line += 1;
        let number = self.line;
        if too_long {
            return Some(Ok(InputRecord {
                position: number,
                id: None,
                text: Err(format!(
                    "line {number}: longer than {} MiB; skipped (raise the line limit to read it)",
                    self.max_line_bytes >> 20
                )),
                warning: None,
                bytes,
            }));
        }
        let mut line: &[u8] = &self.buf;
        if let Some(rest) = line.strip_suffix(b"\n") {
            line = rest;
        }
        if let Some(rest) = line.strip_suffix(b"\r") {
            line = rest;
        }
        let (id, text) = if line.iter().all(u8::is_ascii_whitespace) {
            (None, Err(format!("line {number}: blank line")))
        } else {
            parse_jsonl_line(line, number)
        };
        let (text, warning) = match text {
            Ok(t) => {
                let (t, w) = replace_nuls(t);
                (Ok(t), w)
            }
            Err(e) => (Err(e), None),
        };
        Some(Ok(InputRecord {
            position: number,
            id,
            text,
            warning,
            bytes,
        }))
    }
}

/// Every regular file under `root` (hidden entries skipped), sorted by relative path, with
/// `/`-separated relative paths as ids.
///
/// # Errors
/// An I/O error if `root` or a folder under it cannot be listed.
pub fn list_folder(root: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() || (kind.is_symlink() && path.is_file()) {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                let id = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((id, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Reads one file of a folder input as a record: UTF-8 text, or an error for a binary or
/// unreadable file or one over `max_bytes`.
pub fn read_text_file(position: usize, id: &str, path: &Path, max_bytes: usize) -> InputRecord {
    let record = |text, warning, bytes| InputRecord {
        position,
        id: Some(id.to_string()),
        text,
        warning,
        bytes,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return record(Err(format!("{id}: cannot open: {e}")), None, 0),
    };
    let mut bytes = Vec::new();
    if let Err(e) = file.take(max_bytes as u64 + 1).read_to_end(&mut bytes) {
        return record(Err(format!("{id}: cannot read: {e}")), None, 0);
    }
    let size = bytes.len() as u64;
    if bytes.len() > max_bytes {
        let size = std::fs::metadata(path).map_or(size, |m| m.len());
        return record(
            Err(format!(
                "{id}: {size} bytes, over the {} MiB limit; skipped",
                max_bytes >> 20
            )),
            None,
            size,
        );
    }
    // A NUL in the first few KB is the usual sign of a binary file (as git and grep judge it).
    if bytes[..bytes.len().min(8192)].contains(&0) {
        return record(
            Err(format!("{id}: a binary file (NUL bytes), not text")),
            None,
            size,
        );
    }
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            return record(
                Err(format!(
                    "{id}: not UTF-8 text (invalid byte at offset {})",
                    e.utf8_error().valid_up_to()
                )),
                None,
                size,
            )
        }
    };
    if text.trim().is_empty() {
        return record(Err(format!("{id}: empty text")), None, size);
    }
    let (text, warning) = replace_nuls(text);
    record(Ok(text), warning, size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(input: &[u8], max: usize) -> Vec<InputRecord> {
        JsonlRecords::with_max_line_bytes(input, max)
            .collect::<io::Result<_>>()
            .unwrap()
    }

    #[test]
    fn every_line_is_one_record_with_a_reason() {
        let input = b"{\"id\":\"a\",\"text\":\"ok\"}\r\n\
            {\"id\":\"b\",\"text\":\n\
            \n\
            [1,2]\n\
            {\"text\":\"x\"}\n\
            {\"id\":7,\"text\":\"x\"}\n\
            {\"id\":\"c\"}\n\
            {\"id\":\"d\",\"text\":3}\n\
            {\"id\":\"e\",\"text\":\"  \"}\n\
            {\"id\":\"f\",\"text\":\"caf\xe9\"}\n\
            {\"id\":\"g\",\"text\":\"a\\u0000b\"}";
        let r = records(input, 1 << 20);
        assert_eq!(r.len(), 11);
        assert_eq!(r[0].text.as_deref(), Ok("ok"));
        let err = |i: usize| r[i].text.clone().unwrap_err();
        assert!(err(1).starts_with("line 2: broken JSON"), "{}", err(1));
        assert_eq!(err(2), "line 3: blank line");
        assert!(err(3).contains("found an array"));
        assert!(err(4).contains("no `id`"));
        assert!(err(5).contains("`id` must be a string, found a number"));
        assert_eq!(
            (r[6].id.as_deref(), err(6).contains("no `text`")),
            (Some("c"), true)
        );
        assert!(err(7).contains("`text` must be a string"));
        assert!(err(8).contains("empty text"));
        assert_eq!(r[9].id.as_deref(), Some("f"));
        assert!(err(9).contains("invalid UTF-8 at byte"), "{}", err(9));
        assert_eq!(r[10].text.as_deref(), Ok("a b"));
        assert!(r[10].warning.as_ref().unwrap().contains("1 NUL"));
        let positions: Vec<usize> = r.iter().map(|r| r.position).collect();
        assert_eq!(positions, (1..=11).collect::<Vec<_>>());
        assert_eq!(r.iter().map(|r| r.bytes).sum::<u64>(), input.len() as u64);
    }

    #[test]
    fn an_over_long_line_is_reported_and_the_next_one_still_read() {
        let long = format!("{{\"id\":\"x\",\"text\":\"{}\"}}\n", "a".repeat(5000));
        let input = format!("{long}{{\"id\":\"y\",\"text\":\"b\"}}\n");
        // A tiny BufReader capacity makes the long line span many buffer refills.
        let reader = io::BufReader::with_capacity(64, input.as_bytes());
        let r: Vec<_> = JsonlRecords::with_max_line_bytes(reader, 1000)
            .collect::<io::Result<_>>()
            .unwrap();
        assert_eq!(r.len(), 2);
        assert!(r[0].text.as_ref().unwrap_err().contains("longer than"));
        assert_eq!(r[0].bytes, long.len() as u64);
        assert_eq!(r[1].id.as_deref(), Some("y"));
    }

    #[test]
    fn folder_files_become_records_and_binaries_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b.txt"), "Tekst over Europol.").unwrap();
        std::fs::write(dir.path().join("a.txt"), "Text").unwrap();
        std::fs::write(dir.path().join("img.png"), b"\x89PNG\r\n\x1a\n\0\0\0").unwrap();
        std::fs::write(dir.path().join("latin1.txt"), b"caf\xe9").unwrap();
        std::fs::write(dir.path().join(".hidden"), "x").unwrap();
        let files = list_folder(dir.path()).unwrap();
        let ids: Vec<&str> = files.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["a.txt", "img.png", "latin1.txt", "sub/b.txt"]);
        let r: Vec<InputRecord> = files
            .iter()
            .enumerate()
            .map(|(i, (id, p))| read_text_file(i + 1, id, p, 1 << 20))
            .collect();
        assert_eq!(r[0].text.as_deref(), Ok("Text"));
        assert!(r[1].text.as_ref().unwrap_err().contains("binary"));
        assert!(r[2].text.as_ref().unwrap_err().contains("not UTF-8"));
        assert_eq!(r[3].text.as_deref(), Ok("Tekst over Europol."));
    }
}
