//! The four themes and the result types that carry them.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// An extremism-related theme an article can carry (multi-label: several, or none).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Theme {
    /// Extremist or terrorist groups recruiting, radicalising, inciting or spreading propaganda.
    Recruitment,
    /// Authorities or platforms removing, blocking or seizing extremist content, accounts or servers.
    Takedown,
    /// A foreign state or its proxies covertly influencing another country.
    ForeignInterference,
    /// Raising, moving or paying money for terrorism or extremism.
    Financing,
}

impl Theme {
    /// Every theme, in the order of the theme head's outputs.
    pub const ALL: [Theme; 4] = [
        Theme::Recruitment,
        Theme::Takedown,
        Theme::ForeignInterference,
        Theme::Financing,
    ];

    /// The snake_case name used in JSON (`foreign_interference`).
    pub fn as_str(self) -> &'static str {
        match self {
            Theme::Recruitment => "recruitment",
            Theme::Takedown => "takedown",
            Theme::ForeignInterference => "foreign_interference",
            Theme::Financing => "financing",
        }
    }

    /// Position in [`Theme::ALL`].
    pub fn index(self) -> usize {
        self as usize
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
        Theme::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| {
            Error::Setting(format!(
                "unknown theme `{s}`: expected recruitment, takedown, foreign_interference or financing"
            ))
        })
    }
}

/// A theme with its article-level probability.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ThemeScore {
    /// The theme.
    pub theme: Theme,
    /// Probability in `[0, 1]` that the theme is a substantial subject of the article.
    pub score: f32,
}

/// A sentence that carries a theme.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
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
        for t in Theme::ALL {
            assert_eq!(t.as_str().parse::<Theme>().unwrap(), t);
            assert_eq!(
                serde_json::to_string(&t).unwrap(),
                format!("\"{}\"", t.as_str())
            );
            assert_eq!(Theme::ALL[t.index()], t);
        }
        assert!("terrorism".parse::<Theme>().is_err());
    }
}
