//! `--combine DIR DIR ...`: heads trained alike (the same flags, other `--seed`s) joined into
//! one ensemble head, whose tag scores are the mean of theirs ([`NerCard::members`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use themescan::heads::ner::{NerCard, NER_HEAD_CARD, NER_HEAD_WEIGHTS};

/// The member a tensor belongs to and its name within the member: `m3.hidden.weight` is
/// member 3's `hidden.weight`; a name without such a prefix is member 0's.
fn member_of(name: &str) -> (usize, &str) {
    if let Some(rest) = name.strip_prefix('m') {
        if let Some((digits, tail)) = rest.split_once('.') {
            if let Ok(k) = digits.parse::<usize>() {
                return (k, tail);
            }
        }
    }
    (0, name)
}

/// What must agree for two heads' scores to be averaged: everything but the weights, seed,
/// bias and dev figures.
fn shape_of(card: &NerCard) -> String {
    format!(
        "{:?} {:?} {} {:?} {:?} {:?} {} {} {} {} {} {} {:?}",
        card.tags,
        card.net_config(),
        card.layers,
        card.layers_end,
        card.token_source,
        card.word_pooling,
        card.context,
        card.pack_words,
        card.viterbi,
        card.word_shape,
        card.crf,
        card.encoder,
        card.encoder_layers_sha256,
    )
}

/// Writes the ensemble of the heads in `folders` to `out` (its entity bias 0 and its dev
/// figures empty until `--rescore` runs on it).
pub fn combine(folders: &[PathBuf], out: &Path) -> Result<()> {
    anyhow::ensure!(
        folders.len() >= 2,
        "--combine needs two or more head folders, got {}",
        folders.len()
    );
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut joined: Option<NerCard> = None;
    let mut seeds = Vec::new();
    let mut next = 0usize;
    for folder in folders {
        let path = folder.join(NER_HEAD_CARD);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let card: NerCard =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if let Some(first) = &joined {
            anyhow::ensure!(
                shape_of(first) == shape_of(&card),
                "{} was not trained like {}: its card differs in more than seed, bias and \
                 dev figures",
                folder.display(),
                folders[0].display()
            );
        }
        let weights = folder.join(NER_HEAD_WEIGHTS);
        let loaded = candle_core::safetensors::load(&weights, &Device::Cpu)
            .with_context(|| format!("reading {}", weights.display()))?;
        for (name, tensor) in loaded {
            let (member, tail) = member_of(&name);
            anyhow::ensure!(
                member < card.members,
                "{}: tensor {name} belongs to member {member}, the card has {}",
                weights.display(),
                card.members
            );
            let k = next + member;
            let renamed = if k == 0 {
                tail.to_string()
            } else {
                format!("m{k}.{tail}")
            };
            tensors.insert(renamed, tensor);
        }
        next += card.members;
        seeds.push(card.seed);
        joined.get_or_insert(card);
    }
    let mut card = joined.expect("two or more folders");
    card.members = next;
    card.entity_bias = 0.0;
    card.dev.clear();
    card.dev_lowercased.clear();
    card.training_data.push(format!(
        "ensemble of {next} networks, trained with seeds {seeds:?}; scores averaged"
    ));
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    candle_core::safetensors::save(&tensors, out.join(NER_HEAD_WEIGHTS))?;
    std::fs::write(
        out.join(NER_HEAD_CARD),
        serde_json::to_string_pretty(&card)? + "\n",
    )?;
    eprintln!(
        "wrote {}/{{{NER_HEAD_WEIGHTS},{NER_HEAD_CARD}}}: {next} networks; run --rescore on it \
         for its entity bias and dev figures",
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::member_of;

    #[test]
    fn tensor_names_name_their_member() {
        assert_eq!(member_of("hidden.weight"), (0, "hidden.weight"));
        assert_eq!(member_of("mixers.0.weight"), (0, "mixers.0.weight"));
        assert_eq!(member_of("m2.crf.start"), (2, "crf.start"));
        assert_eq!(member_of("m.x"), (0, "m.x"));
    }
}
