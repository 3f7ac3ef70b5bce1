//! GPT-2's encoder (tiktoken's `r50k_base`) with its pre-tokenizing regex run as a DFA.
//!
//! tiktoken cuts text into pieces with `'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++|
//! ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s` and byte-pair encodes each piece. The look-ahead
//! `(?!\S)` needs a backtracking engine (fancy-regex), and that search is nearly half of
//! tiktoken's time. Without it the pattern is regular: [`PATTERN`] compiles to a dense DFA
//! that finds each piece in one anchored forward pass, and the look-ahead's effect is
//! restored by hand in [`Gpt2Encoder::piece_end`]. The pieces are then merged with
//! tiktoken's own byte-pair merge over the same ranks, so the ids are tiktoken's; the tests
//! compare the two.

use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::{Anchored, Input};
use rustc_hash::FxHashMap;
use tiktoken_rs::CoreBPE;

/// tiktoken's r50k pattern with `\s++$|\s+(?!\S)|\s` as `\s+` (the other possessive
/// quantifiers end their alternative, so greedy ones match the same).
const PATTERN: &str = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";

/// Pieces at least this long that are not tokens go to tiktoken-rs whole: its merge for
/// them is O(n log n), `byte_pair_split`'s O(n²).
const LONG_PIECE: usize = 100;

pub(super) struct Gpt2Encoder {
    dfa: dense::DFA<Vec<u32>>,
    ranks: FxHashMap<Vec<u8>, u32>,
}

impl Gpt2Encoder {
    /// Reads the mergeable ranks `0..ranks` back out of `bpe`.
    pub(super) fn new(bpe: &CoreBPE, ranks: u32) -> Result<Self, String> {
        let dfa = dense::Builder::new()
            .configure(dense::Config::new().start_kind(StartKind::Anchored))
            .build(PATTERN)
            .map_err(|e| e.to_string())?;
        let ranks = (0..ranks)
            .map(|id| bpe.decode_bytes(&[id]).map(|bytes| (bytes, id)))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        Ok(Self { dfa, ranks })
    }

    /// The ids `bpe.encode_ordinary(text)` gives, for the `bpe` this was built from.
    pub(super) fn encode(&self, bpe: &CoreBPE, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        let mut start = 0;
        while start < text.len() {
            let Some(end) = self.piece_end(text, start) else {
                // Not reached (every character matches the pattern and the DFA has no quit
                // bytes); the rest starts at a piece boundary, so tiktoken-rs can finish it.
                ids.extend(bpe.encode_ordinary(&text[start..]));
                break;
            };
            let piece = &text.as_bytes()[start..end];
            match self.ranks.get(piece) {
                Some(&id) => ids.push(id),
                None if piece.len() >= LONG_PIECE => {
                    ids.extend(bpe.encode_ordinary(&text[start..end]));
                }
                // Every part is a token: single bytes are, and merges only make tokens.
                None => ids.extend(
                    tiktoken_rs::byte_pair_split(piece, &self.ranks)
                        .into_iter()
                        .map(|part| self.ranks[part]),
                ),
            }
            start = end;
        }
        ids
    }

    /// The end of the piece that starts at `start`, where tiktoken's regex ends it.
    fn piece_end(&self, text: &str, start: usize) -> Option<usize> {
        let input = Input::new(text).range(start..).anchored(Anchored::Yes);
        let end = self.dfa.try_search_fwd(&input).ok()??.offset();
        if end <= start {
            // Not reached: every alternative consumes a character. The caller must advance.
            return None;
        }
        // Only `\s+` matches end in whitespace. Before a non-space (`\s+` is greedy, so
        // anything but the end of the text), a run of two or more gives its last character
        // to the next piece, as `\s+(?!\S)` backtracks by one: "  word" is " ", " word". A
        // single one stays (`\s`), and so does a run at the end (`\s++$`).
        match text[start..end].chars().next_back() {
            Some(last)
                if end < text.len() && last.is_whitespace() && end - start > last.len_utf8() =>
            {
                Some(end - last.len_utf8())
            }
            _ => Some(end),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both() -> (CoreBPE, Gpt2Encoder) {
        let bpe = tiktoken_rs::r50k_base().unwrap();
        let fast = Gpt2Encoder::new(&bpe, 50256).unwrap();
        (bpe, fast)
    }

    #[test]
    fn whitespace_runs_contractions_and_unicode_get_tiktokens_ids() {
        let (bpe, fast) = both();
        for text in [
            "",
            "Hello world! The",
            "  two spaces before, three   after\n\n\n  indented\tand\t\ttabs",
            "trailing spaces   ",
            "trailing newlines\n\n",
            " ",
            "\n",
            " \n x",
            "\u{3000}\u{3000}ideographic\u{a0}\u{a0}no-break\u{2028}line",
            "it's they'll I'VE don't we'd you're 'tis ''quoted'' '",
            "123456 1,000.5 -7 ٣٤٥ ½ Ⅻ",
            "é ñ Ünïcödé 日本語のテキスト 😀😀 e\u{301} क्षि",
            "a\r\nb\r\n\r\n",
            "<|endoftext|> is text here",
            "!!!??? ... --- *** ''' ",
        ] {
            assert_eq!(
                fast.encode(&bpe, text),
                bpe.encode_ordinary(text),
                "{text:?}"
            );
        }
    }

    #[test]
    fn long_pieces_get_tiktokens_ids() {
        let (bpe, fast) = both();
        for text in [
            "a".repeat(1000),
            format!("{}x", " ".repeat(300)),
            "!?".repeat(400),
            "9".repeat(250),
            "日本".repeat(100),
        ] {
            assert_eq!(fast.encode(&bpe, &text), bpe.encode_ordinary(&text));
        }
    }

    #[test]
    fn random_text_gets_tiktokens_ids() {
        let (bpe, fast) = both();
        let alphabet: Vec<char> = "aZé日 \n\t\r\u{a0}\u{3000}'sdmtlvre0٣½!.,-😀\u{301}\u{85}\u{1680}\u{200b}\u{feff}\u{2019}ʰ\u{b}\u{c}\u{1c}"
            .chars()
            .collect();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5000 {
            let len = (next() % 24) as usize;
            let text: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            assert_eq!(
                fast.encode(&bpe, &text),
                bpe.encode_ordinary(&text),
                "{text:?}"
            );
        }
    }
}
