//! What a run is set up with before its first step: the mesh and device, the process groups,
//! the model, the datasets and their loaders, the gradient synchronization and the optimizer.
//! Everything that can be checked alone is checked before waiting for the other ranks.

use kiln_checkpoint::Mesh;
use kiln_proto::job::JobConfig;
use kiln_proto::manifest::DatasetManifest;
use kiln_proto::preflight;
use kiln_shard_loader::dataset::SplitName;
use kiln_shard_loader::mixture::MixtureLoader;
use kiln_shard_loader::{LoaderOptions, TokenDataset};
use serde_json::json;

use super::{Launch, TrainError};
use crate::collective::tcp::rendezvous_timeout;
use crate::collective::{ParallelDims, ProcessGroups};
use crate::config::LlamaConfig;
use crate::device;
use crate::hf;
use crate::model::{DecayPolicy, Llama, Recompute};
use crate::optim::{AdamW, AdamWConfig};
use crate::parallel::DataParallel;

/// A run ready for its first step.
pub(super) struct Setup {
    pub world: usize,
    pub dims: ParallelDims,
    /// Global rank 0: it alone writes the logs, the ledger and the model.
    pub leader: bool,
    /// Micro-batches per optimizer step on each rank.
    pub accum: i64,
    pub config: LlamaConfig,
    pub device: tch::Device,
    pub groups: ProcessGroups,
    pub dp_rank: usize,
    /// Whether the forward pass runs under autocast.
    pub bf16: bool,
    /// The dtype a linear layer computes in, read back from libtorch.
    pub compute: tch::Kind,
    pub datasets: Vec<TokenDataset>,
    /// The first dataset's manifest (every source shares its tokenizer).
    pub manifest: DatasetManifest,
    pub model: Llama,
    pub train_data: MixtureLoader,
    pub val_data: Option<MixtureLoader>,
    pub sync: DataParallel,
    pub optimizer: AdamW,
    pub mesh: Mesh,
    /// Identifies the data stream (every source's fingerprint).
    pub data_id: String,
}

impl Setup {
    pub fn new(job: &JobConfig, launch: &Launch) -> Result<Setup, TrainError> {
        let t = &job.train;
        if t.threads > 0 {
            tch::set_num_threads(t.threads as i32);
        }
        let world = launch.world_size();
        let dims = ParallelDims::new(0, job.parallel.tp, world)?.with_shard(job.parallel.shard)?;
        let (dp, leader) = (dims.dp, launch.rank == 0);
        // Everything that can be checked alone is checked before waiting for the other ranks.
        let accum = job
            .accumulation_steps_at(dp as i64)
            .ok_or(TrainError::Batch {
                batch: t.batch_size,
                dp,
                micro: job.micro_batch_size(),
            })?;
        // The same checks, in the same order, as the coordinator's at submit
        // (`kiln_proto::preflight`).
        let config = match (preflight::model(job)?, &job.model.init_from) {
            (Some(config), _) => config,
            (None, Some(dir)) => {
                let config = hf::load_config(dir)?;
                config.check_tensor_parallel(dims.tp)?;
                config
            }
            (None, None) => unreachable!("preflight::model reads a shape without init_from"),
        };
        let device = device::resolve_device_for_rank(&t.device, launch.local_rank())?;
        let groups = if world == 1 {
            ProcessGroups::single()
        } else {
            ProcessGroups::tcp(launch.rank, &launch.peers, dims, rendezvous_timeout())?
        };
        // On GPUs, NCCL carries the data- and tensor-parallel traffic.
        let groups = match device {
            tch::Device::Cuda(ordinal) if world > 1 => groups.with_nccl(ordinal)?,
            _ => groups,
        };
        let dp_rank = groups.dp_rank();
        let bf16 = device::resolve_bf16(&t.precision, device);
        // What the run reports is what libtorch computes in, read back, not the setting.
        let compute = crate::precision::checked(bf16, device).map_err(TrainError::Precision)?;
        let datasets = open_datasets(job)?;
        let manifest = datasets[0].manifest().clone();

        // Fully sharded: the store holds this rank's shard only, from the start.
        let shard = job.parallel.fsdp.then(|| crate::fsdp::Groups {
            shard: groups.shard.clone(),
            replica: groups.replica.clone(),
            reshard_after_forward: job.parallel.reshard_after_forward,
        });
        let mut model =
            Llama::new_parallel(&config, decay_policy(job), device, groups.tp.clone(), shard)?;
        model.recompute = Recompute::parse(&t.activation_checkpointing)
            .expect("train.activation_checkpointing was validated with the job file");
        match &job.model.init_from {
            Some(dir) => hf::load_weights(&model, dir)?,
            None => model.init(t.seed),
        }
        preflight::fits(job, &config, &manifest)?;
        let (train_data, val_data) = loaders(job, &datasets)?;

        let o = &job.optimizer;
        let sync = DataParallel::new(
            &model,
            groups.clone(),
            job.parallel.bucket_mb,
            job.parallel.zero1,
        );
        let optimizer = AdamW::sharded(
            AdamWConfig {
                beta1: o.beta1,
                beta2: o.beta2,
                eps: o.eps,
                weight_decay: o.weight_decay,
            },
            &model.params,
            sync.optimizer_ranges(model.params.numel()),
        );
        let mesh = Mesh {
            world,
            dp,
            tp: dims.tp,
            zero1: job.parallel.zero1,
            fsdp: job.parallel.fsdp,
            shard: if dims.hybrid() { dims.shard } else { 0 },
        };
        let data_id = datasets
            .iter()
            .map(TokenDataset::fingerprint)
            .collect::<Vec<_>>()
            .join(",");
        Ok(Setup {
            world,
            dims,
            leader,
            accum,
            config,
            device,
            groups,
            dp_rank,
            bf16,
            compute,
            datasets,
            manifest,
            model,
            train_data,
            val_data,
            sync,
            optimizer,
            mesh,
            data_id,
        })
    }

