//! Prometheus metrics, with the original's names and labels (§5).

use std::sync::LazyLock;

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
    /// `spegel_visualize_events_total`: requests recorded for `/visualize` (0 while it is off).
    pub visualize_events_total: IntCounter,
}

/// `path` label: content read from containerd's content directory (bodies go out with sendfile).
pub const CONTENT_PATH_FILE: &str = "file";
/// `path` label: content streamed through containerd's content API (a userspace copy).
pub const CONTENT_PATH_STREAM: &str = "stream";

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
                ),
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
            ebpf_enabled: must(IntGauge::new(
                "spegel_ebpf_enabled",
                "Whether the eBPF telemetry probes are loaded (1) or not (0).",
            )),
            visualize_events_total: must(IntCounter::new(
                "spegel_visualize_events_total",
                "Requests recorded for the visualize page.",
            )),
            registry,
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
        must(m.registry.register(Box::new(m.peer_rtt.clone())));
        must(m.registry.register(Box::new(m.peer_min_rtt.clone())));
        must(
            m.registry
                .register(Box::new(m.peer_retransmits_total.clone())),
        );
        must(m.registry.register(Box::new(m.peer_throughput.clone())));
        must(m.registry.register(Box::new(m.ebpf_enabled.clone())));
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
