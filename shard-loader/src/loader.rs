//! The streaming loader: global samples from Parquet token shards on any object store.
//!
//! A block (one row group) is fetched by byte range with bounded concurrency, decoded on
//! a blocking thread (never on the IO runtime's workers) and kept in a cache bounded by
//! `memory_cap_bytes`. While the trainer works on one batch, the blocks of the next
//! `prefetch_samples` samples are fetched in the background, so a step waits for data only
//! when the store is slower than training. The order of samples is [`GlobalOrder`]'s.
//!
//! Store requests are retried with backoff by the store client (see [`crate::store`]); a
//! failure that outlasts the retries stops the run with an error naming the shard and the
//! byte range.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use kiln_proto::manifest::{DatasetManifest, ShardInfo};
use object_store::path::Path;
use object_store::ObjectStore;
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, Semaphore};

use crate::dataset::{Batch, SplitName};
use crate::order::{sample_hash, GlobalOrder};
use crate::shard::{decode_reader, row_group_range, ShardError};
use crate::tokenizer::hex;
use kiln_store::StoreLocation;

/// How a loader reads.
#[derive(Debug, Clone)]
pub struct LoaderOptions {
    pub seq_len: u64,
    pub seed: u64,
    /// Shuffle blocks per epoch and samples within windows; validation reads in order.
    pub shuffle: bool,
    /// Sequences per local-shuffle window.
    pub shuffle_window: u64,
    /// Decoded tokens kept in memory, fetched or prefetched, in bytes.
    pub memory_cap_bytes: u64,
    /// Row groups fetched at once.
    pub concurrency: usize,
    /// Samples beyond the current batch whose blocks are fetched in the background.
    pub prefetch_samples: u64,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions {
            seq_len: 1024,
            seed: 0,
            shuffle: true,
            shuffle_window: 4096,
            memory_cap_bytes: 512 << 20,
            concurrency: 8,
            prefetch_samples: 256,
        }
    }
}

type BlockResult = Result<Arc<Vec<u32>>, Arc<ShardError>>;
type BlockFuture = Shared<BoxFuture<'static, BlockResult>>;

struct ShardMeta {
    info: ShardInfo,
    path: Path,
    display: String,
    metadata: OnceCell<Arc<ParquetMetaData>>,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    shards: Vec<ShardMeta>,
    column: String,
    vocab_size: u32,
    permits: Semaphore,
}

/// One block: a row group of a shard.
#[derive(Debug, Clone, Copy)]
struct BlockRef {
    shard: usize,
    row_group: usize,
    tokens: u64,
}

pub struct StreamingLoader {
    runtime: Arc<tokio::runtime::Runtime>,
    shared: Arc<Inner>,
    blocks: Vec<BlockRef>,
    order: GlobalOrder,
    options: LoaderOptions,
    cache: HashMap<u32, BlockFuture>,
    /// Blocks in the order they entered the cache, for eviction.
    fifo: VecDeque<u32>,
    /// Decoded bytes of the cached (or in-flight) blocks.
    cached_bytes: u64,
    wait: Duration,
}

/// Reads byte ranges of one shard through the store, naming the shard and range on failure.
struct StoreReader {
    store: Arc<dyn ObjectStore>,
    path: Path,
    display: String,
    size: u64,
}

/// A store request that failed after the store client's retries.
#[derive(Debug, thiserror::Error)]
#[error("cannot read bytes {}..{} of shard {shard}: {source}", range.start, range.end)]
struct FetchError {
    shard: String,
    range: Range<u64>,
    source: object_store::Error,
}

impl AsyncFileReader for StoreReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        let store = self.store.clone();
        let path = self.path.clone();
        let shard = self.display.clone();
        async move {
            store
                .get_range(&path, range.clone())
                .await
                .map_err(|source| {
                    ParquetError::External(Box::new(FetchError {
                        shard,
                        range,
                        source,
                    }))
                })
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        let size = self.size;
        async move {
            let m = ParquetMetaDataReader::new()
                .with_prefetch_hint(Some(64 << 10))
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(m))
        }
        .boxed()
    }
}

/// A Parquet error, with a store failure turned into the error that names shard and range.
fn parquet_error(shard: &str, e: ParquetError) -> ShardError {
    if let ParquetError::External(inner) = &e {
        if let Some(f) = inner.downcast_ref::<FetchError>() {
            return ShardError::Fetch {
                shard: f.shard.clone(),
                range: f.range.clone(),
                message: f.source.to_string(),
            };
        }
    }
    ShardError::Parquet {
        path: shard.into(),
        message: e.to_string(),
    }
}

impl Inner {
    fn reader(&self, shard: usize) -> StoreReader {
        let s = &self.shards[shard];
        StoreReader {
            store: self.store.clone(),
            path: s.path.clone(),
            display: s.display.clone(),
            size: s.info.bytes,
        }
    }

    async fn metadata(&self, shard: usize) -> Result<Arc<ParquetMetaData>, ShardError> {
        let s = &self.shards[shard];
        s.metadata
            .get_or_try_init(|| async {
                let mut reader = self.reader(shard);
                reader
                    .get_metadata(None)
                    .await
                    .map_err(|e| parquet_error(&s.display, e))
            })
            .await
            .cloned()
    }

