use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use s3_upload_proxy::config::{Config, ConfigError, Settings};
use s3_upload_proxy::{auth, server};

/// Streams large uploads into per-user S3 multipart uploads with bounded memory.
#[derive(Parser)]
#[command(name = "s3-upload-proxy", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (with no configuration: an embedded S3 store and a dev login).
    Serve {
        /// TOML configuration file; S3UP_* environment variables override it.
        #[arg(long, env = "S3UP_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print a JWT for a user, signed with the configured HS256 secret (the dev login).
    Token {
        #[arg(long)]
        user: String,
        /// Lifetime, e.g. `1h`, `30m`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(long, env = "S3UP_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Upload files through the proxy (tus, resumable) or straight to S3 (--direct).
    Upload(s3_upload_proxy::cli::UploadArgs),
    /// Run only the embedded S3-compatible store (for tests and benchmarks).
    Store {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "uploads")]
        bucket: String,
        #[arg(long, env = "AWS_ACCESS_KEY_ID")]
        access_key: String,
        #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
        secret_key: String,
    },
}

/// EX_USAGE: configuration the operator must fix.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let settings = match settings(config) {
                Ok(s) => s,
                Err(e) => return config_error(&e),
            };
            init_logging(settings.json_logs);
            runtime().block_on(serve(settings))
        }
        Command::Token { user, ttl, config } => {
            let settings = match settings(config) {
                Ok(s) => s,
                Err(e) => return config_error(&e),
            };
            let Some(secret) = settings.jwt.hs256_secret.as_deref() else {
                eprintln!(
                    "s3-upload-proxy: no HS256 secret is configured (S3UP_JWT_HS256_SECRET), so no token can be minted here"
                );
                return ExitCode::from(EXIT_CONFIG);
            };
            let jwt = &settings.jwt;
            match auth::mint_hs256(
                secret,
                &jwt.user_claim,
                &user,
                ttl,
                jwt.issuer.as_deref(),
                jwt.audience.as_deref(),
            ) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("s3-upload-proxy: cannot mint a token: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Upload(args) => {
            ExitCode::from(runtime().block_on(s3_upload_proxy::cli::run(args)))
        }
        Command::Store {
            listen,
            data_dir,
            bucket,
            access_key,
            secret_key,
        } => {
            init_logging(false);
            runtime().block_on(async {
                let store = match s3_upload_proxy::s3::embedded::EmbeddedStore::start(
                    &data_dir,
                    &bucket,
                    listen,
                    Some((access_key, secret_key)),
                )
                .await
                {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("s3-upload-proxy: cannot start the store: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                println!(
                    "S3-compatible store on {} (bucket {bucket:?}, data in {})",
                    store.url(),
                    data_dir.display()
                );
                shutdown_signal().await;
                ExitCode::SUCCESS
            })
        }
    }
}

fn settings(file: Option<PathBuf>) -> Result<Settings, ConfigError> {
    let aws_endpoint = ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
    Config::load(file.as_deref(), std::env::vars())?.validate(aws_endpoint)
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("s3-upload-proxy: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
}

fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    // SDK internals stay quiet by default: at trace level they would print signed headers.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,aws=warn,s3s=warn,hyper=warn"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json { fmt.json().init() } else { fmt.init() }
}

async fn serve(settings: Settings) -> ExitCode {
    let embedded = matches!(
        settings.backend,
        s3_upload_proxy::config::Backend::Embedded { .. }
    );
    let running = match server::start(settings, None).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("s3-upload-proxy: {e:#}");
            let config = e.downcast_ref::<ConfigError>().is_some();
            return if config {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            };
        }
    };
    println!("s3-upload-proxy listening on {}", running.url());
    if let (true, Some(store)) = (embedded, &running.app.embedded) {
        if let s3_upload_proxy::config::Backend::Embedded { data_dir, .. } =
            &running.app.settings.backend
        {
            println!(
                "embedded S3 store on {} (data in {})",
                store.url(),
                data_dir.display()
            );
        }
        println!("get a dev token:  s3-upload-proxy token --user alice");
        println!(
            "upload a file:    curl -T FILE -H \"Authorization: Bearer $(s3-upload-proxy token --user alice)\" {}/uploads/FILE",
            running.url()
        );
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.shutdown();
    running.wait().await;
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("cannot listen for SIGTERM");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