    /// The first dataset, whose tokenizer the model is trained with.
    pub fn dataset(&self) -> &TokenDataset {
        &self.datasets[0]
    }
}

/// Opens every source of the job's data mixture; they must share a tokenizer.
fn open_datasets(job: &JobConfig) -> Result<Vec<TokenDataset>, TrainError> {
    let sources = job.data.sources();
    let datasets = sources
        .iter()
        .map(|s| TokenDataset::open(&s.path))
        .collect::<Result<Vec<_>, _>>()?;
    preflight::tokenizers(job, datasets.iter().map(TokenDataset::manifest))?;
    Ok(datasets)
}

/// The training mixture's loader, and the validation mixture's when evaluation is on and
/// every source has a validation split.
fn loaders(
    job: &JobConfig,
    datasets: &[TokenDataset],
) -> Result<(MixtureLoader, Option<MixtureLoader>), TrainError> {
    let t = &job.train;
    let options = LoaderOptions {
        seq_len: t.seq_len as u64,
        seed: t.seed,
        shuffle: true,
        shuffle_window: job.data.shuffle_window,
        memory_cap_bytes: job.data.memory_cap_mb << 20,
        concurrency: 8,
        prefetch_samples: 2 * t.batch_size as u64,
    };
    let weights: Vec<f64> = job.data.sources().iter().map(|s| s.weight).collect();
    // Each source streams its own order: give each its own seed.
    let split = |split: SplitName, options: &LoaderOptions| {
        datasets
            .iter()
            .enumerate()
            .map(|(d, ds)| {
                let seed = if d == 0 {
                    options.seed
                } else {
                    options.seed ^ ((d as u64) << 32)
                };
                ds.loader(
                    split,
                    LoaderOptions {
                        seed,
                        ..options.clone()
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let train_data = MixtureLoader::new(split(SplitName::Train, &options)?, &weights, t.seed);
    let has_validation = datasets.iter().all(|d| d.manifest().validation.tokens > 0);
    let val_data = if t.eval_every > 0 && has_validation {
        let options = LoaderOptions {
            shuffle: false,
            prefetch_samples: (t.eval_batches * job.micro_batch_size()) as u64,
            ..options
        };
        Some(MixtureLoader::new(
            split(SplitName::Validation, &options)?,
            &weights,
            t.seed,
        ))
    } else {
        None
    };
    Ok((train_data, val_data))
}

pub(super) fn decay_policy(job: &JobConfig) -> DecayPolicy {
    DecayPolicy {
        embeddings: job.optimizer.decay_embeddings,
        norms: job.optimizer.decay_norms,
    }
}

/// Kiln's sidecar for the weights (`kiln.json`): the tokenizer the model was trained with.
pub(super) fn manifest_meta(dataset: &TokenDataset) -> serde_json::Value {
    let m = dataset.manifest();
    json!({
        "tokenizer": m.tokenizer.kind,
        "tokenizer_sha256": m.tokenizer.sha256,
        "eos_id": m.eos_id,
        "dataset": dataset.url(),
    })
}
