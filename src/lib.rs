//! s3-upload-proxy: streams large uploads into per-user S3 multipart uploads with bounded memory.
//! `main` only parses the command line; everything else, tests included, starts here.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod direct;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod s3;
pub mod server;
pub mod tus;
pub mod upload;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use config::{Backend, Settings};
use metrics::Metrics;
use s3::embedded::EmbeddedStore;
use s3::{Bucket, ClientSettings, Endpoint};
use upload::Uploader;
use upload::budget::Budget;

/// A built application: state for the router, plus the embedded store when there is one.
pub struct App {
    pub state: api::AppState,
    pub settings: Settings,
    pub embedded: Option<EmbeddedStore>,
}

/// Builds the app from validated settings (starting the embedded store if configured).
/// `endpoint` overrides how S3 is reached (tests point it at their own servers).
pub async fn build(settings: Settings, endpoint: Option<Endpoint>) -> anyhow::Result<App> {
    let metrics = Arc::new(Metrics::default());
    let (endpoint, embedded) = match (endpoint, &settings.backend) {
        (Some(endpoint), _) => (endpoint, None),
        (None, Backend::Embedded { data_dir, bucket }) => {
            let credentials = s3::embedded::stable_credentials(data_dir)?;
            let store = EmbeddedStore::start(
                data_dir,
                bucket,
                ([127, 0, 0, 1], 0).into(),
                Some(credentials),
            )
            .await?;
            let endpoint = Endpoint::Static {
                url: store.url(),
                access_key: store.access_key.clone(),
                secret_key: store.secret_key.clone(),
            };
            (endpoint, Some(store))
        }
        (
            None,
            Backend::External {
                custom_endpoint, ..
            },
        ) => (
            Endpoint::Default {
                region: settings.region.clone(),
                path_style: *custom_endpoint,
            },
            None,
        ),
    };
    let client_settings = ClientSettings {
        max_attempts: settings.s3_max_attempts,
        attempt_timeout: settings.s3_attempt_timeout,
    };
    let sts = match settings.sts {
        Some(_) => Some(credentials::sts::client(&endpoint, &client_settings).await),
        None => None,
    };
    let client = s3::client(endpoint, &client_settings, Arc::clone(&metrics)).await;
    let bucket = Bucket {
        client,
        name: settings.backend.bucket().into(),
    };
    let uploader = Uploader {
        budget: Budget::new(settings.upload.memory_budget, Arc::clone(&metrics)),
        settings: settings.upload,
        metrics: Arc::clone(&metrics),
        cleanup: tokio_util::task::TaskTracker::new(),
    };
    let verifier = auth::Verifier::new(settings.jwt.clone())?;
    let state = api::AppState(Arc::new(api::Inner {
        verifier,
        keys: settings.keys.clone(),
        users: credentials::UserBuckets::new(bucket.clone(), &settings, sts, &metrics),
        api_key: settings.api_key.clone(),
        bucket,
        uploader,
        registry: metrics.registry(),
        metrics,
        draining: AtomicBool::new(false),
        tus: tus::TusConfig {
            settings: settings.tus.clone(),
            public_url: settings.public_url.clone(),
            https: settings.tls.is_some(),
        },
    }));
    tus::spawn_reaper(&state);
    Ok(App {
        state,
        settings,
        embedded,
    })
}
