//! Reading an agent's Prometheus metrics (`metrics_listen`) in tests.

use std::time::{Duration, Instant};

/// GET /metrics from `addr` (a plain HTTP/1.0 request; the agent serves it with tiny_http).
/// Panics on anything but a 200.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics connect");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .expect("metrics request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("metrics reply");
    assert!(
        out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200"),
        "{out}"
    );
    out
}

/// Scrape `addr` until the sample `name` reads `want` (the agent records a session's end
/// after its peer may have seen it), within 10 s; returns that scrape.
pub fn scrape_until(addr: &str, name: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(addr);
        if sample(&m, name) == want {
            return m;
        }
        assert!(Instant::now() < deadline, "{name} never {want}: {m}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of the sample `name` (with its labels as printed) in `text`, 0 when absent.
pub fn sample(text: &str, name: &str) -> f64 {
    (text.lines())
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}