    /// Fetches one row group's byte range in one request, checks it against the manifest's
    /// checksum, and decodes it; runs on a blocking thread.
    async fn fetch(self: Arc<Self>, block: BlockRef) -> Result<Vec<u32>, ShardError> {
        let _permit = self.permits.acquire().await;
        let s = &self.shards[block.shard];
        let metadata = self.metadata(block.shard).await?;
        let rg = block.row_group;
        if rg >= metadata.num_row_groups() {
            return Err(ShardError::Parquet {
                path: s.display.clone().into(),
                message: format!(
                    "the manifest lists row group {rg} but the file has {}",
                    metadata.num_row_groups()
                ),
            });
        }
        let range = row_group_range(&metadata, rg);
        let bytes = self
            .store
            .get_range(&s.path, range.clone())
            .await
            .map_err(|e| ShardError::Fetch {
                shard: s.display.clone(),
                range: range.clone(),
                message: e.to_string(),
            })?;
        let sha256 = hex(&Sha256::digest(&bytes));
        if s.info.row_group_sha256.get(rg) != Some(&sha256) {
            return Err(ShardError::Checksum {
                path: format!(
                    "{} (row group {rg}, bytes {}..{})",
                    s.display, range.start, range.end
                )
                .into(),
                expected: s.info.row_group_sha256.get(rg).cloned().unwrap_or_default(),
                actual: sha256,
            });
        }
        let chunk = RangeChunk {
            start: range.start,
            bytes,
            file_len: s.info.bytes,
        };
        let perr = |e: ParquetError| ShardError::Parquet {
            path: format!("{} (row group {rg})", s.display).into(),
            message: e.to_string(),
        };
        let arrow_meta =
            ArrowReaderMetadata::try_new(metadata, ArrowReaderOptions::new()).map_err(perr)?;
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(chunk, arrow_meta)
            .with_row_groups(vec![rg])
            .with_batch_size(8192)
            .build()
            .map_err(perr)?;
        let error_path = format!("{} (row group {rg})", s.display);
        let out = decode_reader(
            reader,
            &s.display,
            &error_path,
            &self.column,
            self.vocab_size,
        )?;
        if out.tokens.len() as u64 != block.tokens {
            return Err(ShardError::CountMismatch {
                path: error_path.into(),
                field: "tokens",
                expected: block.tokens,
                actual: out.tokens.len() as u64,
            });
        }
        Ok(out.tokens)
    }
}

/// One row group's bytes, served to the synchronous Parquet reader as if they were the file.
struct RangeChunk {
    start: u64,
    bytes: Bytes,
    file_len: u64,
}

impl parquet::file::reader::Length for RangeChunk {
    fn len(&self) -> u64 {
        self.file_len
    }
}

impl parquet::file::reader::ChunkReader for RangeChunk {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        use bytes::Buf;
        Ok(self
            .get_bytes(
                start,
                (self.start + self.bytes.len() as u64 - start) as usize,
            )?
            .reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let end = self.start + self.bytes.len() as u64;
        if start < self.start || start + length as u64 > end {
            return Err(ParquetError::General(format!(
                "bytes {start}..{} lie outside the fetched row group {}..{end}",
                start + length as u64,
                self.start
            )));
        }
        let offset = (start - self.start) as usize;
        Ok(self.bytes.slice(offset..offset + length))
    }
}

