//! The Prometheus metrics: names, labels and help texts are part of the
//! operator interface (docs/metrics.md). Event counters are bumped where the
//! events happen; state gauges are refreshed from the site at each scrape.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// NBD commands, for the latency histogram's `command` label.
pub const NBD_COMMANDS: [&str; 5] = ["read", "write", "flush", "trim", "write_zeroes"];
/// Traffic kinds, for the wire byte counters' `kind` label.
pub const KINDS: [&str; 3] = ["chunk", "journal", "control"];

pub struct Metrics {
    pub registry: Registry,
    pub build_info: IntGaugeVec,
    pub link_up: IntGaugeVec,
    pub link_rtt_seconds: GaugeVec,
    pub link_udp_payload_bytes: IntGaugeVec,
    pub bytes_read: IntCounterVec,
    pub wire_sent_bytes: IntCounterVec,
    pub wire_received_bytes: IntCounterVec,
    pub chunks_sent: IntCounterVec,
    pub chunks_deduplicated: IntCounterVec,
    pub chunks_zero_skipped: IntCounterVec,
    pub compression_ratio: GaugeVec,
    pub store_bytes: IntGauge,
    pub store_chunks: IntGauge,
    pub store_delta_chunks: IntGauge,
    pub recovery_points: IntGaugeVec,
    pub recovery_point_age_seconds: GaugeVec,
    pub rpo_target_seconds: GaugeVec,
    pub lag_seconds: GaugeVec,
    pub lag_bytes: IntGaugeVec,
    pub journal_bytes: IntGaugeVec,
    pub resync_scan_chunks: IntGaugeVec,
    pub journal_bytes_max: IntGaugeVec,
    pub volume_role: IntGaugeVec,
    pub volume_epoch: IntGaugeVec,
    pub volume_consistent: IntGaugeVec,
    pub volume_mode: IntGaugeVec,
    pub volume_size_bytes: IntGaugeVec,
    pub passes: IntCounterVec,
    pub pass_duration_seconds: HistogramVec,
    pub nbd_request_seconds: HistogramVec,
    pub flush_seconds: HistogramVec,
    pub journal_checkpoints: IntCounterVec,
    pub drills: IntCounterVec,
    pub last_successful_drill_timestamp: GaugeVec,
    pub failovers: IntCounterVec,
    pub verify_runs: IntCounterVec,
    pub verify_mismatch_bytes: IntGaugeVec,
    pub scrub_runs: IntCounterVec,
    pub scrub_unrepaired: IntGaugeVec,
    pub split_brain: IntGaugeVec,
    pub sync_degraded: IntGaugeVec,
    pub image_io_error: IntGaugeVec,
    pub rpo_zero: IntGaugeVec,
    pub volume_created_timestamp: GaugeVec,
    pub job_errors: IntCounterVec,
    pub job_failing: IntGaugeVec,
    pub gc_deleted_chunks: prometheus::IntCounter,
    pub gc_failures: prometheus::IntCounter,
    pub store_reclaimed_bytes: prometheus::IntCounter,
    pub link_limit_bytes: IntGauge,
    pub link_throttled_seconds: prometheus::Counter,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definition");
                r.register(Box::new(m.clone()))
                    .expect("metric registration");
                m
            }};
        }
        let latency = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5,
        ];
        let m = Metrics {
            build_info: reg!(IntGaugeVec::new(opts("ferry_build_info", "Always 1; the version in a label."), &["version"])),
            link_up: reg!(IntGaugeVec::new(opts("ferry_link_up", "1 while the QUIC link to the peer is connected."), &["peer"])),
            link_rtt_seconds: reg!(GaugeVec::new(opts("ferry_link_rtt_seconds", "Smoothed round-trip time of the link."), &["peer"])),
            link_udp_payload_bytes: reg!(IntGaugeVec::new(opts("ferry_link_udp_payload_bytes", "The largest UDP payload the link's path was found to carry (QUIC path MTU discovery)."), &["peer"])),
            bytes_read: reg!(IntCounterVec::new(opts("ferry_read_bytes_total", "Bytes read from volume images by replication passes."), &["volume"])),
            wire_sent_bytes: reg!(IntCounterVec::new(
                opts("ferry_wire_sent_bytes_total", "Bytes this site wrote to the link's streams, by kind (chunk, journal, control)."),
                &["peer", "kind"]
            )),
            wire_received_bytes: reg!(IntCounterVec::new(
                opts("ferry_wire_received_bytes_total", "Bytes this site read from the link's streams, by kind (chunk, journal, control)."),
                &["peer", "kind"]
            )),
            chunks_sent: reg!(IntCounterVec::new(opts("ferry_chunks_sent_total", "Chunks sent to the DR site, whole or as 4 KiB block deltas."), &["volume", "how"])),
            chunks_deduplicated: reg!(IntCounterVec::new(
                opts("ferry_chunks_deduplicated_total", "Non-zero chunks not sent because the DR store held them (or an equal chunk)."),
                &["volume"]
            )),
            chunks_zero_skipped: reg!(IntCounterVec::new(opts("ferry_chunks_zero_skipped_total", "All-zero chunks: never hashed, stored or sent."), &["volume"])),
            compression_ratio: reg!(GaugeVec::new(
                opts("ferry_compression_ratio", "Raw bytes over encoded bytes of the chunks the last pass sent (1 when it sent none)."),
                &["volume"]
            )),
            store_bytes: reg!(IntGauge::with_opts(opts("ferry_store_chunk_bytes", "Bytes the store's chunk records take (RocksDB estimate)."))),
            store_chunks: reg!(IntGauge::with_opts(opts("ferry_store_chunks", "Chunks in the store (RocksDB estimate)."))),
            store_delta_chunks: reg!(IntGauge::with_opts(opts("ferry_store_delta_chunks", "Chunks the store keeps as the blocks that differ from a base chunk (RocksDB estimate)."))),
            recovery_points: reg!(IntGaugeVec::new(opts("ferry_recovery_points", "Recovery points held for the volume at the DR site."), &["volume"])),
            recovery_point_age_seconds: reg!(GaugeVec::new(
                opts("ferry_recovery_point_age_seconds", "Age of the newest recovery point: the RPO a failover would give now."),
                &["volume"]
            )),
            rpo_target_seconds: reg!(GaugeVec::new(opts("ferry_rpo_target_seconds", "The volume's RPO target (volume add --rpo-target)."), &["volume"])),
            lag_seconds: reg!(GaugeVec::new(
                opts("ferry_replication_lag_seconds", "Age of the oldest write not yet durable at the DR site (snapshot mode: since the last completed pass began)."),
                &["volume"]
            )),
            lag_bytes: reg!(IntGaugeVec::new(
                opts("ferry_replication_lag_bytes", "Bytes known changed but not yet at the DR site (snapshot mode: still to send in the running pass)."),
                &["volume"]
            )),
            journal_bytes: reg!(IntGaugeVec::new(opts("ferry_journal_bytes", "Bytes in the volume's write journal (0 in snapshot mode, which has none)."), &["volume"])),
            resync_scan_chunks: reg!(IntGaugeVec::new(opts("ferry_resync_scan_chunks", "Continuous primaries: the chunks the next resync's scan reads, those written since the last scan; every chunk of the volume when there is no map (no scan yet in this run, a crash, a failed fsync, ferry sync)."), &["volume"])),
            journal_bytes_max: reg!(IntGaugeVec::new(opts("ferry_journal_bytes_max", "The journal's limit, journal_bytes_max (0 in snapshot mode)."), &["volume"])),
            volume_role: reg!(IntGaugeVec::new(opts("ferry_volume_role", "1 for the volume's role at this site (primary or replica)."), &["volume", "role"])),
            volume_epoch: reg!(IntGaugeVec::new(opts("ferry_volume_epoch", "The volume's epoch, raised by every promotion."), &["volume"])),
            volume_consistent: reg!(IntGaugeVec::new(
                opts("ferry_volume_consistent", "1 when the replica image is a crash-consistent state; 0 while it is being applied or resynced."),
                &["volume"]
            )),
            volume_mode: reg!(IntGaugeVec::new(opts("ferry_volume_mode", "1 for the volume's replication mode."), &["volume", "mode"])),
            volume_size_bytes: reg!(IntGaugeVec::new(opts("ferry_volume_size_bytes", "Size of the volume."), &["volume"])),
            passes: reg!(IntCounterVec::new(opts("ferry_passes_total", "Replication passes, by result (ok, failed, link_down: not attempted because the link was down)."), &["volume", "result"])),
            pass_duration_seconds: reg!(HistogramVec::new(
                HistogramOpts::new("ferry_pass_duration_seconds", "Duration of completed replication passes.")
                    .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0]),
                &["volume"]
            )),
            nbd_request_seconds: reg!(HistogramVec::new(
                HistogramOpts::new("ferry_nbd_request_duration_seconds", "NBD request latency, by command (async and sync volumes).").buckets(latency.clone()),
                &["volume", "command"]
            )),
            flush_seconds: reg!(HistogramVec::new(
                HistogramOpts::new("ferry_flush_duration_seconds", "Flush latency in sync mode: until every earlier write is durable at the DR site.").buckets(latency),
                &["volume"]
            )),
            journal_checkpoints: reg!(IntCounterVec::new(opts("ferry_journal_checkpoints_total", "Flush records the primary added to a continuous volume's journal after a client wrote an eighth of the journal (at most 4 MiB) without flushing, so that the DR side could apply and trim its redo log."), &["volume"])),
            drills: reg!(IntCounterVec::new(opts("ferry_drills_total", "Failover drills, by result (passed, failed, aborted)."), &["volume", "result"])),
            last_successful_drill_timestamp: reg!(GaugeVec::new(
                opts("ferry_last_drill_success_timestamp_seconds", "Unix time of the last passed drill (0: never)."),
                &["volume"]
            )),
            failovers: reg!(IntCounterVec::new(opts("ferry_failovers_total", "Failovers, by kind (planned, forced, failback; asserted: a primary cut off from its peer asserted it stays primary)."), &["volume", "kind"])),
            verify_runs: reg!(IntCounterVec::new(opts("ferry_verify_runs_total", "ferry verify runs, by result (in_sync, differs, error)."), &["volume", "result"])),
            verify_mismatch_bytes: reg!(IntGaugeVec::new(
                opts("ferry_verify_mismatch_bytes", "Bytes in differing ranges found by the last verify (0 when in sync)."),
                &["volume"]
            )),
            scrub_runs: reg!(IntCounterVec::new(
                opts("ferry_scrub_runs_total", "ferry scrub runs, by result (clean; repaired: damage found and put back from the image; damaged: damage remains; error)."),
                &["volume", "result"]
            )),
            scrub_unrepaired: reg!(IntGaugeVec::new(
                opts("ferry_scrub_unrepaired_objects", "Damaged or missing chunks and nodes the last scrub could not put back (0 when every point reads back whole)."),
                &["volume"]
            )),
            split_brain: reg!(IntGaugeVec::new(opts("ferry_split_brain", "1 while the volume's histories at the two sites have forked."), &["volume"])),
            image_io_error: reg!(IntGaugeVec::new(
                opts("ferry_image_io_error", "1 while an fsync of the primary's image failed and the writes it covered are not yet written again (flushes fail if they cannot be)."),
                &["volume"]
            )),
            sync_degraded: reg!(IntGaugeVec::new(
                opts("ferry_sync_degraded", "1 while a sync volume runs as async because the DR site was unreachable for longer than its flush wait."),
                &["volume"]
            )),
            rpo_zero: reg!(IntGaugeVec::new(
                opts("ferry_rpo_zero_in_force", "Sync volumes: 1 while every acknowledged flush is durable at the DR site; 0 while a seed or resync runs or the volume runs degraded."),
                &["volume"]
            )),
            volume_created_timestamp: reg!(GaugeVec::new(
                opts("ferry_volume_created_timestamp_seconds", "Unix time the volume was added (primary) or its replica created (DR site)."),
                &["volume"]
            )),
            job_errors: reg!(IntCounterVec::new(
                opts("ferry_job_errors_total", "Errors (panics included) of background jobs, by job and volume (empty for site-wide jobs); each is logged and retried."),
                &["job", "volume"]
            )),
            job_failing: reg!(IntGaugeVec::new(
                opts("ferry_job_failing", "1 while a background job's last run ended in an error and it waits to run again."),
                &["job", "volume"]
            )),
            gc_deleted_chunks: reg!(prometheus::IntCounter::with_opts(opts(
                "ferry_gc_deleted_chunks_total",
                "Chunks deleted by garbage collection after recovery points were pruned."
            ))),
            gc_failures: reg!(prometheus::IntCounter::with_opts(opts(
                "ferry_gc_failures_total",
                "Garbage collections, or reclaims of the disk space they freed, that failed."
            ))),
            store_reclaimed_bytes: reg!(prometheus::IntCounter::with_opts(opts(
                "ferry_store_reclaimed_bytes_total",
                "Bytes of the store's chunk files given back to the disk after garbage collections."
            ))),
            link_limit_bytes: reg!(IntGauge::with_opts(opts(
                "ferry_link_limit_bytes_per_second",
                "The bandwidth limit on what this site sends to its peer (limits.link_bytes_per_s_max or `ferry link limit`); 0: none."
            ))),
            link_throttled_seconds: reg!(prometheus::Counter::with_opts(opts(
                "ferry_link_throttled_seconds_total",
                "Seconds senders to the peer have waited for the bandwidth limit since the daemon started (summed over concurrent senders)."
            ))),
            registry: r,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// Makes every per-volume series exist (at zero), so that dashboards and
    /// alerts see a volume from its first scrape, not from its first event.
    pub fn touch_volume(&self, volume: &str, primary: bool) {
        for kind in ["whole", "delta"] {
            self.chunks_sent.with_label_values(&[volume, kind]);
        }
        self.chunks_deduplicated.with_label_values(&[volume]);
        self.chunks_zero_skipped.with_label_values(&[volume]);
        self.bytes_read.with_label_values(&[volume]);
        for r in ["ok", "failed", "link_down"] {
            self.passes.with_label_values(&[volume, r]);
        }
        self.pass_duration_seconds.with_label_values(&[volume]);
        for r in ["passed", "failed", "aborted"] {
            self.drills.with_label_values(&[volume, r]);
        }
        for k in ["planned", "forced", "failback", "asserted"] {
            self.failovers.with_label_values(&[volume, k]);
        }
        for r in ["in_sync", "differs", "error"] {
            self.verify_runs.with_label_values(&[volume, r]);
        }
        for r in ["clean", "repaired", "damaged", "error"] {
            self.scrub_runs.with_label_values(&[volume, r]);
        }
        self.scrub_unrepaired.with_label_values(&[volume]);
        if primary {
            for c in NBD_COMMANDS {
                self.nbd_request_seconds.with_label_values(&[volume, c]);
            }
            self.flush_seconds.with_label_values(&[volume]);
            self.journal_checkpoints.with_label_values(&[volume]);
        }
    }

    pub fn touch_peer(&self, peer: &str) {
        for k in KINDS {
            self.wire_sent_bytes.with_label_values(&[peer, k]);
            self.wire_received_bytes.with_label_values(&[peer, k]);
        }
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
