//! Sentence spans, for evidence: simple punctuation and line rules that work across scripts.

use super::Span;

/// Splits `text` into sentence spans (byte offsets into `text`, whitespace trimmed, empty ones
/// dropped). A sentence ends after `.`, `!`, `?`, `…`, `؟`, `。`, `؛` followed by whitespace, or
/// at a line break. Good enough to point an analyst at the right place; not a linguistic
/// segmenter (abbreviations such as "dr." split a sentence).
pub fn sentence_spans(text: &str) -> Vec<Span> {
    let mut spans = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let end_here = match c {
            '\n' | '\r' | '\u{2029}' => Some(i),
            '.' | '!' | '?' | '…' | '؟' | '。' | '؛' | '\u{ff01}' | '\u{ff1f}' => {
                match chars.peek() {
                    Some(&(_, next)) if next.is_whitespace() => Some(i + c.len_utf8()),
                    None => Some(i + c.len_utf8()),
                    _ => None,
                }
            }
            _ => None,
        };
        if let Some(end) = end_here {
            push_trimmed(text, start, end, &mut spans);
            start = end;
        }
    }
    push_trimmed(text, start, text.len(), &mut spans);
    spans
}

fn push_trimmed(text: &str, start: usize, end: usize, spans: &mut Vec<Span>) {
    let piece = &text[start..end];
    let lead = piece.len() - piece.trim_start().len();
    let trail = piece.len() - piece.trim_end().len();
    if lead + trail < piece.len() {
        spans.push(Span {
            start: start + lead,
            end: end - trail,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_punctuation_and_lines_in_several_scripts() {
        let text = "Eerste zin. Tweede zin!\nDerde regel zonder punt\n\n  هل هذا سؤال؟ نعم.  ";
        let got: Vec<&str> = sentence_spans(text)
            .into_iter()
            .map(|s| &text[s.range()])
            .collect();
        assert_eq!(
            got,
            [
                "Eerste zin.",
                "Tweede zin!",
                "Derde regel zonder punt",
                "هل هذا سؤال؟",
                "نعم."
            ]
        );
    }

    #[test]
    fn decimals_and_empty_text() {
        assert_eq!(sentence_spans("").len(), 0);
        assert_eq!(sentence_spans("   \n ").len(), 0);
        let text = "Het kostte 3.5 miljoen euro.";
        assert_eq!(
            sentence_spans(text),
            vec![Span {
                start: 0,
                end: text.len()
            }]
        );
    }
}
