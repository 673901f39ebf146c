//! Readers for labelled data and the metrics that judge the heads.
//!
//! - [`read_theme_examples`]: the JSONL theme data (`id`, `text`, `labels`, optional `lang`,
//!   `story`), with the file and line of any bad record in the error; [`theme_data_files`] and
//!   [`read_theme_data`] take a folder of such files as well as one file.
//! - [`is_dev_story`]: the held-out split, by story, stable across runs and machines.
//! - [`theme_metrics`], [`macro_f1`], [`best_threshold`]: precision/recall/F1 per theme.
//! - [`fit_platt`], [`expected_calibration_error`]: scores that read as probabilities, and how
//!   far they are from it.
//! - [`conll`]: CoNLL NER files and entity-level (conlleval) scoring.

pub mod conll;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::heads::theme::Platt;
use crate::heads::ThemeMetrics;
use crate::themes::Theme;

/// One labelled article for the theme head.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ThemeExample {
    /// Unique id.
    pub id: String,
    /// ISO 639-1 code; `""` when absent.
    #[serde(default)]
    pub lang: String,
    /// The article.
    pub text: String,
    /// Themes it carries.
    pub labels: Vec<Theme>,
    /// Story id: variants of one story share it and fall on the same side of the split.
    #[serde(default)]
    pub story: String,
    /// `positive`, `multi`, `near_miss` or `negative` where the data says; `""` when absent.
    #[serde(default)]
    pub kind: String,
}

impl ThemeExample {
    /// The labels as one flag per theme of `themes`, in its order (labels outside it are
    /// left out).
    pub fn flags(&self, themes: &[Theme]) -> Vec<bool> {
        themes.iter().map(|t| self.labels.contains(t)).collect()
    }
}

/// Reads labelled theme examples from a JSONL file.
///
/// # Errors
/// [`Error::Io`] if unreadable; [`Error::Config`] naming the line of the first bad record.
pub fn read_theme_examples(path: &Path) -> Result<Vec<ThemeExample>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut ex: ThemeExample = serde_json::from_str(line).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!("line {}: {e}", i + 1),
        })?;
        if ex.story.is_empty() {
            ex.story = ex.id.clone();
        }
        out.push(ex);
    }
    Ok(out)
}

/// The files a data path stands for: the `.jsonl` files of a folder in name order (so a hash
/// over them is stable), or the path itself when it is a file.
///
/// # Errors
/// [`Error::Io`] if the folder is unreadable; [`Error::Config`] if it holds no `.jsonl` file.
pub fn theme_data_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Config {
            path: path.to_path_buf(),
            message: "no .jsonl files in this folder".to_string(),
        });
    }
    Ok(files)
}

/// Reads every labelled theme example of a JSONL file or of a folder of them
/// ([`theme_data_files`], then [`read_theme_examples`] per file).
///
/// # Errors
/// As [`theme_data_files`] and [`read_theme_examples`].
pub fn read_theme_data(path: &Path) -> Result<Vec<ThemeExample>> {
    let mut out = Vec::new();
    for f in theme_data_files(path)? {
        out.extend(read_theme_examples(&f)?);
    }
    Ok(out)
}

/// Whether a story belongs to the dev split: about one story in five, chosen by a hash of the
/// story id (FNV-1a), so the split never depends on file order or on the machine.
pub fn is_dev_story(story: &str) -> bool {
    story_hash(story).is_multiple_of(5)
}

/// For cross-validation inside the training split: the fold (`0..folds`) of a story, chosen
/// by the same hash as [`is_dev_story`] but independent of it.
pub fn story_fold(story: &str, folds: usize) -> usize {
    ((story_hash(story) / 5) % folds as u64) as usize
}

