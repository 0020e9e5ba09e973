//! Prometheus metrics (`metrics_listen` in config.toml; off by default): the OpenMetrics text
//! of a `prometheus-client` registry, served at `/metrics` by `tiny_http` on its own thread.
//!
//! Counters: migrations started and ended (by role, backend and outcome), refusals (by abort
//! code: an order or an attestation refused, ...), record failures by kind (`tamper`, `replay`
//! for a record again or late, `gap` for one early after others were dropped or held back,
//! `cut`: the data plane's refusals, told apart by the words of the error that the adversarial
//! tests pin), bytes sent and pre-copy rounds. Histograms: downtime, total time,
//! TPM quote latency. Gauges, read from the agent at each scrape: migrations being sent,
//! received, queued and in doubt; QEMU VMs whose give-back is retried in the background, and
//! VMs left to the operator (what `status` says "left to the operator" of: alert on it).

use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::error::AgentError;

type Labels = Vec<(&'static str, String)>;

/// The agent's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    started: Family<Labels, Counter>,
    ended: Family<Labels, Counter>,
    refusals: Family<Labels, Counter>,
    record_failures: Family<Labels, Counter>,
    bytes_sent: Counter,
    rounds: Counter,
    downtime: Histogram,
    total: Histogram,
    tpm_quote: Histogram,
    /// Migrations being received.
    pub receiving: Gauge<i64, AtomicI64>,
    sending: Gauge<i64, AtomicI64>,
    queued: Gauge<i64, AtomicI64>,
    in_doubt: Gauge<i64, AtomicI64>,
    giving_back: Gauge<i64, AtomicI64>,
    left_to_operator: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("trustmig");
        let m = Self {
            registry: Mutex::new(Registry::default()),
            started: Family::default(),
            ended: Family::default(),
            refusals: Family::default(),
            record_failures: Family::default(),
            bytes_sent: Counter::default(),
            rounds: Counter::default(),
            downtime: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            total: Histogram::new(exponential_buckets(0.1, 2.0, 14)),
            tpm_quote: Histogram::new(exponential_buckets(0.001, 2.0, 12)),
            receiving: Gauge::default(),
            sending: Gauge::default(),
            queued: Gauge::default(),
            in_doubt: Gauge::default(),
            giving_back: Gauge::default(),
            left_to_operator: Gauge::default(),
        };
        r.register(
            "migrations_started",
            "Migrations started, by role and backend",
            m.started.clone(),
        );
        r.register(
            "migrations_ended",
            "Migrations ended, by role, backend and outcome",
            m.ended.clone(),
        );
        r.register(
            "refusals",
            "Orders, sessions and attestations refused, by abort code",
            m.refusals.clone(),
        );
        r.register(
            "record_failures",
            "Data-plane records refused, by kind",
            m.record_failures.clone(),
        );
        r.register(
            "bytes_sent",
            "Bytes sent on the wire by migrations this agent sent",
            m.bytes_sent.clone(),
        );
        r.register(
            "precopy_rounds",
            "Pre-copy rounds of migrations this agent sent",
            m.rounds.clone(),
        );
        r.register(
            "downtime_seconds",
            "Guest downtime of migrations this agent sent",
            m.downtime.clone(),
        );
        r.register(
            "migration_seconds",
            "Total time of migrations this agent sent",
            m.total.clone(),
        );
        r.register(
            "tpm_quote_seconds",
            "TPM quote latency",
            m.tpm_quote.clone(),
        );
        r.register(
            "migrations_sending",
            "Migrations being sent",
            m.sending.clone(),
        );
        r.register(
            "migrations_receiving",
            "Migrations being received",
            m.receiving.clone(),
        );
        r.register(
            "migrations_queued",
            "Orders waiting for a free slot",
            m.queued.clone(),
        );
        r.register(
            "migrations_in_doubt",
            "Orders in doubt, their destination being asked",
            m.in_doubt.clone(),
        );
        r.register(
            "vms_giving_back",
            "VMs rolled back whose cont QEMU refused for now, retried in the background",
            m.giving_back.clone(),
        );
        r.register(
            "vms_left_to_operator",
            "VMs left to the operator (trustmig status says what is left; trustmig reconcile once seen to)",
            m.left_to_operator.clone(),
        );
        *m.registry.lock().expect("registry lock") = r;
        m
    }

    /// A migration started.
    pub fn started(&self, role: &str, backend: &str) {
        let l = vec![("role", role.to_string()), ("backend", backend.to_string())];
        self.started.get_or_create(&l).inc();
    }

    /// A migration ended with `outcome` (`done`, `rolled-back`, `in-doubt`, `moved`,
    /// `discarded`, ...); its error, if any, counts as a record failure when it is one.
    pub fn ended(&self, role: &str, backend: &str, outcome: &str, error: Option<&AgentError>) {
        let l = vec![
            ("role", role.to_string()),
            ("backend", backend.to_string()),
            ("outcome", outcome.to_string()),
        ];
        self.ended.get_or_create(&l).inc();
        if let Some(kind) = error.and_then(record_failure) {
            self.record_failures
                .get_or_create(&vec![("kind", kind.to_string())])
                .inc();
        }
    }

    /// Something was refused before a migration started.
    pub fn refused(&self, e: &AgentError) {
        let code = format!("{:?}", e.abort_code());
        self.refusals.get_or_create(&vec![("code", code)]).inc();
    }

    /// A migration this agent sent finished.
    pub fn sent(&self, s: &crate::control::Summary) {
        self.bytes_sent.inc_by(s.bytes_on_wire);
        self.rounds.inc_by(u64::from(s.rounds));
        self.downtime.observe(s.downtime_ms as f64 / 1000.0);
        self.total.observe(s.total_ms as f64 / 1000.0);
    }

    /// A TPM quote took `secs`.
    pub fn quoted(&self, secs: f64) {
        self.tpm_quote.observe(secs);
    }

    /// The OpenMetrics text, with the gauges read from `ctx` now.
    pub fn render(&self, ctx: &crate::ctx::Ctx) -> String {
        self.sending.set(ctx.sending() as i64);
        self.queued
            .set(ctx.queued.lock().expect("queue lock").len() as i64);
        self.in_doubt
            .set(ctx.in_doubt.lock().expect("in-doubt lock").len() as i64);
        self.giving_back
            .set(ctx.resuming.lock().expect("resuming lock").len() as i64);
        self.left_to_operator.set(ctx.left_count() as i64);
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry.lock().expect("registry lock"));
        out
    }
}

