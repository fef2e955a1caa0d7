//! Prometheus metrics, one registry per app so in-process tests do not share counters.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UploadOutcome {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub endpoint: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StsOutcome {
    pub outcome: &'static str,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub bytes_received: Counter,
    pub bytes_sent_s3: Counter,
    pub parts_uploaded: Counter,
    pub s3_retries: Counter,
    pub multipart_aborted: Counter,
    pub uploads: Family<UploadOutcome, Counter>,
    pub active_uploads: Gauge,
    pub budget_in_use_bytes: Gauge,
    pub budget_bytes: Gauge,
    pub http_requests: Family<HttpLabels, Counter>,
    pub sts_assume_role: Family<StsOutcome, Counter>,
}

impl Metrics {
    pub fn registry(self: &std::sync::Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("s3up");
        r.register(
            "received_bytes",
            "Body bytes received from clients",
            self.bytes_received.clone(),
        );
        r.register(
            "s3_sent_bytes",
            "Bytes acknowledged by S3 (parts and single PUTs)",
            self.bytes_sent_s3.clone(),
        );
        r.register(
            "s3_parts",
            "Parts uploaded to S3",
            self.parts_uploaded.clone(),
        );
        r.register(
            "s3_retries",
            "S3 request attempts beyond the first",
            self.s3_retries.clone(),
        );
        r.register(
            "multipart_aborted",
            "Multipart uploads aborted after a failure",
            self.multipart_aborted.clone(),
        );
        r.register(
            "uploads",
            "Finished uploads by outcome",
            self.uploads.clone(),
        );
        r.register(
            "active_uploads",
            "Uploads in progress",
            self.active_uploads.clone(),
        );
        r.register(
            "buffer_budget_in_use_bytes",
            "Part buffer bytes taken from the budget",
            self.budget_in_use_bytes.clone(),
        );
        r.register(
            "buffer_budget_bytes",
            "The configured part buffer budget",
            self.budget_bytes.clone(),
        );
        r.register(
            "http_requests",
            "HTTP responses by endpoint and status",
            self.http_requests.clone(),
        );
        r.register(
            "sts_assume_role",
            "AssumeRole calls for per-user credentials by outcome (ok, unavailable, refused)",
            self.sts_assume_role.clone(),
        );
        r
    }
}
