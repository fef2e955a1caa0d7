//! The embedded S3-compatible store (s3s + s3s-fs) for a zero-configuration start. It listens on
//! loopback and the proxy reaches it over HTTP with aws-sdk-s3, exactly as it reaches AWS.

use std::net::SocketAddr;
use std::path::Path;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;

pub struct EmbeddedStore {
    pub addr: SocketAddr,
    pub access_key: String,
    pub secret_key: String,
    task: tokio::task::JoinHandle<()>,
}

impl EmbeddedStore {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves `data_dir` (each sub-directory a bucket; `bucket` is created) on `listen`.
    /// Credentials are random per start unless given: only this process needs them.
    pub async fn start(
        data_dir: &Path,
        bucket: &str,
        listen: SocketAddr,
        credentials: Option<(String, String)>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(data_dir.join(bucket))?;
        let fs = s3s_fs::FileSystem::new(data_dir)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let (access_key, secret_key) = credentials.unwrap_or_else(|| {
            (
                format!("s3up-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
                uuid::Uuid::new_v4().simple().to_string(),
            )
        });
        let service = {
            let mut b = S3ServiceBuilder::new(fs);
            b.set_auth(SimpleAuth::from_single(
                access_key.clone(),
                secret_key.clone(),
            ));
            b.build()
        };
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let http = Builder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Ok(Self {
            addr,
            access_key,
            secret_key,
            task,
        })
    }
}

/// Credentials kept in the data directory, so a restarted store accepts the multipart uploads
/// it started before (s3s-fs ties each upload to the access key that created it; resumable tus
/// uploads outlive a restart).
pub fn stable_credentials(data_dir: &Path) -> std::io::Result<(String, String)> {
    let path = data_dir.join(".embedded-credentials");
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Some((access, secret)) = text.trim().split_once(':')
    {
        return Ok((access.to_owned(), secret.to_owned()));
    }
    std::fs::create_dir_all(data_dir)?;
    let access = format!("s3up-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let secret = uuid::Uuid::new_v4().simple().to_string();
    crate::config::write_private(&path, format!("{access}:{secret}").as_bytes())?;
    Ok((access, secret))
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.task.abort();
    }
}
