//! A folder of per-text results: one file of little-endian f32 per text, named by the sha256
//! of the text, so a data file that grows is only encoded for its new texts and a run stopped
//! at any moment keeps what it finished.

use std::path::PathBuf;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// One cache folder; what its files hold is the caller's format.
pub struct TextCache {
    folder: PathBuf,
}

impl TextCache {
    /// Opens `folder`, creating it if needed.
    pub fn open(folder: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&folder)
            .with_context(|| format!("creating {}", folder.display()))?;
        Ok(TextCache { folder })
    }

    fn file_of(&self, text: &str) -> PathBuf {
        self.folder
            .join(format!("{:x}.f32", Sha256::digest(text.as_bytes())))
    }

    /// The texts that have no file yet, in their order.
    pub fn missing<'a>(&self, texts: &[&'a str]) -> Vec<&'a str> {
        texts
            .iter()
            .copied()
            .filter(|t| !self.file_of(t).is_file())
            .collect()
    }

    /// Writes `text`'s values whole under a temporary name, then renames it, so a killed run
    /// leaves no torn file.
    pub fn write(&self, text: &str, values: &[f32]) -> Result<()> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let path = self.file_of(text);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// `text`'s values, with the file they came from for the caller's format errors.
    pub fn read(&self, text: &str) -> Result<(Vec<f32>, PathBuf)> {
        let path = self.file_of(text);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        anyhow::ensure!(
            bytes.len() % 4 == 0,
            "{} is not a whole number of f32 values: delete it",
            path.display()
        );
        let values = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok((values, path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_reads_and_knows_what_is_missing() {
        let folder = std::env::temp_dir().join(format!("text-cache-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&folder);
        let cache = TextCache::open(folder.clone()).unwrap();
        assert_eq!(cache.missing(&["a", "b"]), ["a", "b"]);
        cache.write("b", &[1.5, -2.0]).unwrap();
        assert_eq!(cache.missing(&["a", "b"]), ["a"]);
        let (values, path) = cache.read("b").unwrap();
        assert_eq!(values, [1.5, -2.0]);
        assert_eq!(std::fs::read(&path).unwrap().len(), 8);
        std::fs::write(&path, [0u8; 5]).unwrap();
        let err = cache.read("b").unwrap_err().to_string();
        assert!(err.contains("not a whole number"), "{err}");
        assert!(cache.read("a").is_err());
        std::fs::remove_dir_all(&folder).unwrap();
    }
}