impl StreamingLoader {
    /// A loader over one split of the dataset at `location`, whose manifest is `manifest`.
    /// Checks that every shard exists with the recorded size before returning.
    pub fn open(
        runtime: Arc<tokio::runtime::Runtime>,
        location: &StoreLocation,
        manifest: &DatasetManifest,
        split: SplitName,
        options: LoaderOptions,
    ) -> Result<Option<Self>, ShardError> {
        let infos = match split {
            SplitName::Train => &manifest.train.shards,
            SplitName::Validation => &manifest.validation.shards,
        };
        let shards: Vec<ShardMeta> = infos
            .iter()
            .map(|info| ShardMeta {
                info: info.clone(),
                path: location.child(&info.path),
                display: location.display(&info.path),
                metadata: OnceCell::new(),
            })
            .collect();
        // Every shard must be there, whole, before the run starts.
        let store = location.store.clone();
        let heads = runtime.block_on(futures::future::join_all(
            shards.iter().map(|s| store.head(&s.path)),
        ));
        for (s, head) in shards.iter().zip(heads) {
            match head {
                Ok(meta) if meta.size == s.info.bytes => {}
                Ok(meta) => {
                    return Err(ShardError::Size {
                        path: s.display.clone(),
                        expected: s.info.bytes,
                        actual: meta.size,
                    })
                }
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(ShardError::Missing {
                        path: s.display.clone().into(),
                    })
                }
                Err(e) => {
                    return Err(ShardError::Store {
                        path: s.display.clone(),
                        message: e.to_string(),
                    })
                }
            }
        }
        let blocks: Vec<BlockRef> = shards
            .iter()
            .enumerate()
            .flat_map(|(shard, s)| {
                s.info
                    .row_group_tokens
                    .iter()
                    .enumerate()
                    .map(move |(row_group, &tokens)| BlockRef {
                        shard,
                        row_group,
                        tokens,
                    })
            })
            .collect();
        let sizes = blocks.iter().map(|b| b.tokens).collect();
        let Some(order) = GlobalOrder::new(
            sizes,
            options.seq_len,
            options.seed,
            options.shuffle,
            options.shuffle_window,
        ) else {
            return Ok(None);
        };
        Ok(Some(StreamingLoader {
            runtime,
            shared: Arc::new(Inner {
                store,
                shards,
                column: manifest.token_column.clone(),
                vocab_size: manifest.vocab_size,
                permits: Semaphore::new(options.concurrency.max(1)),
            }),
            blocks,
            order,
            options,
            cache: HashMap::new(),
            fifo: VecDeque::new(),
            cached_bytes: 0,
            wait: Duration::ZERO,
        }))
    }

    /// Samples per epoch.
    pub fn len(&self) -> usize {
        self.order.samples_per_epoch() as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Time spent waiting for data in [`StreamingLoader::batch`] since the last call.
    pub fn take_wait(&mut self) -> Duration {
        std::mem::take(&mut self.wait)
    }

    fn ensure(&mut self, block: u32) -> BlockFuture {
        if let Some(f) = self.cache.get(&block) {
            return f.clone();
        }
        let shared = self.shared.clone();
        let b = self.blocks[block as usize];
        let handle = self.runtime.handle().clone();
        let task = self
            .runtime
            .spawn_blocking(move || handle.block_on(shared.fetch(b)));
        let fut: BoxFuture<'static, BlockResult> = async move {
            match task.await {
                Ok(Ok(tokens)) => Ok(Arc::new(tokens)),
                Ok(Err(e)) => Err(Arc::new(e)),
                Err(join) => Err(Arc::new(ShardError::Store {
                    path: "block fetch".into(),
                    message: join.to_string(),
                })),
            }
        }
        .boxed();
        let fut = fut.shared();
        // Start it now, not when first awaited.
        self.runtime.spawn(fut.clone().map(|_| ()));
        self.cache.insert(block, fut.clone());
        self.fifo.push_back(block);
        self.cached_bytes += self.blocks[block as usize].tokens * 4;
        fut
    }

    /// Global samples `first .. first + count`, with the blocks of the following samples
    /// fetched in the background.
    pub fn batch(&mut self, first: u64, count: usize) -> Result<Batch, ShardError> {
        let spans: Vec<_> = (first..first + count as u64)
            .map(|i| self.order.span(i))
            .collect();
        let needed: HashSet<u32> = spans
            .iter()
            .flat_map(|s| s.pieces.iter().map(|(b, _)| *b))
            .collect();
        let futures: HashMap<u32, BlockFuture> =
            needed.iter().map(|&b| (b, self.ensure(b))).collect();

        // Prefetch what comes next, within the memory cap.
        let mut keep = needed.clone();
        let next = first + count as u64;
        for i in next..next + self.options.prefetch_samples {
            for (b, _) in self.order.span(i).pieces {
                if keep.insert(b) {
                    let fits = self.cached_bytes + self.blocks[b as usize].tokens * 4
                        <= self.options.memory_cap_bytes;
                    if self.cache.contains_key(&b) || fits {
                        let _started = self.ensure(b);
                    }
                }
            }
        }

        let start = Instant::now();
        let mut ready = HashMap::new();
        for (b, f) in futures {
            let tokens = self.runtime.block_on(f).map_err(|e| (*e).clone())?;
            ready.insert(b, tokens);
        }
        self.wait += start.elapsed();

        let t = self.order.seq_len() as usize;
        let mut batch = Batch::with_capacity(count, t);
        let mut window = Vec::with_capacity(t + 1);
        for (i, span) in spans.iter().enumerate() {
            window.clear();
            for (b, range) in &span.pieces {
                let tokens = &ready[b];
                window.extend_from_slice(&tokens[range.start as usize..range.end as usize]);
            }
            batch
                .inputs
                .extend(window[..t].iter().map(|&x| i64::from(x)));
            batch
                .targets
                .extend(window[1..].iter().map(|&x| i64::from(x)));
            batch.samples.push(first + i as u64);
            batch.hash = batch
                .hash
                .wrapping_add(sample_hash(span.epoch, span.sequence));
        }

        // Evict the oldest blocks no longer needed while over the cap.
        let mut kept = VecDeque::with_capacity(self.fifo.len());
        while let Some(b) = self.fifo.pop_front() {
            if self.cached_bytes > self.options.memory_cap_bytes && !keep.contains(&b) {
                self.cache.remove(&b);
                self.cached_bytes -= self.blocks[b as usize].tokens * 4;
            } else {
                kept.push_back(b);
            }
        }
        self.fifo = kept;
        Ok(batch)
    }
}
