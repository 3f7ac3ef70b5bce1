//! Connecting to a coordinator: the address, the shared token every call carries, and TLS
//! when the coordinator serves it.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::rpc::coordinator_client::CoordinatorClient;

/// The metadata key a token travels under, as `Bearer TOKEN`.
pub const AUTHORIZATION: &str = "authorization";

/// Whether a token `given` is the `expected` one, compared in a time that depends on the
/// expected token's length alone, not on where they differ.
pub fn same_token(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, b) in expected.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ b);
    }
    diff == 0
}
/// The largest message either side decodes: a job file plus headroom.
pub const MAX_MESSAGE_BYTES: usize = crate::control::MAX_JOB_BYTES + (64 << 10);

/// How to reach a coordinator.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://HOST:PORT`, `https://HOST:PORT`, or `HOST:PORT`.
    pub url: String,
    pub token: String,
    /// The CA certificate (PEM) that signed the coordinator's; implies `https`.
    pub tls_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0:?} is not a coordinator address: expected http://HOST:PORT or HOST:PORT")]
    Address(String),
    #[error("no token: pass --token or set KILN_TOKEN (the coordinator printed it at start)")]
    NoToken,
    #[error("the token is not valid header text")]
    BadToken,
    #[error("cannot read the CA certificate {path}: {source}")]
    Ca {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to the coordinator at {url}: {message}")]
    Connect { url: String, message: String },
}

/// Adds the token to every call.
#[derive(Clone)]
pub struct Auth {
    header: MetadataValue<tonic::metadata::Ascii>,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(AUTHORIZATION, self.header.clone());
        Ok(request)
    }
}

pub type Client = CoordinatorClient<InterceptedService<Channel, Auth>>;

impl Target {
    /// The endpoint, normalized: `HOST:PORT` becomes `http://HOST:PORT` (`https` with a CA).
    pub fn endpoint_url(&self) -> Result<String, ConnectError> {
        let url = self.url.trim();
        if url.is_empty() {
            return Err(ConnectError::Address(self.url.clone()));
        }
        let url = if url.contains("://") {
            url.to_owned()
        } else if self.tls_ca.is_some() {
            format!("https://{url}")
        } else {
            format!("http://{url}")
        };
        Ok(url)
    }

    fn endpoint(&self) -> Result<Endpoint, ConnectError> {
        let url = self.endpoint_url()?;
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|_| ConnectError::Address(self.url.clone()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .tcp_nodelay(true);
        if let Some(path) = &self.tls_ca {
            let pem = std::fs::read(path).map_err(|source| ConnectError::Ca {
                path: path.clone(),
                source,
            })?;
            let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| ConnectError::Connect {
                    url,
                    message: e.to_string(),
                })?;
        }
        Ok(endpoint)
    }

    fn auth(&self) -> Result<Auth, ConnectError> {
        if self.token.is_empty() {
            return Err(ConnectError::NoToken);
        }
        let header = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| ConnectError::BadToken)?;
        Ok(Auth { header })
    }

    /// Connects now; fails if the coordinator cannot be reached.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        let auth = self.auth()?;
        let endpoint = self.endpoint()?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| ConnectError::Connect {
                url: self.endpoint_url().unwrap_or_default(),
                message: source_chain(&e),
            })?;
        Ok(Self::client(channel, auth))
    }

    /// A client that connects on first use and reconnects after the coordinator restarts.
    pub fn connect_lazy(&self) -> Result<Client, ConnectError> {
        let auth = self.auth()?;
        Ok(Self::client(self.endpoint()?.connect_lazy(), auth))
    }

    fn client(channel: Channel, auth: Auth) -> Client {
        CoordinatorClient::with_interceptor(channel, auth)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// An error and its causes on one line.
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = s.source();
    }
    message
}
