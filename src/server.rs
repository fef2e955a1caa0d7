//! Listening: plain TCP (HTTP/1.1 and h2c) or TLS with ALPN (h2, http/1.1), and the drain on
//! shutdown: stop accepting, report not-ready, let requests finish until the grace period ends,
//! then drop what is left so its drop guards abort the multipart uploads.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Settings};
use crate::s3::Endpoint;
use crate::{App, api};

/// HTTP/1.1 read buffer cap: bounds per-connection memory outside the part budget.
const H1_MAX_BUF: usize = 64 * 1024;
/// HTTP/2 flow-control windows: what a client may send before we read it. Small enough that
/// 50 stalled h2 uploads hold ~50 MiB at most, large enough for ~20 MB/s per stream at 50 ms RTT.
const H2_STREAM_WINDOW: u32 = 1 << 20;
const H2_CONN_WINDOW: u32 = 1 << 20;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time given to abort requests of interrupted uploads after the last connection closed.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running server (tests start one on port 0; `serve` runs one until a signal).
pub struct Running {
    pub addr: SocketAddr,
    pub app: App,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Begins the drain; `wait` returns when it is over.
    pub fn shutdown(&self) {
        self.app.state.draining.store(true, Ordering::Relaxed);
        self.stop.cancel();
    }

    pub async fn wait(self) {
        let _ = self.task.await;
    }

    pub fn url(&self) -> String {
        let scheme = if self.app.settings.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }
}

/// Builds the app, binds `settings.listen` and serves in the background.
pub async fn start(settings: Settings, endpoint: Option<Endpoint>) -> anyhow::Result<Running> {
    let tls = match &settings.tls {
        Some((cert, key)) => Some(tls_acceptor(cert, key)?),
        None => None,
    };
    let app = crate::build(settings, endpoint).await?;
    let listener = TcpListener::bind(app.settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", app.settings.listen))?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let router = api::router(app.state.clone());
    let task = tokio::spawn(serve(
        listener,
        tls,
        router,
        stop.clone(),
        app.settings.shutdown_grace,
        app.state.uploader.cleanup.clone(),
    ));
    Ok(Running {
        addr,
        app,
        stop,
        task,
    })
}

fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, ConfigError> {
    let bad = |key: &str, e: String| ConfigError {
        key: key.to_owned(),
        message: e,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| bad("tls_cert_file", e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("tls_key_file", e.to_string()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("tls_cert_file", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("tls_key_file", e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn http_builder() -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(H1_MAX_BUF)
        .header_read_timeout(Duration::from_secs(30));
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW)
        .adaptive_window(false)
        .max_concurrent_streams(128)
        .keep_alive_interval(Duration::from_secs(30));
    builder
}

async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    stop: CancellationToken,
    grace: Duration,
    cleanup: tokio_util::task::TaskTracker,
) {
    let builder = http_builder();
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let (builder, watcher, tls) = (builder.clone(), graceful.watcher(), tls.clone());
        connections.spawn(async move {
            let result = match tls {
                None => {
                    watcher
                        .watch(
                            builder
                                .serve_connection(TokioIo::new(tcp), service)
                                .into_owned(),
                        )
                        .await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            watcher
                                .watch(
                                    builder
                                        .serve_connection(TokioIo::new(stream), service)
                                        .into_owned(),
                                )
                                .await
                        }
                        _ => return tracing::debug!(%peer, "TLS handshake failed"),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(connections = connections.len(), "draining");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = connections.len(),
            "grace period over; aborting what is left"
        );
    }
    connections.shutdown().await;
    cleanup.close();
    if tokio::time::timeout(CLEANUP_TIMEOUT, cleanup.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "some multipart aborts did not finish; a bucket lifecycle rule will remove them"
        );
    }
    tracing::info!("stopped");
}
