//! Why a job cannot run, found from its file and its datasets' manifests alone: the checks
//! `kiln train` makes before its first step. The coordinator makes the same checks when a
//! job is submitted, so that a job that cannot run is refused, with the message `kiln train`
//! would give, before any worker starts.
//!
//! In the order both make them: the model's shape ([`model`]), then each data source's
//! manifest (read by the caller: a missing or unreadable dataset is its error), then the
//! sources against each other ([`tokenizers`]) and the model against the data ([`fits`]).

use crate::job::JobConfig;
use crate::manifest::{check_vocab, DatasetManifest, VocabTooSmall};
use crate::model::{ConfigError, LlamaConfig};

#[derive(Debug, thiserror::Error)]
pub enum Unrunnable {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    VocabTooSmall(#[from] VocabTooSmall),
    #[error(
        "the mixture's datasets {first} and {other} use different tokenizers (vocabulary size or end-of-document id differ)"
    )]
    MixedTokenizers { first: String, other: String },
    #[error("train.seq_len {seq_len} exceeds the model's max_seq_len {max}")]
    SeqTooLong { seq_len: i64, max: i64 },
}

/// The model's shape from the job's model section, checked alone and against the job's
/// tensor-parallel degree. `None` for a job that starts from a Hugging Face model
/// (`model.init_from`): its shape is in that model's `config.json`, read where the weights
/// are.
pub fn model(job: &JobConfig) -> Result<Option<LlamaConfig>, Unrunnable> {
    if job.model.init_from.is_some() {
        return Ok(None);
    }
    let config = LlamaConfig::from_spec(&job.model)?;
    config.check_tensor_parallel(job.parallel.tp)?;
    Ok(Some(config))
}

/// Every source of the data mixture uses the first one's tokenizer (`manifests` in the
/// order of [`crate::job::DataSpec::sources`]).
pub fn tokenizers<'a>(
    job: &JobConfig,
    manifests: impl IntoIterator<Item = &'a DatasetManifest>,
) -> Result<(), Unrunnable> {
    let sources = job.data.sources();
    let mut manifests = manifests.into_iter();
    let Some(first) = manifests.next() else {
        return Ok(());
    };
    for (source, m) in sources.iter().skip(1).zip(manifests) {
        if (m.vocab_size, m.eos_id) != (first.vocab_size, first.eos_id) {
            return Err(Unrunnable::MixedTokenizers {
                first: sources[0].path.clone(),
                other: source.path.clone(),
            });
        }
    }
    Ok(())
}

/// The model can embed every token id of the data (`manifest`: the first source's) and is
/// built for sequences as long as the job's.
pub fn fits(
    job: &JobConfig,
    config: &LlamaConfig,
    manifest: &DatasetManifest,
) -> Result<(), Unrunnable> {
    check_vocab(&job.data.sources()[0].path, manifest, config.vocab_size)?;
    if job.train.seq_len > config.max_seq_len {
        return Err(Unrunnable::SeqTooLong {
            seq_len: job.train.seq_len,
            max: config.max_seq_len,
        });
    }
    Ok(())
}
