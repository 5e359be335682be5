//! Prometheus metrics, with the original's names and labels (§5).

use std::{
    collections::HashSet,
    sync::{LazyLock, Mutex},
};

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder, exponential_buckets,
};

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// `spegel_mirror_requests_total{registry,cache}`: mirror requests, `cache` = hit|miss.
    pub mirror_requests_total: IntCounterVec,
    /// `spegel_mirror_last_success_timestamp_seconds`: Unix time of the last successful mirror.
    pub mirror_last_success: Gauge,
    /// `spegel_resolve_duration_seconds{router}`: lookup start to the first provider found, once per mirror lookup.
    pub resolve_duration: HistogramVec,
    /// `spegel_advertised_image_tags{registry}`.
    pub advertised_image_tags: GaugeVec,
    /// `spegel_advertised_image_digests{registry}`.
    pub advertised_image_digests: GaugeVec,
    /// `spegel_advertised_content_digests{registry}`.
    pub advertised_content_digests: GaugeVec,
    /// `http_request_duration_seconds{handler,method,code}`.
    pub http_request_duration: HistogramVec,
    /// `http_response_size_bytes{handler,method,code}`.
    pub http_response_size: HistogramVec,
    /// `http_requests_inflight{handler}`.
    pub http_requests_inflight: GaugeVec,
    /// `spegel_store_content_opens_total{path}`: content opened by data path,
    /// [`CONTENT_PATH_FILE`] or [`CONTENT_PATH_STREAM`] (not in the original).
    pub content_opens: IntCounterVec,
    /// `spegel_store_content_rejected_total{reason}`: blob files refused because they are a
    /// [`CONTENT_REJECTED_SYMLINK`] or [`CONTENT_REJECTED_NOT_REGULAR`] (not in the original).
    pub content_rejected: IntCounterVec,
    /// `spegel_peer_rtt_seconds{peer}`: smoothed TCP RTT to a known peer's address.
    pub peer_rtt: GaugeVec,
    /// `spegel_peer_min_rtt_seconds{peer}`: minimum TCP RTT to a known peer's address.
    pub peer_min_rtt: GaugeVec,
    /// `spegel_peer_retransmits_total{peer}`: TCP segments retransmitted to a known peer.
    pub peer_retransmits_total: IntCounterVec,
    /// `spegel_peer_throughput_bytes_per_second{peer}`: recent blob transfer rate from a peer.
    pub peer_throughput: GaugeVec,
    /// `spegel_ebpf_enabled`: 1 when the kernel probes are loaded, else 0.
    pub ebpf_enabled: IntGauge,
    /// `spegel_in_progress_advertised_digests`: blobs advertised while containerd downloads them.
    pub in_progress_advertised: IntGauge,
    /// `spegel_in_progress_advertisements_total`: in-progress advertisements started.
    pub in_progress_advertisements: IntCounter,
    /// `spegel_in_progress_withdrawals_total{reason}`: in-progress advertisements withdrawn,
    /// `reason` = committed (after the linger)|abandoned (ingest removed)|stalled (no writes for
    /// the stall bound).
    pub in_progress_withdrawals: IntCounterVec,
    /// `spegel_in_progress_requests_total{outcome}`: peer requests for a blob this node is
    /// downloading, `outcome` = served|unavailable|searching (this node is itself still looking
    /// for a provider of it).
    pub in_progress_requests: IntCounterVec,
    /// `spegel_in_progress_served_bytes_total`: bytes of blobs served while still downloading.
    pub in_progress_served_bytes: IntCounter,
    /// `spegel_mirror_in_progress_providers_total`: providers found only under the in-progress key.
    pub mirror_in_progress_providers: IntCounter,
    /// `spegel_mirror_digest_checks_total{outcome}`: whole blobs forwarded from peers whose
    /// digest was checked before their last bytes were released, `outcome` = ok|mismatch.
    pub mirror_digest_checks: IntCounterVec,
    /// `spegel_mirror_bad_peers_total`: times a peer was marked bad for a digest because a
    /// whole blob it supplied bytes of did not match the digest (not in the original).
    pub mirror_bad_peers: IntCounter,
    /// `spegel_mirror_bad_peer_skips_total`: providers a lookup found but a forward skipped
    /// because they are marked bad for that digest (not in the original).
    pub mirror_bad_peer_skips: IntCounter,
    /// `spegel_store_corrupt_blobs_total`: local blobs whose content was found not to match
    /// their digest; they are no longer served or advertised (not in the original).
    pub store_corrupt_blobs: IntCounter,
    /// `spegel_store_verified_bytes_total`: bytes of local blobs hashed by the background
    /// verification (not in the original).
    pub store_verified_bytes: IntCounter,
    /// `spegel_store_verifications_total{trigger}`: background verifications of local blobs,
    /// `trigger` = served|report (not in the original).
    pub store_verifications: IntCounterVec,
    /// `spegel_mirror_intent_advertisements_total`: intents to fetch a missed blob advertised.
    pub mirror_intent_advertisements: IntCounter,
    /// `spegel_mirror_waits_total{outcome}`: waits for another node fetching a missed blob,
    /// `outcome` = forwarded|timeout|failed.
    pub mirror_waits: IntCounterVec,
    /// `spegel_mirror_wait_duration_seconds`: how long those waits took.
    pub mirror_wait_duration: prometheus::Histogram,
    /// `spegel_visualize_events_total`: requests recorded for `/visualize` (0 while it is off).
    pub visualize_events_total: IntCounter,
    /// `spegel_http_connections_refused_total{reason}`: connections closed by the connection
    /// limits: `total`, `per_ip` (caps and reserve full) or `slow_reader` (not in the original).
    pub http_connections_refused: IntCounterVec,
    /// The values the `registry` label of request metrics may take.
    pub registry_labels: RegistryLabels,
}

