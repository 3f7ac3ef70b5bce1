//! Tokenizers available to `kiln prepare` and `kiln sample`, all offline.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

mod gpt2;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "unknown tokenizer {0:?}: expected gpt2, cl100k_base, o200k_base or the path of a tokenizer.json"
    )]
    Unknown(String),
    #[error("cannot load tokenizer {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error(
        "tokenizer {path} has no end-of-document token among {candidates:?}; name one with --eos-token"
    )]
    NoEos {
        path: PathBuf,
        candidates: Vec<&'static str>,
    },
    #[error("tokenizer {path} has no token {token:?}")]
    UnknownEos { path: PathBuf, token: String },
    #[error("cannot tokenize: {0}")]
    Encode(String),
    #[error("cannot decode tokens: {0}")]
    Decode(String),
}

enum Inner {
    /// A built-in vocabulary. GPT-2's also has an encoder that gives tiktoken's ids with
    /// its regex run as a DFA (tokenizer/gpt2.rs), about three times as fast.
    Tiktoken {
        bpe: tiktoken_rs::CoreBPE,
        gpt2: Option<Box<gpt2::Gpt2Encoder>>,
    },
    HuggingFace(Box<tokenizers::Tokenizer>),
}

/// A loaded tokenizer with its vocabulary size and end-of-document id.
pub struct Tokenizer {
    inner: Inner,
    kind: String,
    vocab_size: u32,
    eos_id: u32,
    sha256: Option<String>,
}

const EOS_CANDIDATES: [&str; 5] = [
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|im_end|>",
];

impl Tokenizer {
    /// `gpt2` (alias `r50k_base`), `cl100k_base`, `o200k_base`, or a path to a Hugging Face
    /// `tokenizer.json`. `eos` overrides the end-of-document token of a `tokenizer.json`.
    pub fn load(name: &str, eos: Option<&str>) -> Result<Self, TokenizerError> {
        let tiktoken = |kind: &str, vocab_size, eos_id| -> Result<Self, TokenizerError> {
            let bpe = match kind {
                "gpt2" => tiktoken_rs::r50k_base(),
                "cl100k_base" => tiktoken_rs::cl100k_base(),
                _ => tiktoken_rs::o200k_base(),
            }
            .map_err(|e| TokenizerError::Load {
                path: PathBuf::from(kind),
                message: e.to_string(),
            })?;
            let gpt2 = match kind {
                // Its mergeable ranks are the ids below the end-of-text token.
                "gpt2" => Some(Box::new(gpt2::Gpt2Encoder::new(&bpe, eos_id).map_err(
                    |message| TokenizerError::Load {
                        path: PathBuf::from(kind),
                        message,
                    },
                )?)),
                _ => None,
            };
            Ok(Tokenizer {
                inner: Inner::Tiktoken { bpe, gpt2 },
                kind: kind.to_owned(),
                vocab_size,
                eos_id,
                sha256: None,
            })
        };
        match name {
            "gpt2" | "r50k_base" => tiktoken("gpt2", 50257, 50256),
            "cl100k_base" | "cl100k" => tiktoken("cl100k_base", 100277, 100257),
            "o200k_base" | "o200k" => tiktoken("o200k_base", 200019, 199999),
            path if Path::new(path).is_file() => Self::load_hf(Path::new(path), eos),
            other => Err(TokenizerError::Unknown(other.to_owned())),
        }
    }

    fn load_hf(path: &Path, eos: Option<&str>) -> Result<Self, TokenizerError> {
        let bytes = std::fs::read(path).map_err(|e| TokenizerError::Load {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let tok = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Load {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let vocab = tok.get_vocab(true);
        let vocab_size = vocab.values().copied().max().map_or(0, |m| m + 1);
        let eos_id = match eos {
            Some(t) => tok
                .token_to_id(t)
                .ok_or_else(|| TokenizerError::UnknownEos {
                    path: path.to_owned(),
                    token: t.to_owned(),
                })?,
            None => EOS_CANDIDATES
                .iter()
                .find_map(|t| tok.token_to_id(t))
                .ok_or_else(|| TokenizerError::NoEos {
                    path: path.to_owned(),
                    candidates: EOS_CANDIDATES.to_vec(),
                })?,
        };
        Ok(Tokenizer {
            inner: Inner::HuggingFace(Box::new(tok)),
            kind: "huggingface".into(),
            vocab_size,
            eos_id,
            sha256: Some(hex(&Sha256::digest(&bytes))),
        })
    }

    /// Token ids of `text`, without special tokens (text that looks like one is plain text).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match &self.inner {
            Inner::Tiktoken {
                bpe,
                gpt2: Some(gpt2),
            } => Ok(gpt2.encode(bpe, text)),
            Inner::Tiktoken { bpe, gpt2: None } => Ok(bpe.encode_ordinary(text)),
            Inner::HuggingFace(tok) => tok
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Encode(e.to_string())),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match &self.inner {
            Inner::Tiktoken { bpe, .. } => bpe
                .decode(ids)
                .map_err(|e| TokenizerError::Decode(e.to_string())),
            Inner::HuggingFace(tok) => tok
                .decode(ids, false)
                .map_err(|e| TokenizerError::Decode(e.to_string())),
        }
    }

    /// The bytes of token `id` of a built-in vocabulary (its entry in the tiktoken rank
    /// file); `None` for a `tokenizer.json`, a special token's id or an id outside the
    /// vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        match &self.inner {
            Inner::Tiktoken { bpe, .. } => {
                let bytes = bpe.decode_bytes(&[id]).ok()?;
                let special =
                    std::str::from_utf8(&bytes).is_ok_and(|s| bpe.special_tokens().contains(s));
                (!special).then_some(bytes)
            }
            Inner::HuggingFace(_) => None,
        }
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    pub fn sha256(&self) -> Option<&str> {
        self.sha256.as_deref()
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_ids_match_openai() {
        let t = Tokenizer::load("gpt2", None).unwrap();
        assert_eq!(
            t.encode("Hello world! The").unwrap(),
            vec![15496, 995, 0, 383]
        );
        assert_eq!(t.decode(&[15496, 995, 0, 383]).unwrap(), "Hello world! The");
        assert_eq!((t.vocab_size(), t.eos_id()), (50257, 50256));
        // Special-token text is encoded as plain text, never as the EOS id.
        assert!(!t.encode("<|endoftext|>").unwrap().contains(&50256));
    }

    #[test]
    fn token_bytes_are_the_rank_file_entries() {
        let t = Tokenizer::load("gpt2", None).unwrap();
        assert_eq!(t.token_bytes(15496).as_deref(), Some(&b"Hello"[..]));
        assert_eq!(t.token_bytes(0).as_deref(), Some(&b"!"[..]));
        // Byte-level: a token may be part of a UTF-8 character.
        assert_eq!(t.token_bytes(188).as_deref(), Some(&[0u8][..]));
        assert_eq!(t.token_bytes(50256), None);
        assert_eq!(t.token_bytes(50257), None);
    }

    #[test]
    fn unknown_name_is_refused() {
        let err = Tokenizer::load("bert", None).err().unwrap().to_string();
        assert!(err.starts_with("unknown tokenizer \"bert\""), "{err}");
    }
}
