//! Theme-set files: your own themes, described in TOML, turned into a heads folder by
//! `cargo run --release --example train_themes -- --theme-set FILE --out DIR`.
//!
//! ```toml
//! name = "security-extra"
//!
//! [[theme]]
//! name = "weapons_trade"                      # [a-z0-9_]+, unique in the set
//! descriptions = ["News about arms trafficking ...", "Nieuws over wapenhandel ..."]
//! examples = ["a text that carries the theme"]        # optional
//! negatives = ["a text that does not"]                # optional
//! examples_file = "labelled.jsonl"   # optional: `text` and `labels` per line, relative to the TOML
//! ```
//!
//! Descriptions alone give a zero-shot theme: windows are scored by their similarity to the
//! descriptions' embedding (e5's `query: ` prefix for descriptions, `passage: ` for text),
//! standardised against a background of ordinary news. With enough examples, a theme gets a
//! trained row that starts from (and is held near) that zero-shot row.
//!
//! ```
//! use themescan::theme_set::ThemeSetFile;
//!
//! let set = ThemeSetFile::parse(
//!     r#"
//! name = "demo"
//! [[theme]]
//! name = "weapons_trade"
//! descriptions = ["News about arms trafficking and illegal weapons sales."]
//! "#,
//!     std::path::Path::new("demo.toml"),
//! )
//! .unwrap();
//! assert_eq!(set.themes[0].name.as_str(), "weapons_trade");
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::themes::Theme;

/// A parsed theme-set file.
#[derive(Debug, Clone, PartialEq)]
pub struct ThemeSetFile {
    /// The file it was read from.
    pub path: PathBuf,
    /// The set's name.
    pub name: String,
    /// Its themes, in file order (the order of the head's outputs).
    pub themes: Vec<ThemeSpec>,
}

/// One `[[theme]]` of a theme-set file.
#[derive(Debug, Clone, PartialEq)]
pub struct ThemeSpec {
    /// The theme's name.
    pub name: Theme,
    /// One or more descriptions, any language.
    pub descriptions: Vec<String>,
    /// Texts that carry the theme.
    pub examples: Vec<String>,
    /// Texts that do not.
    pub negatives: Vec<String>,
    /// A JSONL file of `{"text", "labels"}` objects (resolved against the TOML's folder): a
    /// text is a positive of this theme when its labels name it, else a negative.
    pub examples_file: Option<PathBuf>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSet {
    name: String,
    #[serde(rename = "theme", default)]
    themes: Vec<RawTheme>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTheme {
    name: String,
    #[serde(default)]
    descriptions: Vec<String>,
    #[serde(default)]
    examples: Vec<String>,
    #[serde(default)]
    negatives: Vec<String>,
    #[serde(default)]
    examples_file: Option<PathBuf>,
}

/// A text of a set's training data, with what it says about each theme of the set:
/// `Some(true)` positive, `Some(false)` negative, `None` unknown.
#[derive(Debug, Clone, PartialEq)]
pub struct SetExample {
    /// The text.
    pub text: String,
    /// One entry per theme of the set, in its order.
    pub targets: Vec<Option<bool>>,
}

impl ThemeSetFile {
    /// Reads and checks a theme-set file.
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read; [`Error::Config`] naming the file, the line and the
    /// field for TOML errors, a bad or repeated theme name, or a theme without descriptions.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parses the text of a theme-set file; `path` is used in errors and to resolve
    /// `examples_file`.
    ///
    /// # Errors
    /// As [`ThemeSetFile::read`].
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let config = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let raw: RawSet = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let (line, column) = line_column(text, s.start);
                    format!("line {line} column {column}: ")
                })
                .unwrap_or_default();
            config(format!("{at}{}", e.message()))
        })?;
        // Line of the n-th `[[theme]]` header, for errors about a theme's fields.
        let headers: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.trim_start().starts_with("[[theme]]"))
            .map(|(i, _)| i + 1)
            .collect();
        let at = |i: usize| match headers.get(i) {
            Some(line) => format!("line {line}, theme {}", i + 1),
            None => format!("theme {}", i + 1),
        };
        if raw.themes.is_empty() {
            return Err(config(
                "no `[[theme]]`: a set needs at least one theme".to_string(),
            ));
        }
        let folder = path.parent().unwrap_or(Path::new("."));
        let mut themes: Vec<ThemeSpec> = Vec::with_capacity(raw.themes.len());
        for (i, t) in raw.themes.into_iter().enumerate() {
            let name = Theme::new(t.name.clone())
                .map_err(|e| config(format!("{}, field `name`: {e}", at(i))))?;
            if themes.iter().any(|other| other.name == name) {
                return Err(config(format!(
                    "{}, field `name`: `{name}` is already a theme of this set",
                    at(i)
                )));
            }
            let descriptions: Vec<String> = t
                .descriptions
                .into_iter()
                .map(|d| d.trim().to_string())
                .filter(|d| !d.is_empty())
                .collect();
            if descriptions.is_empty() {
                return Err(config(format!(
                    "{}, field `descriptions`: `{name}` needs at least one non-empty \
                     description (a sentence saying what articles about it are about)",
                    at(i)
                )));
            }
            for (field, texts) in [("examples", &t.examples), ("negatives", &t.negatives)] {
                if let Some(j) = texts.iter().position(|x| x.trim().is_empty()) {
                    return Err(config(format!(
                        "{}, field `{field}`: entry {} is empty",
                        at(i),
                        j + 1
                    )));
                }
            }
            let examples_file = t.examples_file.map(|f| folder.join(f));
            if let Some(f) = &examples_file {
                if !f.is_file() {
                    return Err(config(format!(
                        "{}, field `examples_file`: {} does not exist",
                        at(i),
                        f.display()
                    )));
                }
            }
            themes.push(ThemeSpec {
                name,
                descriptions,
                examples: t.examples,
                negatives: t.negatives,
                examples_file,
            });
        }
        Ok(ThemeSetFile {
            path: path.to_path_buf(),
            name: raw.name,
            themes,
        })
    }

    /// The set's themes, in order.
    pub fn theme_names(&self) -> Vec<Theme> {
        self.themes.iter().map(|t| t.name.clone()).collect()
    }

    /// Every example text of the set, each once, with its target per theme. Inline examples
    /// and negatives speak for their own theme only; a record of an `examples_file` speaks for
    /// every theme that names that file.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Config`] (file and line) for an unreadable or bad
    /// `examples_file`.
    pub fn examples(&self) -> Result<Vec<SetExample>> {
        let n = self.themes.len();
        let mut by_text: BTreeMap<String, usize> = BTreeMap::new();
        let mut out: Vec<SetExample> = Vec::new();
        let mut set = |text: &str, k: usize, value: bool, out: &mut Vec<SetExample>| {
            let row = *by_text.entry(text.to_string()).or_insert_with(|| {
                out.push(SetExample {
                    text: text.to_string(),
                    targets: vec![None; n],
                });
                out.len() - 1
            });
            // A text given as both positive and negative counts as positive.
            let target = &mut out[row].targets[k];
            *target = Some(target.unwrap_or(false) || value);
        };
        let mut files: BTreeMap<PathBuf, Vec<(String, Vec<String>)>> = BTreeMap::new();
        for (k, theme) in self.themes.iter().enumerate() {
            for text in &theme.examples {
                set(text, k, true, &mut out);
            }
            for text in &theme.negatives {
                set(text, k, false, &mut out);
            }
            if let Some(path) = &theme.examples_file {
                if !files.contains_key(path) {
                    files.insert(path.clone(), read_labelled(path)?);
                }
                for (text, labels) in &files[path] {
                    set(
                        text,
                        k,
                        labels.iter().any(|l| l == theme.name.as_str()),
                        &mut out,
                    );
                }
            }
        }
        Ok(out)
    }
}