/// The `method` label of HTTP metrics: a fixed set, whatever method string the client sent.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        _ => "other",
    }
}

/// `registry` label for a registry not admitted as a label value.
pub const OTHER_REGISTRY: &str = "other";
/// Registry names from requests admitted as label values beyond the known ones; the rest share
/// [`OTHER_REGISTRY`], so a client sending endless `?ns=` values adds at most this many series.
pub const MAX_REQUESTED_REGISTRY_LABELS: usize = 16;
/// Longest registry name used as a label value (a host name with a port).
const MAX_REGISTRY_LABEL_LEN: usize = 260;

/// The bounded set of `registry` label values: registries the node knows (the
/// `--mirrored-registries` allow-list, registries of local images) and the first
/// [`MAX_REQUESTED_REGISTRY_LABELS`] other names requests carried.
#[derive(Debug, Default)]
pub struct RegistryLabels {
    inner: Mutex<RegistryLabelSets>,
}

#[derive(Debug, Default)]
struct RegistryLabelSets {
    known: HashSet<String>,
    requested: HashSet<String>,
}

impl RegistryLabels {
    /// Admits `registries` (from configuration or the local store, never from a client).
    pub fn add_known<'a>(&self, registries: impl IntoIterator<Item = &'a str>) {
        let mut sets = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for r in registries {
            if r.len() <= MAX_REGISTRY_LABEL_LEN && !sets.known.contains(r) {
                sets.known.insert(r.to_string());
            }
        }
    }

    /// The label value for `registry`, a name a client sent.
    pub fn label(&self, registry: &str) -> String {
        let mut sets = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if sets.known.contains(registry) || sets.requested.contains(registry) {
            return registry.to_string();
        }
        if registry.len() <= MAX_REGISTRY_LABEL_LEN
            && registry != OTHER_REGISTRY
            && sets.requested.len() < MAX_REQUESTED_REGISTRY_LABELS
        {
            sets.requested.insert(registry.to_string());
            return registry.to_string();
        }
        OTHER_REGISTRY.to_string()
    }
}

