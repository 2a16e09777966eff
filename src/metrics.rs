//! The proxy's Prometheus metrics, registered once on one registry that the admin server exposes.
//!
//! Labels stay bounded: directions, destinations (host:port, later service names), standard methods,
//! status codes and error reasons; never raw paths or ids.

use prometheus::{
    Counter, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Latency buckets in seconds: fine below a millisecond (the proxy's own cost), coarse above a second.
/// Telemetry reports carry these bounds; the control plane checks they match its own.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Which side of the pod a connection belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the app to other services.
    Outbound,
    /// From other services to the app.
    Inbound,
}

impl Direction {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Every data-path metric of the proxy.
#[derive(Clone)]
pub struct Metrics {
    /// Requests by direction, destination, method, status code, whether they travelled over mTLS, and the
    /// peer sidecar's identity (the server's on outbound, the caller's on inbound; empty for plaintext).
    pub requests: IntCounterVec,
    /// Time from receiving a request to sending the response head.
    pub request_duration: HistogramVec,
    /// Opaque TCP connections opened, by direction, destination, whether they travelled over mTLS and the
    /// peer sidecar's identity (as for requests).
    pub tcp_opened: IntCounterVec,
    /// Opaque TCP connections closed, with the labels of `tcp_opened`.
    pub tcp_closed: IntCounterVec,
    /// Opaque TCP connections open now.
    pub tcp_open: IntGaugeVec,
    /// Opaque TCP bytes by flow.
    pub tcp_bytes: IntCounterVec,
    /// Protocols found by detection.
    pub protocols: IntCounterVec,
    /// Answers the proxy made itself, by reason.
    pub errors: IntCounterVec,
    process: ProcessMetrics,
}

impl Metrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "meshlet_requests_total",
                "HTTP requests handled, by response status",
            ),
            &[
                "direction",
                "destination",
                "method",
                "status_code",
                "tls",
                "peer_identity",
            ],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "meshlet_request_duration_seconds",
                "Time until the response head was sent",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["direction", "destination"],
        )?;
        let tcp_opened = IntCounterVec::new(
            Opts::new(
                "meshlet_tcp_connections_opened_total",
                "Opaque TCP connections opened",
            ),
            &["direction", "destination", "tls", "peer_identity"],
        )?;
        let tcp_closed = IntCounterVec::new(
            Opts::new(
                "meshlet_tcp_connections_closed_total",
                "Opaque TCP connections closed",
            ),
            &["direction", "destination", "tls", "peer_identity"],
        )?;
        let tcp_open = IntGaugeVec::new(
            Opts::new(
                "meshlet_tcp_open_connections",
                "Opaque TCP connections open",
            ),
            &["direction"],
        )?;
        let tcp_bytes = IntCounterVec::new(
            Opts::new(
                "meshlet_tcp_bytes_total",
                "Bytes proxied over opaque TCP connections",
            ),
            &["direction", "destination", "flow"],
        )?;
        let protocols = IntCounterVec::new(
            Opts::new(
                "meshlet_protocol_detected_total",
                "Accepted connections by detected protocol",
            ),
            &["direction", "protocol"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "meshlet_proxy_errors_total",
                "Responses or closes made by the proxy itself, by reason",
            ),
            &["direction", "reason"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(tcp_opened.clone()))?;
        registry.register(Box::new(tcp_closed.clone()))?;
        registry.register(Box::new(tcp_open.clone()))?;
        registry.register(Box::new(tcp_bytes.clone()))?;
        registry.register(Box::new(protocols.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        let process = ProcessMetrics::new(registry)?;
        // Every direction shows up from the start, so dashboards have a series before the first connection.
        for direction in [Direction::Outbound, Direction::Inbound] {
            tcp_open.with_label_values(&[direction.as_str()]);
        }
        Ok(Self {
            requests,
            request_duration,
            tcp_opened,
            tcp_closed,
            tcp_open,
            tcp_bytes,
            protocols,
            errors,
            process,
        })
    }

    /// Refreshes values read at scrape time (process CPU, memory, file descriptors).
    pub fn refresh(&self) {
        self.process.refresh();
    }

    /// Counts an answer the proxy made itself.
    pub fn proxy_error(&self, direction: Direction, reason: &str) {
        self.errors
            .with_label_values(&[direction.as_str(), reason])
            .inc();
    }
}

/// Standard `process_*` metrics from /proc, so the resources dashboard works without node exporters.
/// The control plane registers them too.
#[derive(Clone)]
pub struct ProcessMetrics {
    cpu_seconds: Counter,
    resident_memory: IntGauge,
    open_fds: IntGauge,
}

impl ProcessMetrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let cpu_seconds = Counter::new(
            "process_cpu_seconds_total",
            "User and system CPU time spent in seconds",
        )?;
        let resident_memory = IntGauge::new(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
        )?;
        let open_fds = IntGauge::new("process_open_fds", "Number of open file descriptors")?;
        registry.register(Box::new(cpu_seconds.clone()))?;
        registry.register(Box::new(resident_memory.clone()))?;
        registry.register(Box::new(open_fds.clone()))?;
        let this = Self {
            cpu_seconds,
            resident_memory,
            open_fds,
        };
        this.refresh();
        Ok(this)
    }

    /// Reads /proc again; call it at scrape time.
    pub fn refresh(&self) {
        if let Some(cpu) = read_cpu_seconds() {
            let delta = cpu - self.cpu_seconds.get();
            if delta > 0.0 {
                self.cpu_seconds.inc_by(delta);
            }
        }
        if let Some(rss) = read_rss_bytes() {
            self.resident_memory.set(rss);
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as i64);
        }
    }
}

fn read_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a constant of the C library.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) / ticks as f64)
}

fn read_rss_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a constant of the C library.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page as i64)
}

/// The method label: standard methods by name, anything else as `OTHER` so labels stay bounded.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::PATCH => "PATCH",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_reads_process_metrics() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        metrics.refresh();
        assert!(metrics.process.resident_memory.get() > 0);
        assert!(metrics.process.open_fds.get() > 0);
        assert_eq!(
            method_label(&http::Method::from_bytes(b"PURGE").unwrap()),
            "OTHER"
        );
    }
}