/// `(text, labels)` of every line of a labelled JSONL file.
fn read_labelled(path: &Path) -> Result<Vec<(String, Vec<String>)>> {
    #[derive(serde::Deserialize)]
    struct Line {
        text: String,
        #[serde(default)]
        labels: Vec<String>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(line).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!("line {}: {e}", i + 1),
        })?;
        if l.text.trim().is_empty() {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!("line {}: empty `text`", i + 1),
            });
        }
        out.push((l.text, l.labels));
    }
    Ok(out)
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ThemeSetFile> {
        ThemeSetFile::parse(text, Path::new("sets/my.toml"))
    }

    fn message(r: Result<ThemeSetFile>) -> String {
        match r {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn parses_themes_and_inline_examples() {
        let set = parse(
            r#"
name = "s"
[[theme]]
name = "a"
descriptions = ["about a", "over a"]
examples = ["x is a", "y is a"]
negatives = ["z"]
[[theme]]
name = "b_2"
descriptions = ["about b"]
examples = ["x is a"]
"#,
        )
        .unwrap();
        assert_eq!(set.name, "s");
        assert_eq!(
            set.theme_names(),
            vec![Theme::new("a").unwrap(), Theme::new("b_2").unwrap()]
        );
        let ex = set.examples().unwrap();
        assert_eq!(ex.len(), 3);
        assert_eq!(ex[0].text, "x is a");
        assert_eq!(ex[0].targets, vec![Some(true), Some(true)]);
        assert_eq!(ex[2].targets, vec![Some(false), None]);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = message(parse(
            "name = \"s\"\n[[theme]]\nname = \"a\"\ndescriptions = \"one\"\n",
        ));
        assert!(e.contains("sets/my.toml") && e.contains("line 4"), "{e}");
        let e = message(parse(
            "name = \"s\"\n[[theme]]\nname = \"a\"\ndescriptions = [\"d\"]\n\n[[theme]]\nname = \"Bad Name\"\ndescriptions = [\"d\"]\n",
        ));
        assert!(e.contains("line 6") && e.contains("`name`"), "{e}");
        let e = message(parse("name = \"s\"\n[[theme]]\nname = \"a\"\n"));
        assert!(e.contains("line 2") && e.contains("`descriptions`"), "{e}");
        let e = message(parse(
            "name = \"s\"\n[[theme]]\nname = \"a\"\ndescriptions = [\"d\"]\nexample = [\"typo\"]\n",
        ));
        assert!(e.contains("line 5") && e.contains("example"), "{e}");
        let e = message(parse(
            "name = \"s\"\n[[theme]]\nname = \"a\"\ndescriptions = [\"d\"]\n[[theme]]\nname = \"a\"\ndescriptions = [\"d\"]\n",
        ));
        assert!(e.contains("already"), "{e}");
        let e = message(parse(
            "name = \"s\"\n[[theme]]\nname = \"a\"\ndescriptions = [\"d\"]\nexamples_file = \"missing.jsonl\"\n",
        ));
        assert!(
            e.contains("examples_file") && e.contains("missing.jsonl"),
            "{e}"
        );
        assert!(message(parse("name = \"s\"\n")).contains("no `[[theme]]`"));
    }
}