/// Buckets of `spegel_resolve_duration_seconds`, in seconds: Prometheus' defaults with finer
/// steps below 5 ms.
pub const RESOLVE_BUCKETS: [f64; 15] = [
    0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// `path` label: content read from containerd's content directory (bodies go out with sendfile).
pub const CONTENT_PATH_FILE: &str = "file";
/// `path` label: content streamed through containerd's content API (a userspace copy).
pub const CONTENT_PATH_STREAM: &str = "stream";

/// `reason` label: the blob file is a symbolic link.
pub const CONTENT_REJECTED_SYMLINK: &str = "symlink";
/// `reason` label: the blob file is neither a link nor a regular file (a FIFO, a directory).
pub const CONTENT_REJECTED_NOT_REGULAR: &str = "not_regular";

fn must<T>(r: prometheus::Result<T>) -> T {
    // Only reachable with a programming error in the static definitions below.
    r.unwrap_or_else(|e| panic!("invalid metric definition: {e}"))
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let m = Metrics {
            mirror_requests_total: must(IntCounterVec::new(
                Opts::new(
                    "spegel_mirror_requests_total",
                    "Total number of mirror requests.",
                ),
                &["registry", "cache"],
            )),
            mirror_last_success: must(Gauge::new(
                "spegel_mirror_last_success_timestamp_seconds",
                "The timestamp of the last successful mirror request.",
            )),
            resolve_duration: must(HistogramVec::new(
                HistogramOpts::new(
                    "spegel_resolve_duration_seconds",
                    "The duration for router to resolve a peer.",
                )
                // Finer than the default buckets below 5 ms, where lookups answered from the
                // local record store fall.
                .buckets(RESOLVE_BUCKETS.to_vec()),
                &["router"],
            )),
            advertised_image_tags: must(GaugeVec::new(
                Opts::new(
                    "spegel_advertised_image_tags",
                    "Number of advertised image tags.",
                ),
                &["registry"],
            )),
            advertised_image_digests: must(GaugeVec::new(
                Opts::new(
                    "spegel_advertised_image_digests",
                    "Number of advertised image digests.",
                ),
                &["registry"],
            )),
            advertised_content_digests: must(GaugeVec::new(
                Opts::new(
                    "spegel_advertised_content_digests",
                    "Number of advertised content digests.",
                ),
                &["registry"],
            )),
            http_request_duration: must(HistogramVec::new(
                HistogramOpts::new(
                    "http_request_duration_seconds",
                    "The latency of the HTTP requests.",
                ),
                &["handler", "method", "code"],
            )),
            http_response_size: must(HistogramVec::new(
                HistogramOpts::new(
                    "http_response_size_bytes",
                    "The size of the HTTP responses.",
                )
                .buckets(must(exponential_buckets(1024.0, 5.0, 10))),
                &["handler", "method", "code"],
            )),
            http_requests_inflight: must(GaugeVec::new(
                Opts::new(
                    "http_requests_inflight",
                    "The number of inflight requests being handled at the same time.",
                ),
                &["handler"],
            )),
            content_opens: must(IntCounterVec::new(
                Opts::new(
                    "spegel_store_content_opens_total",
                    "Content opened from the store, by data path: file (sent with sendfile) or stream (containerd content API).",
                ),
                &["path"],
            )),
            content_rejected: must(IntCounterVec::new(
                Opts::new(
                    "spegel_store_content_rejected_total",
                    "Blob files in the content directory refused (not served) because they are not regular files.",
                ),
                &["reason"],
            )),
            peer_rtt: must(GaugeVec::new(
                Opts::new(
                    "spegel_peer_rtt_seconds",
                    "Smoothed TCP round-trip time to the peer.",
                ),
                &["peer"],
            )),
            peer_min_rtt: must(GaugeVec::new(
                Opts::new(
                    "spegel_peer_min_rtt_seconds",
                    "Minimum TCP round-trip time to the peer.",
                ),
                &["peer"],
            )),
            peer_retransmits_total: must(IntCounterVec::new(
                Opts::new(
                    "spegel_peer_retransmits_total",
                    "TCP segments retransmitted to the peer.",
                ),
                &["peer"],
            )),
            peer_throughput: must(GaugeVec::new(
                Opts::new(
                    "spegel_peer_throughput_bytes_per_second",
                    "Recent blob transfer throughput from the peer.",
                ),
                &["peer"],
            )),
            in_progress_advertised: must(IntGauge::new(
                "spegel_in_progress_advertised_digests",
                "Blobs advertised while containerd is still downloading them.",
            )),
            in_progress_advertisements: must(IntCounter::new(
                "spegel_in_progress_advertisements_total",
                "In-progress blob advertisements started.",
            )),
            in_progress_withdrawals: must(IntCounterVec::new(
                Opts::new(
                    "spegel_in_progress_withdrawals_total",
                    "In-progress blob advertisements withdrawn, by reason.",
                ),
                &["reason"],
            )),
            in_progress_requests: must(IntCounterVec::new(
                Opts::new(
                    "spegel_in_progress_requests_total",
                    "Peer requests for a blob this node is still downloading.",
                ),
                &["outcome"],
            )),
            in_progress_served_bytes: must(IntCounter::new(
                "spegel_in_progress_served_bytes_total",
                "Bytes of blobs served to peers while still downloading.",
            )),
            mirror_in_progress_providers: must(IntCounter::new(
                "spegel_mirror_in_progress_providers_total",
                "Providers found only under the in-progress key of a blob.",
            )),
            mirror_digest_checks: must(IntCounterVec::new(
                Opts::new(
                    "spegel_mirror_digest_checks_total",
                    "Whole blobs forwarded from peers whose digest was checked.",
                ),
                &["outcome"],
            )),
            mirror_bad_peers: must(IntCounter::new(
                "spegel_mirror_bad_peers_total",
                "Peers marked bad for a digest after a blob from them did not match it.",
            )),
            mirror_bad_peer_skips: must(IntCounter::new(
                "spegel_mirror_bad_peer_skips_total",
                "Providers skipped because they are marked bad for the requested digest.",
            )),
            store_corrupt_blobs: must(IntCounter::new(
                "spegel_store_corrupt_blobs_total",
                "Local blobs found not to match their digest (no longer served or advertised).",
            )),
            store_verified_bytes: must(IntCounter::new(
                "spegel_store_verified_bytes_total",
                "Bytes of local blobs hashed by the background verification.",
            )),
            store_verifications: must(IntCounterVec::new(
                Opts::new(
                    "spegel_store_verifications_total",
                    "Background verifications of local blobs by trigger.",
                ),
                &["trigger"],
            )),
            mirror_intent_advertisements: must(IntCounter::new(
                "spegel_mirror_intent_advertisements_total",
                "Intents to fetch a missed blob advertised, for nodes missing it at the same time.",
            )),
            mirror_waits: must(IntCounterVec::new(
                Opts::new(
                    "spegel_mirror_waits_total",
                    "Waits for another node that fetches a blob all missed, by how they ended.",
                ),
                &["outcome"],
            )),
            mirror_wait_duration: must(prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "spegel_mirror_wait_duration_seconds",
                    "Duration of waits for another node that fetches a blob all missed.",
                )
                .buckets(must(exponential_buckets(0.005, 2.0, 10))),
            )),
            ebpf_enabled: must(IntGauge::new(
                "spegel_ebpf_enabled",
                "Whether the eBPF telemetry probes are loaded (1) or not (0).",
            )),
            visualize_events_total: must(IntCounter::new(
                "spegel_visualize_events_total",
                "Requests recorded for the visualize page.",
            )),
            registry,
            http_connections_refused: must(IntCounterVec::new(
                Opts::new(
                    "spegel_http_connections_refused_total",
                    "Connections closed by the connection limits: total or per_ip cap reached, or a slow_reader.",
                ),
                &["reason"],
            )),
            registry_labels: RegistryLabels::default(),
        };
        must(
            m.registry
                .register(Box::new(m.visualize_events_total.clone())),
        );
        must(
            m.registry
                .register(Box::new(m.mirror_requests_total.clone())),
        );
        must(m.registry.register(Box::new(m.mirror_last_success.clone())));
        must(m.registry.register(Box::new(m.resolve_duration.clone())));
        must(
            m.registry
                .register(Box::new(m.advertised_image_tags.clone())),
        );
        must(
            m.registry
                .register(Box::new(m.advertised_image_digests.clone())),
        );
        must(
            m.registry
                .register(Box::new(m.advertised_content_digests.clone())),
        );
        must(
            m.registry
                .register(Box::new(m.http_request_duration.clone())),
        );
        must(m.registry.register(Box::new(m.http_response_size.clone())));
        must(
            m.registry
                .register(Box::new(m.http_requests_inflight.clone())),
        );
        must(m.registry.register(Box::new(m.content_opens.clone())));
        must(m.registry.register(Box::new(m.content_rejected.clone())));
        must(
            m.registry
                .register(Box::new(m.http_connections_refused.clone())),
        );
        must(m.registry.register(Box::new(m.peer_rtt.clone())));
        must(m.registry.register(Box::new(m.peer_min_rtt.clone())));
        must(
            m.registry
                .register(Box::new(m.peer_retransmits_total.clone())),
        );
        must(m.registry.register(Box::new(m.peer_throughput.clone())));
        must(m.registry.register(Box::new(m.ebpf_enabled.clone())));
        must(
            m.registry
                .register(Box::new(m.in_progress_advertised.clone())),
        );
        must(
            m.registry
                .register(Box::new(m.in_progress_advertisements.clone())),
        );
        must(
            m.registry
                .register(Box::new(m.in_progress_requests.clone())),
        );
        must(
            m.registry
                .register(Box::new(m.in_progress_withdrawals.clone())),
        );
        must(
            m.registry
                .register(Box::new(m.in_progress_served_bytes.clone())),
        );
        must(
            m.registry
                .register(Box::new(m.mirror_in_progress_providers.clone())),
        );
        must(
            m.registry
                .register(Box::new(m.mirror_digest_checks.clone())),
        );
        must(m.registry.register(Box::new(m.mirror_bad_peers.clone())));
        must(
            m.registry
                .register(Box::new(m.mirror_bad_peer_skips.clone())),
        );
        must(m.registry.register(Box::new(m.store_corrupt_blobs.clone())));
        must(
            m.registry
                .register(Box::new(m.store_verified_bytes.clone())),
        );
        must(m.registry.register(Box::new(m.store_verifications.clone())));
        must(
            m.registry
                .register(Box::new(m.mirror_intent_advertisements.clone())),
        );
        must(m.registry.register(Box::new(m.mirror_waits.clone())));
        // Exported from the start, so a rate over them is defined before the first wait.
        for outcome in ["forwarded", "timeout", "failed"] {
            m.mirror_waits.with_label_values(&[outcome]);
        }
        must(
            m.registry
                .register(Box::new(m.mirror_wait_duration.clone())),
        );
        let _ = m.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_bounded() {
        assert_eq!(method_label("GET"), "GET");
        assert_eq!(method_label("HEAD"), "HEAD");
        for m in ["get", "POST", "BREW", &"X".repeat(10_000)] {
            assert_eq!(method_label(m), "other");
        }
        let labels = RegistryLabels::default();
        labels.add_known(["docker.io", "ghcr.io"]);
        let mut values = HashSet::new();
        for i in 0..1000 {
            values.insert(labels.label(&format!("r{i}.example")));
        }
        values.insert(labels.label(&"a".repeat(10_000)));
        assert_eq!(values.len(), MAX_REQUESTED_REGISTRY_LABELS + 1);
        assert!(values.contains(OTHER_REGISTRY));
        // Known registries keep their own value even once the requested slots are full.
        assert_eq!(labels.label("ghcr.io"), "ghcr.io");
        assert_eq!(labels.label("r0.example"), "r0.example");
    }

    #[test]
    fn names_and_labels() {
        let m = global();
        m.mirror_requests_total
            .with_label_values(&["docker.io", "hit"])
            .inc();
        m.http_response_size
            .with_label_values(&["/v2/*", "GET", "200"])
            .observe(2048.0);
        m.advertised_image_tags
            .with_label_values(&["docker.io"])
            .set(1.0);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(
            text.contains(r#"spegel_mirror_requests_total{cache="hit",registry="docker.io"}"#),
            "{text}"
        );
        assert!(text.contains(r#"http_response_size_bytes_bucket{code="200",handler="/v2/*",method="GET",le="1024"} 0"#));
        assert!(text.contains(r#"le="2000000000""#), "{text}");
        assert!(text.contains(r#"spegel_advertised_image_tags{registry="docker.io"} 1"#));
        // Exported from the start (0 until the probes load).
        assert!(text.contains("\nspegel_ebpf_enabled "), "{text}");
    }
}