/// What kind of data-plane refusal ended a migration, from its error's words (SPEC.md §7.4:
/// strict sequence numbers tell a record that comes again or late, `replay`, from one that
/// comes early because others were dropped or held back, `gap`).
fn record_failure(e: &AgentError) -> Option<&'static str> {
    let t = e.to_string();
    if t.contains("tampered") {
        Some("tamper")
    } else if t.contains("replayed or reordered") {
        Some("replay")
    } else if t.contains("records dropped") {
        Some("gap")
    } else if t.contains(crate::error::CUT) {
        Some("cut")
    } else {
        None
    }
}

/// Bind the metrics address (at start, before the agent says it is ready: an address in use is
/// a configuration error that stops the start).
pub fn bind(addr: &str, config: &std::path::Path) -> Result<tiny_http::Server, AgentError> {
    tiny_http::Server::http(addr).map_err(|e| AgentError::BadConfig {
        path: config.to_path_buf(),
        reason: format!("metrics_listen = {addr:?}: {e}"),
    })
}

/// Serve `/metrics` from `server` on a thread of its own, for the life of the process.
pub fn serve(ctx: Arc<crate::ctx::Ctx>, server: tiny_http::Server) -> Result<(), AgentError> {
    info!(addr = %server.server_addr(), "metrics at /metrics");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let resp = if req.url() == "/metrics" {
                    let header = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                    )
                    .expect("static header");
                    tiny_http::Response::from_string(ctx.metrics.render(&ctx)).with_header(header)
                } else {
                    tiny_http::Response::from_string("not found: /metrics only\n")
                        .with_status_code(404)
                };
                if let Err(e) = req.respond(resp) {
                    warn!("metrics: {e}");
                }
            }
        })
        .map_err(AgentError::io("metrics thread"))?;
    Ok(())
}

/// An attester that times its quotes into the metrics.
pub struct TimedAttester<A> {
    inner: A,
    metrics: Arc<Metrics>,
}

impl<A> TimedAttester<A> {
    /// Wrap `inner`.
    pub fn new(inner: A, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    /// The attester underneath.
    pub fn inner(&mut self) -> &mut A {
        &mut self.inner
    }
}

impl<A: trustmig_protocol::attestation::Attester> trustmig_protocol::attestation::Attester
    for TimedAttester<A>
{
    fn extend(
        &mut self,
        m: &trustmig_protocol::attestation::Measurement,
    ) -> Result<(), trustmig_protocol::attestation::AttestationError> {
        self.inner.extend(m)
    }

    fn quote(
        &mut self,
        qualifying_data: &trustmig_protocol::Digest,
    ) -> Result<Vec<u8>, trustmig_protocol::attestation::AttestationError> {
        let t = std::time::Instant::now();
        let r = self.inner.quote(qualifying_data);
        self.metrics.quoted(t.elapsed().as_secs_f64());
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Link;
    use trustmig_protocol::record::RecordError;

    /// Every kind the README lists is told from the words of the error that ends a migration
    /// so (the record layer's own, and a stream cut on either backend); anything else is none.
    #[test]
    fn record_failures_are_told_by_kind() {
        let kinds: Vec<Option<&str>> = [
            AgentError::from(RecordError::BadTag { seq: 5 }),
            RecordError::Replayed {
                got: 5,
                expected: 6,
            }
            .into(),
            RecordError::Gap {
                got: 6,
                expected: 5,
            }
            .into(),
            AgentError::transport(Link::Data(1), crate::error::CUT),
            // The QEMU pumps' shape of it.
            AgentError::Migration(format!(
                "QEMU's migration stream: data stream {}",
                crate::error::CUT
            )),
            AgentError::transport(Link::Data(1), "connection lost"),
        ]
        .iter()
        .map(record_failure)
        .collect();
        assert_eq!(
            kinds,
            [
                Some("tamper"),
                Some("replay"),
                Some("gap"),
                Some("cut"),
                Some("cut"),
                None
            ]
        );
    }
}