fn story_hash(story: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in story.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Fits Platt scaling (`sigmoid(slope · logit(p) + intercept)`) to scores and their gold
/// flags by Newton's method on the log loss, with a weak prior towards the identity so that a
/// separable set does not send the slope to infinity.
pub fn fit_platt(scores: &[f32], gold: &[bool]) -> Platt {
    let logit = |p: f32| {
        let p = p.clamp(1e-7, 1.0 - 1e-7) as f64;
        (p / (1.0 - p)).ln()
    };
    let xs: Vec<f64> = scores.iter().map(|&p| logit(p)).collect();
    const PRIOR: f64 = 1e-2;
    let loss = |a: f64, b: f64| -> f64 {
        let data: f64 = xs
            .iter()
            .zip(gold)
            .map(|(&x, &y)| {
                // log(1 + e^z) - y·z, stable for large |z|.
                let z = a * x + b;
                z.max(0.0) + (-z.abs()).exp().ln_1p() - if y { z } else { 0.0 }
            })
            .sum();
        data + PRIOR / 2.0 * ((a - 1.0).powi(2) + b * b)
    };
    let (mut a, mut b) = (1.0f64, 0.0f64);
    let mut current = loss(a, b);
    for _ in 0..100 {
        // Gradient and Hessian of the loss above.
        let (mut ga, mut gb) = (PRIOR * (a - 1.0), PRIOR * b);
        let (mut haa, mut hab, mut hbb) = (PRIOR, 0.0, PRIOR);
        for (&x, &y) in xs.iter().zip(gold) {
            let p = 1.0 / (1.0 + (-(a * x + b)).exp());
            let d = p - y as u8 as f64;
            let w = (p * (1.0 - p)).max(1e-12);
            ga += d * x;
            gb += d;
            haa += w * x * x;
            hab += w * x;
            hbb += w;
        }
        let det = haa * hbb - hab * hab;
        if det.abs() < 1e-18 {
            break;
        }
        let (da, db) = ((hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det);
        // Full Newton steps can overshoot far from the optimum: halve until the loss falls.
        let mut step = 1.0;
        while step > 1e-6 && loss(a - step * da, b - step * db) > current {
            step /= 2.0;
        }
        a -= step * da;
        b -= step * db;
        let next = loss(a, b);
        let converged = current - next < 1e-10 * current.abs().max(1.0);
        current = next;
        if converged {
            break;
        }
    }
    Platt {
        slope: a as f32,
        intercept: b as f32,
    }
}

/// Expected calibration error: scores in `bins` equal-width bins, the mean over bins of
/// |mean score − fraction positive|, weighted by the bin's share of the scores.
pub fn expected_calibration_error(scores: &[f32], gold: &[bool], bins: usize) -> f64 {
    let bins = bins.max(1);
    let mut sum = vec![0f64; bins];
    let mut pos = vec![0usize; bins];
    let mut count = vec![0usize; bins];
    for (&s, &g) in scores.iter().zip(gold) {
        let b = ((s.clamp(0.0, 1.0) * bins as f32) as usize).min(bins - 1);
        sum[b] += s as f64;
        pos[b] += g as usize;
        count[b] += 1;
    }
    let n = scores.len().max(1) as f64;
    (0..bins)
        .filter(|&b| count[b] > 0)
        .map(|b| {
            let c = count[b] as f64;
            (c / n) * (sum[b] / c - pos[b] as f64 / c).abs()
        })
        .sum()
}

/// Precision, recall and F1 per theme for predicted against gold flags (one flag per theme of
/// `themes`, in its order).
pub fn theme_metrics(
    themes: &[Theme],
    gold: &[Vec<bool>],
    predicted: &[Vec<bool>],
) -> Vec<ThemeMetrics> {
    themes
        .iter()
        .enumerate()
        .map(|(k, theme)| {
            let (mut tp, mut fp, mut fn_) = (0usize, 0usize, 0usize);
            for (g, p) in gold.iter().zip(predicted) {
                match (g[k], p[k]) {
                    (true, true) => tp += 1,
                    (false, true) => fp += 1,
                    (true, false) => fn_ += 1,
                    (false, false) => {}
                }
            }
            let (precision, recall, f1) = prf(tp, fp, fn_);
            ThemeMetrics {
                theme: theme.clone(),
                precision,
                recall,
                f1,
                support: tp + fn_,
            }
        })
        .collect()
}

/// Precision, recall, F1 from counts; 0 where undefined, except that a theme absent from both
/// gold and predictions scores 1 (nothing to find, nothing wrongly found).
pub fn prf(tp: usize, fp: usize, fn_: usize) -> (f64, f64, f64) {
    if tp + fp + fn_ == 0 {
        return (1.0, 1.0, 1.0);
    }
    let p = if tp + fp == 0 {
        0.0
    } else {
        tp as f64 / (tp + fp) as f64
    };
    let r = if tp + fn_ == 0 {
        0.0
    } else {
        tp as f64 / (tp + fn_) as f64
    };
    let f = if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    };
    (p, r, f)
}

/// Mean F1 over the themes.
pub fn macro_f1(metrics: &[ThemeMetrics]) -> f64 {
    metrics.iter().map(|m| m.f1).sum::<f64>() / metrics.len().max(1) as f64
}

/// The threshold on `scores` that maximises F1 against `gold` (ties: the one nearest 0.5).
pub fn best_threshold(scores: &[f32], gold: &[bool]) -> f32 {
    best_threshold_within(scores, gold, 0.0)
}

/// The threshold nearest 0.5 among those whose F1 on `scores` against `gold` is within
/// `tolerance` of the best. On calibrated scores 0.5 is where a theme becomes more likely
/// than not; the F1 curve is often flat near its top, and there the exact argmax moves from
/// one training run to the next with the noise of a few texts.
pub fn best_threshold_within(scores: &[f32], gold: &[bool], tolerance: f64) -> f32 {
    let curve: Vec<(f32, f64)> = (1..100)
        .map(|step| {
            let t = step as f32 / 100.0;
            let (mut tp, mut fp, mut fn_) = (0, 0, 0);
            for (&s, &g) in scores.iter().zip(gold) {
                match (g, s >= t) {
                    (true, true) => tp += 1,
                    (false, true) => fp += 1,
                    (true, false) => fn_ += 1,
                    _ => {}
                }
            }
            (t, prf(tp, fp, fn_).2)
        })
        .collect();
    let top = curve.iter().map(|c| c.1).fold(f64::MIN, f64::max);
    curve
        .iter()
        .filter(|c| c.1 >= top - tolerance - 1e-12)
        .min_by(|a, b| (a.0 - 0.5).abs().total_cmp(&(b.0 - 0.5).abs()))
        .map_or(0.5, |c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn theme_data_reads_a_folder_in_name_order_or_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let line = |id: &str| format!("{{\"id\":\"{id}\",\"text\":\"t\",\"labels\":[]}}\n");
        std::fs::write(dir.path().join("b.jsonl"), line("b1")).unwrap();
        std::fs::write(dir.path().join("a.jsonl"), line("a1") + &line("a2")).unwrap();
        std::fs::write(dir.path().join("notes.md"), "not data").unwrap();
        let ids = |v: Vec<ThemeExample>| v.into_iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(
            ids(read_theme_data(dir.path()).unwrap()),
            ["a1", "a2", "b1"]
        );
        assert_eq!(
            ids(read_theme_data(&dir.path().join("b.jsonl")).unwrap()),
            ["b1"]
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            theme_data_files(empty.path()),
            Err(Error::Config { .. })
        ));
    }

    #[test]
    fn metrics_match_hand_counts() {
        let gold = [
            vec![true, false, false, false],
            vec![true, true, false, false],
            vec![false, false, false, false],
        ];
        let pred = [
            vec![true, false, false, false],
            vec![false, true, true, false],
            vec![true, false, false, false],
        ];
        let m = theme_metrics(&Theme::BUILT_IN, &gold, &pred);
        assert_eq!(m[2].theme, Theme::FOREIGN_INTERFERENCE);
        // recruitment: tp 1, fp 1, fn 1.
        assert_eq!((m[0].precision, m[0].recall, m[0].f1), (0.5, 0.5, 0.5));
        // takedown: tp 1.
        assert_eq!(m[1].f1, 1.0);
        // foreign_interference: fp 1 only.
        assert_eq!(m[2].f1, 0.0);
        // financing: absent everywhere.
        assert_eq!(m[3].f1, 1.0);
        assert!((macro_f1(&m) - 0.625).abs() < 1e-12);
    }

    #[test]
    fn platt_fit_corrects_overconfident_scores() {
        // Scores of 0.9 that are right half the time, and 0.1 that are right half the time.
        let scores: Vec<f32> = (0..200).map(|i| if i < 100 { 0.9 } else { 0.1 }).collect();
        let gold: Vec<bool> = (0..200).map(|i| i % 2 == 0).collect();
        let before = expected_calibration_error(&scores, &gold, 10);
        assert!((before - 0.4).abs() < 1e-6, "{before}");
        let platt = fit_platt(&scores, &gold);
        let calibrated: Vec<f32> = scores.iter().map(|&s| platt.apply(s)).collect();
        let after = expected_calibration_error(&calibrated, &gold, 10);
        assert!(after < 0.02, "ECE after calibration {after}");
        // Scores that are already probabilities stay close to the identity.
        let (mut scores, mut gold) = (Vec::new(), Vec::new());
        for k in 0..10 {
            let v = (k as f32 + 0.5) / 10.0;
            for i in 0..100 {
                scores.push(v);
                gold.push((i as f32) < v * 100.0);
            }
        }
        let p = fit_platt(&scores, &gold);
        assert!(
            (p.slope - 1.0).abs() < 0.1 && p.intercept.abs() < 0.1,
            "{p:?}"
        );
    }

    #[test]
    fn threshold_separates_perfectly_separable_scores() {
        let t = best_threshold(&[0.1, 0.2, 0.7, 0.9], &[false, false, true, true]);
        assert!(t > 0.2 && t <= 0.7, "{t}");
    }

    #[test]
    fn a_tolerance_moves_the_threshold_along_a_flat_top_towards_one_half() {
        // Positives at 0.305, 0.325, ... 0.485 and 0.55 ... 0.955; one negative at 0.325. All
        // positives and one false positive (thresholds up to 0.30) is the best F1, 0.976;
        // 0.33 and 0.34 drop the negative and two positives (0.947); 0.35 loses one more.
        let mut scores: Vec<f32> = (0..10).map(|i| 0.305 + i as f32 * 0.02).collect();
        scores.extend((0..10).map(|i| 0.55 + i as f32 * 0.045));
        let mut gold = vec![true; 20];
        scores.push(0.325);
        gold.push(false);
        assert_eq!(best_threshold_within(&scores, &gold, 0.0), 0.30);
        assert_eq!(best_threshold_within(&scores, &gold, 0.03), 0.34);
        // A tolerance as wide as the whole curve gives 0.5 itself.
        assert_eq!(best_threshold_within(&scores, &gold, 1.0), 0.5);
    }

    #[test]
    fn dev_split_is_stable_and_about_a_fifth() {
        let dev = (0..1000).filter(|i| is_dev_story(&format!("s{i}"))).count();
        assert!((150..250).contains(&dev), "{dev}");
        assert_eq!(is_dev_story("nl-s001"), is_dev_story("nl-s001"));
    }
}
