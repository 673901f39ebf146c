//! Themes by name, and the result types that carry them.
//!
//! A theme is a name (`[a-z0-9_]+`) that a heads folder's card lists. The four built-in themes
//! (`models/heads/`) are one theme set among others: a custom set made by
//! `train_themes --theme-set FILE` adds its own names, and nothing in the pipeline assumes how
//! many themes there are.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// A theme an article can carry (multi-label: several, or none), by its snake_case name.
///
/// ```
/// use themescan::Theme;
///
/// let custom: Theme = "weapons_trade".parse().unwrap();
/// assert_eq!(custom.as_str(), "weapons_trade");
/// assert_eq!(Theme::BUILT_IN[0], Theme::RECRUITMENT);
/// assert!("Weapons Trade".parse::<Theme>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Theme(Cow<'static, str>);

impl Theme {
    /// Extremist or terrorist groups recruiting, radicalising, inciting or spreading propaganda.
    pub const RECRUITMENT: Theme = Theme(Cow::Borrowed("recruitment"));
    /// Authorities or platforms removing, blocking or seizing extremist content, accounts or
    /// servers.
    pub const TAKEDOWN: Theme = Theme(Cow::Borrowed("takedown"));
    /// A foreign state or its proxies covertly influencing another country.
    pub const FOREIGN_INTERFERENCE: Theme = Theme(Cow::Borrowed("foreign_interference"));
    /// Raising, moving or paying money for terrorism or extremism.
    pub const FINANCING: Theme = Theme(Cow::Borrowed("financing"));

    /// The four themes of the built-in head, in its output order.
    pub const BUILT_IN: [Theme; 4] = [
        Theme::RECRUITMENT,
        Theme::TAKEDOWN,
        Theme::FOREIGN_INTERFERENCE,
        Theme::FINANCING,
    ];

    /// A theme from its name.
    ///
    /// # Errors
    /// [`Error::Setting`] unless the name is non-empty snake_case ASCII (`[a-z0-9_]+`, at most
    /// 64 bytes): names are JSON keys and file-format fields downstream.
    pub fn new(name: impl Into<String>) -> Result<Theme, Error> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !ok {
            return Err(Error::Setting(format!(
                "`{name}` is not a theme name: use 1-64 characters of a-z, 0-9 and _ \
                 (like `weapons_trade`)"
            )));
        }
        Ok(match Theme::BUILT_IN.iter().find(|t| t.as_str() == name) {
            Some(t) => t.clone(),
            None => Theme(Cow::Owned(name)),
        })
    }

    /// The name, as in JSON (`foreign_interference`).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Theme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Theme {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Theme::new(s)
    }
}

impl<'de> serde::Deserialize<'de> for Theme {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Theme::new(name).map_err(serde::de::Error::custom)
    }
}

/// A theme with its article-level probability.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ThemeScore {
    /// The theme.
    pub theme: Theme,
    /// Probability in `[0, 1]` that the theme is a substantial subject of the article.
    pub score: f32,
}

/// A sentence that carries a theme.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Evidence {
    /// The theme it supports.
    pub theme: Theme,
    /// Byte offset of the sentence's start in the original text.
    pub start: usize,
    /// Byte offset one past the sentence's end in the original text.
    pub end: usize,
    /// The theme head's probability for this sentence alone.
    pub score: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for t in Theme::BUILT_IN {
            assert_eq!(t.as_str().parse::<Theme>().unwrap(), t);
            assert_eq!(
                serde_json::to_string(&t).unwrap(),
                format!("\"{}\"", t.as_str())
            );
        }
        let custom: Theme = serde_json::from_str("\"attack_planning\"").unwrap();
        assert_eq!(custom.as_str(), "attack_planning");
        for bad in ["", "Terrorism", "hate speech", "haat-zaaien", "ü"] {
            assert!(bad.parse::<Theme>().is_err(), "{bad}");
            assert!(serde_json::from_str::<Theme>(&format!("\"{bad}\"")).is_err());
        }
        assert!("x".repeat(65).parse::<Theme>().is_err());
    }
}
