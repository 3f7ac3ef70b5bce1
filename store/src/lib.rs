//! Object stores by URL: where datasets, checkpoints and the coordinator's state live.
//!
//! | URL | store |
//! |---|---|
//! | `/plain/path`, `rel/path`, `file:///abs/path` | the local file system (the default) |
//! | `s3://bucket/prefix` | any S3-compatible store; the usual `AWS_*` variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT` for other servers, `AWS_ALLOW_HTTP=true` for plain HTTP) |
//! | `az://container/prefix` | Azure Blob Storage; `AZURE_STORAGE_*` variables (`AZURE_STORAGE_USE_EMULATOR=true` for Azurite) |
//! | `gs://bucket/prefix` | Google Cloud Storage; `GOOGLE_*` variables |
//! | `memory://name/prefix` | an in-memory store shared by everything in this process under `name` |
//!
//! Requests to remote stores are retried with exponential backoff: `KILN_STORE_RETRIES`
//! times (default 5) within `KILN_STORE_RETRY_TIMEOUT_S` seconds (default 60).

pub mod hold;
pub mod owner;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kiln_proto::manifest::{self, DatasetManifest, ManifestError};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "unsupported store URL {url:?}: expected a path, file://, s3://, az://, gs:// or memory://"
    )]
    Scheme { url: String },
    #[error("invalid store URL {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("cannot open store {url}: {message}")]
    Open { url: String, message: String },
}

/// A store and the prefix under it that a URL names.
#[derive(Debug, Clone)]
pub struct StoreLocation {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
    /// The URL as given, for messages.
    pub url: String,
    /// Whether this is the local file system (then `local_dir` is the directory).
    pub local_dir: Option<std::path::PathBuf>,
}

impl StoreLocation {
    /// The object `name` (a relative path) under the prefix.
    pub fn child(&self, name: &str) -> Path {
        name.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |p, part| p.join(part))
    }

    /// A human-readable name for an object under the prefix.
    pub fn display(&self, name: &str) -> String {
        format!("{}/{name}", self.url.trim_end_matches('/'))
    }

    /// A human-readable name for an object of this store: the URL it would be given by.
    pub fn display_path(&self, path: &Path) -> String {
        match path.prefix_match(&self.prefix) {
            Some(parts) => {
                let rel: Vec<String> = parts.map(|p| p.as_ref().to_owned()).collect();
                if rel.is_empty() {
                    self.url.clone()
                } else {
                    self.display(&rel.join("/"))
                }
            }
            None => path.to_string(),
        }
    }
}

fn retry_config() -> RetryConfig {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
    };
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: env("KILN_STORE_RETRIES", 5) as usize,
        retry_timeout: Duration::from_secs(env("KILN_STORE_RETRY_TIMEOUT_S", 60)),
    }
}

fn memory_store(name: &str) -> Arc<dyn ObjectStore> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    let stores = STORES.get_or_init(Default::default);
    let mut stores = stores.lock().unwrap_or_else(|e| e.into_inner());
    stores
        .entry(name.to_owned())
        .or_insert_with(|| Arc::new(InMemory::new()))
        .clone()
}

impl StoreLocation {
    /// The dataset manifest under the prefix (`manifest.json`), read and checked; a missing
    /// one is [`ManifestError::Missing`], which tells the user to run `kiln prepare`.
    pub async fn dataset_manifest(&self) -> Result<DatasetManifest, ManifestError> {
        let name = std::path::PathBuf::from(self.display(manifest::FILE_NAME));
        match self.read(manifest::FILE_NAME).await {
            Ok(Some(bytes)) => DatasetManifest::parse(&String::from_utf8_lossy(&bytes), &name),
            Ok(None) => Err(ManifestError::Missing {
                dir: std::path::PathBuf::from(&self.url),
                file: name,
            }),
            Err(e) => Err(ManifestError::Read {
                path: name,
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    /// The whole object `name` under the prefix, or `None` when there is no such object.
    pub async fn read(&self, name: &str) -> Result<Option<bytes::Bytes>, object_store::Error> {
        let got = match self.store.get(&self.child(name)).await {
            Ok(obj) => obj.bytes().await,
            Err(e) => Err(e),
        };
        match got {
            Ok(bytes) => Ok(Some(bytes)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Opens the store a URL or path names.
pub fn open(url: &str) -> Result<StoreLocation, StoreError> {
    let url_err = |message: String| StoreError::Url {
        url: url.to_owned(),
        message,
    };
    let open_err = |e: object_store::Error| StoreError::Open {
        url: url.to_owned(),
        message: e.to_string(),
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return open_local(url, std::path::Path::new(url));
    };
    if scheme == "file" {
        return open_local(url, std::path::Path::new(rest));
    }
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(url_err("no bucket or container name".into()));
    }
    let prefix = Path::parse(prefix.trim_end_matches('/')).map_err(|e| url_err(e.to_string()))?;
    let client = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_allow_http(true);
    let store: Arc<dyn ObjectStore> = match scheme {
        "s3" => {
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry_config())
                .with_client_options(client);
            if std::env::var_os("AWS_REGION").is_none()
                && std::env::var_os("AWS_DEFAULT_REGION").is_none()
            {
                b = b.with_region("us-east-1");
            }
            Arc::new(b.build().map_err(open_err)?)
        }
        "az" | "azure" => Arc::new(
            MicrosoftAzureBuilder::from_env()
                .with_container_name(bucket)
                .with_retry(retry_config())
                .with_client_options(client)
                .build()
                .map_err(open_err)?,
        ),
        "gs" => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry_config())
                .with_client_options(client)
                .build()
                .map_err(open_err)?,
        ),
        "memory" => memory_store(bucket),
        _ => {
            return Err(StoreError::Scheme {
                url: url.to_owned(),
            })
        }
    };
    Ok(StoreLocation {
        store,
        prefix,
        url: url.to_owned(),
        local_dir: None,
    })
}

fn open_local(url: &str, dir: &std::path::Path) -> Result<StoreLocation, StoreError> {
    let abs = if dir.is_absolute() {
        dir.to_owned()
    } else {
        std::env::current_dir()
            .map_err(|e| StoreError::Open {
                url: url.to_owned(),
                message: e.to_string(),
            })?
            .join(dir)
    };
    let abs = kiln_proto::path::normalize(&abs);
    let prefix = Path::from_absolute_path(&abs).map_err(|e| StoreError::Url {
        url: url.to_owned(),
        message: e.to_string(),
    })?;
    Ok(StoreLocation {
        store: Arc::new(LocalFileSystem::new()),
        prefix,
        url: url.to_owned(),
        local_dir: Some(abs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_map_to_stores_and_prefixes() {
        let loc = open("memory://t/data/set").unwrap();
        assert_eq!(loc.prefix.as_ref(), "data/set");
        assert_eq!(loc.child("a/b.parquet").as_ref(), "data/set/a/b.parquet");
        let loc = open("/tmp/x/../y").unwrap();
        assert_eq!(
            loc.local_dir.as_deref(),
            Some(std::path::Path::new("/tmp/y"))
        );
        let err = open("ftp://host/x").unwrap_err().to_string();
        assert!(
            err.starts_with("unsupported store URL \"ftp://host/x\""),
            "{err}"
        );
        assert!(open("s3:///x").is_err());
    }
}
