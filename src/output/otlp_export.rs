//! Sending OTLP profiles to an OpenTelemetry Collector: OTLP/HTTP with protobuf bodies, POSTed to
//! `/v1development/profiles`.
//!
//! The caller never waits for the network: [`Exporter::submit`] puts an encoded request in a
//! bounded queue (full: the oldest is dropped and counted) and a worker thread sends it, retrying
//! what the OTLP specification calls retryable (no connection, 429, 502, 503, 504) with
//! exponential backoff. `perfpy record` submits once and closes with a deadline; a continuous
//! agent submits once per interval and reads [`Exporter::stats`] to report what was dropped.
//!
//! Configuration follows the OpenTelemetry SDKs (see [`Config::resolve`]).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use opentelemetry_proto::tonic::collector::profiles::v1development::{
    ExportProfilesServiceRequest, ExportProfilesServiceResponse,
};
use prost14::Message;

/// The path of the profiles signal under an OTLP/HTTP base URL.
pub const PROFILES_PATH: &str = "v1development/profiles";
const DEFAULT_BASE: &str = "http://localhost:4318";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests kept while the Collector is unreachable: at one request per interval, a few minutes
/// of an agent's profiles; the oldest go first.
pub const DEFAULT_QUEUE: usize = 16;
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// How long one request is retried before it is dropped.
const RETRY_FOR: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The full URL requests are POSTed to.
    pub url: String,
    pub headers: Vec<(String, String)>,
    /// Per request.
    pub timeout: Duration,
    pub gzip: bool,
    /// PEM file of the CA certificates that sign the Collector's certificate (https only).
    pub ca_file: Option<String>,
}

impl Config {
    /// The configuration from `--otlp-endpoint` and the environment, as the OpenTelemetry SDKs
    /// read it: an explicit endpoint wins, then `OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT` (the full
    /// URL, used as given), then `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL to which
    /// `/v1development/profiles` is appended), then `http://localhost:4318`. An explicit endpoint
    /// is a base URL too, unless it already ends in `/v1development/profiles`. Headers
    /// (`key=value,...`, values percent-encoded) from `OTEL_EXPORTER_OTLP_HEADERS`, overridden key
    /// by key by `OTEL_EXPORTER_OTLP_PROFILES_HEADERS`; likewise `..._TIMEOUT` (milliseconds),
    /// `..._COMPRESSION` (`gzip` or `none`) and `..._CERTIFICATE`.
    pub fn resolve(endpoint: Option<&str>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| {
            env(&format!("OTEL_EXPORTER_OTLP_PROFILES_{name}"))
                .or_else(|| env(&format!("OTEL_EXPORTER_OTLP_{name}")))
                .filter(|v| !v.trim().is_empty())
        };
        let url = match endpoint.filter(|e| !e.is_empty()) {
            Some(e) if e.trim_end_matches('/').ends_with(PROFILES_PATH) => e.to_string(),
            Some(e) => signal_url(e),
            None => match env("OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT").filter(|v| !v.is_empty()) {
                Some(u) => u,
                None => signal_url(
                    &env("OTEL_EXPORTER_OTLP_ENDPOINT")
                        .filter(|v| !v.is_empty())
                        .unwrap_or_else(|| DEFAULT_BASE.to_string()),
                ),
            },
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("OTLP endpoint '{url}' is not an http:// or https:// URL: give the Collector's OTLP/HTTP address, e.g. http://localhost:4318");
        }
        let mut headers = parse_headers(env("OTEL_EXPORTER_OTLP_HEADERS").as_deref())
            .context("OTEL_EXPORTER_OTLP_HEADERS")?;
        for (k, v) in parse_headers(env("OTEL_EXPORTER_OTLP_PROFILES_HEADERS").as_deref())
            .context("OTEL_EXPORTER_OTLP_PROFILES_HEADERS")?
        {
            headers.retain(|(k2, _)| !k2.eq_ignore_ascii_case(&k));
            headers.push((k, v));
        }
        let timeout = match get("TIMEOUT") {
            Some(ms) => Duration::from_millis(ms.trim().parse().map_err(|_| {
                anyhow::anyhow!(
                    "OTEL_EXPORTER_OTLP_(PROFILES_)TIMEOUT '{ms}' is not a number of milliseconds"
                )
            })?),
            None => DEFAULT_TIMEOUT,
        };
        let gzip = match get("COMPRESSION").as_deref().map(str::trim) {
            None | Some("none") => false,
            Some("gzip") => true,
            Some(other) => {
                bail!("OTEL_EXPORTER_OTLP_(PROFILES_)COMPRESSION '{other}': use gzip or none")
            }
        };
        Ok(Self {
            url,
            headers,
            timeout,
            gzip,
            ca_file: get("CERTIFICATE"),
        })
    }
}

fn signal_url(base: &str) -> String {
    format!("{}/{PROFILES_PATH}", base.trim_end_matches('/'))
}

/// `key1=value1,key2=value2`, values percent-encoded (the W3C baggage format the SDKs use).
fn parse_headers(s: Option<&str>) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for item in s.unwrap_or("").split(',').filter(|i| !i.trim().is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            bail!("header '{item}' is not key=value");
        };
        out.push((k.trim().to_string(), percent_decode(v.trim())));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What became of the requests so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub sent: u64,
    /// Dropped because the queue was full (the oldest go).
    pub dropped_queue: u64,
    /// Dropped after retrying, refused by the Collector, or left when the exporter closed.
    pub dropped_failed: u64,
    pub retries: u64,
    /// Profiles the Collector said it rejected in accepted requests (partial success).
    pub rejected_profiles: u64,
    pub last_error: Option<String>,
    /// Requests not sent yet: queued, or being sent (retried) now. Read by [`Exporter::stats`].
    pub pending: u64,
}

impl Stats {
    pub fn dropped(&self) -> u64 {
        self.dropped_queue + self.dropped_failed
    }
}

struct State {
    queue: VecDeque<Vec<u8>>,
    stats: Stats,
    /// The worker holds a request (sending or waiting to retry it).
    in_flight: bool,
    /// Set by `close`: send what is queued until then, drop the rest.
    deadline: Option<Instant>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    cap: usize,
}

pub struct Exporter {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    url: String,
}

struct Client {
    agent: ureq::Agent,
    cfg: Config,
}

enum Failure {
    Retry(String, Option<Duration>),
    Fatal(String),
}

impl Client {
    /// An empty request, as the Collector accepts it: finds a wrong address, a Collector
    /// without profiles, a missing token.
    fn probe(&self) -> Result<()> {
        let empty = ExportProfilesServiceRequest::default().encode_to_vec();
        match self.post(&empty, self.cfg.timeout) {
            Ok(_) => {}
            Err(Failure::Retry(m, _)) => bail!(
                "OTLP endpoint {} does not answer: {m}; check the address (--otlp-endpoint, OTEL_EXPORTER_OTLP_ENDPOINT) and that the Collector runs",
                self.cfg.url
            ),
            Err(Failure::Fatal(m)) => {
                bail!("OTLP endpoint {} does not take profiles: {m}", self.cfg.url)
            }
        }
        Ok(())
    }

    fn new(cfg: Config) -> Result<Self> {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading the OTLP CA certificate file {path}"))?;
            let certs = ureq::tls::parse_pem(&pem)
                .filter_map(|i| match i {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("{path}: not a PEM certificate file"))?;
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(cfg.timeout))
            .tls_config(tls.build())
            .build()
            .new_agent();
        Ok(Self { agent, cfg })
    }

    /// One POST, `timeout` at most.
    fn post(
        &self,
        body: &[u8],
        timeout: Duration,
    ) -> Result<ExportProfilesServiceResponse, Failure> {
        let mut req = self
            .agent
            .post(&self.cfg.url)
            .config()
            .timeout_global(Some(timeout.min(self.cfg.timeout)))
            .build()
            .header("Content-Type", "application/x-protobuf")
            .header("User-Agent", concat!("perfpy/", env!("CARGO_PKG_VERSION")));
        for (k, v) in &self.cfg.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let gz;
        let body = if self.cfg.gzip {
            req = req.header("Content-Encoding", "gzip");
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let _ = e.write_all(body);
            gz = e.finish().unwrap_or_default();
            &gz[..]
        } else {
            body
        };
        let mut resp = match req.send(body) {
            Ok(r) => r,
            Err(e) => return Err(Failure::Retry(transport_error(&e), None)),
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("Retry-After")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .unwrap_or_default();
        match status {
            200..=299 => Ok(ExportProfilesServiceResponse::decode(&bytes[..]).unwrap_or_default()),
            429 | 502 | 503 | 504 => Err(Failure::Retry(
                format!("the Collector answered HTTP {status} (busy or unavailable)"),
                retry_after,
            )),
            404 => Err(Failure::Fatal(
                "HTTP 404, no OTLP profiles receiver there: the Collector needs --feature-gates=+service.profilesSupport and a profiles pipeline with the otlp receiver, and the URL is its OTLP/HTTP address (e.g. http://HOST:4318)".to_string()
            )),
            401 | 403 => Err(Failure::Fatal(format!(
                "HTTP {status}, not authorized: set the headers it needs in OTEL_EXPORTER_OTLP_HEADERS (e.g. Authorization=Bearer%20TOKEN)"
            ))),
            _ => Err(Failure::Fatal(format!(
                "HTTP {status}: {}",
                status_message(&bytes)
            ))),
        }
    }
}

fn transport_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(_) => "no answer in time (timed out)".to_string(),
        ureq::Error::Io(io) => format!("cannot connect: {io}"),
        other => other.to_string(),
    }
}

/// The message of a google.rpc.Status body (field 2, a string), or the body as text.
fn status_message(bytes: &[u8]) -> String {
    let mut i = 0;
    while i < bytes.len() {
        let (key, n) = varint(&bytes[i..]);
        i += n;
        match (key >> 3, key & 7) {
            (_, 0) => i += varint(&bytes[i.min(bytes.len())..]).1,
            (f, 2) => {
                let (len, n) = varint(&bytes[i.min(bytes.len())..]);
                let (from, to) = (i + n, (i + n).saturating_add(len as usize));
                if to > bytes.len() {
                    break;
                }
                if f == 2 {
                    return String::from_utf8_lossy(&bytes[from..to]).into_owned();
                }
                i = to;
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned()
}

fn varint(b: &[u8]) -> (u64, usize) {
    let mut v = 0u64;
    for (i, x) in b.iter().enumerate().take(10) {
        v |= u64::from(x & 0x7f) << (7 * i);
        if x & 0x80 == 0 {
            return (v, i + 1);
        }
    }
    (v, b.len().max(1))
}

impl Exporter {
    /// Checks that the endpoint takes OTLP profiles (an empty request, as the Collector
    /// accepts it: this finds a wrong address, a Collector without profiles, a missing
    /// token) and starts the worker. For `record`, before sampling starts.
    pub fn connect(cfg: Config) -> Result<Self> {
        let client = Client::new(cfg)?;
        client.probe()?;
        Ok(Self::start(client, DEFAULT_QUEUE))
    }

    /// Starts the worker without checking the endpoint first: for a continuous exporter, to
    /// which an absent Collector is a retried warning, not an error. `queue`: requests kept
    /// while the Collector is unreachable.
    pub fn new(cfg: Config, queue: usize) -> Result<Self> {
        Ok(Self::start(Client::new(cfg)?, queue))
    }

    fn start(client: Client, cap: usize) -> Self {
        let url = client.cfg.url.clone();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                stats: Stats::default(),
                in_flight: false,
                deadline: None,
            }),
            wake: Condvar::new(),
            cap: cap.max(1),
        });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("perfpy-otlp".into())
            .spawn(move || worker(&s, &client))
            .ok();
        Self {
            shared,
            worker,
            url,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Queues an encoded `ExportProfilesServiceRequest`; never waits for the network.
    pub fn submit(&self, body: Vec<u8>) {
        let mut st = lock(&self.shared);
        st.queue.push_back(body);
        while st.queue.len() > self.shared.cap {
            st.queue.pop_front();
            st.stats.dropped_queue += 1;
            tracing::warn!(url = %self.url, "OTLP export queue full: oldest profile dropped");
        }
        self.shared.wake.notify_all();
    }

    /// For a continuous exporter (`perfpy agent`) to report drops per interval.
    pub fn stats(&self) -> Stats {
        let st = lock(&self.shared);
        Stats {
            pending: st.queue.len() as u64 + u64::from(st.in_flight),
            ..st.stats.clone()
        }
    }

    /// Sends what is queued within `grace`, drops (and counts) the rest, stops the worker.
    pub fn close(mut self, grace: Duration) -> Stats {
        lock(&self.shared).deadline = Some(Instant::now() + grace);
        self.shared.wake.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        let mut st = lock(&self.shared);
        let left = st.queue.len() as u64;
        st.queue.clear();
        st.stats.dropped_failed += left;
        st.stats.clone()
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if self.worker.is_some() {
            lock(&self.shared).deadline = Some(Instant::now());
            self.shared.wake.notify_all();
        }
    }
}

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    s.state.lock().unwrap_or_else(|p| p.into_inner())
}

fn worker(shared: &Shared, client: &Client) {
    loop {
        let (body, deadline) = {
            let mut st = lock(shared);
            loop {
                if let Some(b) = st.queue.pop_front() {
                    st.in_flight = true;
                    break (b, st.deadline);
                }
                if st.deadline.is_some() {
                    return;
                }
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        send_with_retries(shared, client, &body, deadline);
        lock(shared).in_flight = false;
    }
}

/// Sends one request, retrying for [`RETRY_FOR`] (or until the close deadline).
fn send_with_retries(shared: &Shared, client: &Client, body: &[u8], deadline: Option<Instant>) {
    let started = Instant::now();
    let mut backoff = BACKOFF_FIRST;
    loop {
        let deadline = deadline
            .or(lock(shared).deadline)
            .map_or(started + RETRY_FOR, |d| d.min(started + RETRY_FOR));
        let left = deadline.saturating_duration_since(Instant::now());
        let outcome = if left.is_zero() {
            Err(Failure::Fatal("no time left to send it".into()))
        } else {
            client.post(body, left)
        };
        let mut st = lock(shared);
        match outcome {
            Ok(resp) => {
                st.stats.sent += 1;
                if let Some(p) = resp.partial_success.filter(|p| p.rejected_profiles > 0) {
                    st.stats.rejected_profiles += p.rejected_profiles as u64;
                    tracing::warn!(rejected = p.rejected_profiles, message = %p.error_message, "the Collector rejected profiles");
                }
                return;
            }
            Err(Failure::Retry(msg, after)) => {
                let wait = after.unwrap_or(backoff).min(BACKOFF_MAX);
                if Instant::now() + wait >= deadline {
                    st.stats.dropped_failed += 1;
                    tracing::warn!(error = %msg, "OTLP export dropped after retrying");
                    st.stats.last_error = Some(msg);
                    return;
                }
                st.stats.retries += 1;
                tracing::info!(error = %msg, retry_in = ?wait, "OTLP export failed; retrying");
                st.stats.last_error = Some(msg);
                // Sleeps the backoff out; `close` cuts it short (its deadline then applies), a
                // `submit` does not.
                let until = Instant::now() + wait;
                let closing = st.deadline;
                while st.deadline == closing {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    st = shared
                        .wake
                        .wait_timeout(st, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(Failure::Fatal(msg)) => {
                st.stats.dropped_failed += 1;
                tracing::warn!(error = %msg, "OTLP export dropped");
                st.stats.last_error = Some(msg);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let v: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| v.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn endpoint_precedence_as_the_sdks() {
        let none = env(&[]);
        assert_eq!(
            Config::resolve(None, &none).unwrap().url,
            "http://localhost:4318/v1development/profiles"
        );
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ]);
        let c = Config::resolve(None, &e).unwrap();
        assert_eq!(c.url, "http://c:4318/v1development/profiles");
        assert_eq!(c.timeout, Duration::from_millis(2500));
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            (
                "OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT",
                "https://p/custom/path",
            ),
        ]);
        assert_eq!(
            Config::resolve(None, &e).unwrap().url,
            "https://p/custom/path"
        );
        assert_eq!(
            Config::resolve(Some("http://x:1"), &e).unwrap().url,
            "http://x:1/v1development/profiles"
        );
        assert_eq!(
            Config::resolve(Some("http://x:1/v1development/profiles"), &e)
                .unwrap()
                .url,
            "http://x:1/v1development/profiles"
        );
        assert!(Config::resolve(Some("x:1"), &none).is_err());
    }

    #[test]
    fn headers_merge_per_key_and_decode() {
        let e = env(&[
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Authorization=Basic%20abc, X-Scope-OrgID=one",
            ),
            ("OTEL_EXPORTER_OTLP_PROFILES_HEADERS", "x-scope-orgid=two"),
            ("OTEL_EXPORTER_OTLP_PROFILES_COMPRESSION", "gzip"),
        ]);
        let c = Config::resolve(None, &e).unwrap();
        assert_eq!(
            c.headers,
            vec![
                ("Authorization".to_string(), "Basic abc".to_string()),
                ("x-scope-orgid".to_string(), "two".to_string())
            ]
        );
        assert!(c.gzip);
        assert!(Config::resolve(None, &env(&[("OTEL_EXPORTER_OTLP_HEADERS", "novalue")])).is_err());
        assert_eq!(percent_decode("a%2Cb%"), "a,b%");
    }

    #[test]
    fn full_queue_drops_the_oldest_and_counts() {
        // Nothing listens on port 9 of 127.0.0.1 (discard, closed): every send fails at once.
        let cfg = Config::resolve(Some("http://127.0.0.1:9"), &env(&[])).unwrap();
        let ex = Exporter::start(Client::new(cfg).unwrap(), 2);
        let t = Instant::now();
        for i in 0..6u8 {
            ex.submit(vec![i]);
        }
        assert!(t.elapsed() < Duration::from_millis(200), "submit waited");
        let s = ex.close(Duration::from_millis(300));
        assert!(s.dropped_queue >= 3, "{s:?}");
        assert_eq!(s.sent, 0);
        assert_eq!(s.dropped(), 6, "{s:?}");
        assert!(s.last_error.unwrap_or_default().contains("connect"));
    }

    /// A local HTTP server answering the given (status, extra header, body) in turn, one
    /// request per connection; returns its base URL and what it received (headers and body).
    fn scripted(
        answers: Vec<(u16, &'static str, Vec<u8>)>,
    ) -> (String, std::sync::mpsc::Receiver<String>) {
        use std::io::{BufRead, BufReader, Read};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for (status, header, body) in answers {
                let (conn, _) = l.accept().unwrap();
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let (mut head, mut len) = (String::new(), 0);
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut b = vec![0; len];
                r.read_exact(&mut b).unwrap();
                let _ = tx.send(format!("{head}body={}", b.len()));
                let mut w = conn;
                let _ = write!(
                    w,
                    "HTTP/1.1 {status} X\r\n{header}Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = w.write_all(&body);
            }
        });
        (url, rx)
    }

    #[test]
    fn retries_when_busy_then_sends_with_the_headers() {
        use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesPartialSuccess;
        let partial = ExportProfilesServiceResponse {
            partial_success: Some(ExportProfilesPartialSuccess {
                rejected_profiles: 2,
                error_message: "bad".into(),
            }),
        }
        .encode_to_vec();
        let (url, rx) = scripted(vec![
            (200, "", Vec::new()),
            (503, "Retry-After: 0\r\n", Vec::new()),
            (200, "", partial),
        ]);
        let e = env(&[("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20t0ken")]);
        let ex = Exporter::connect(Config::resolve(Some(&url), &e).unwrap()).unwrap();
        let probe = rx.recv().unwrap();
        assert!(
            probe.starts_with("POST /v1development/profiles "),
            "{probe}"
        );
        assert!(
            probe.contains("authorization: Bearer t0ken")
                || probe.contains("Authorization: Bearer t0ken"),
            "{probe}"
        );
        assert!(probe
            .to_ascii_lowercase()
            .contains("content-type: application/x-protobuf"));
        ex.submit(vec![1, 2, 3]);
        let s = ex.close(Duration::from_secs(10));
        assert_eq!(
            (s.sent, s.retries, s.dropped(), s.rejected_profiles),
            (1, 1, 0, 2),
            "{s:?}"
        );
        assert!(rx.recv().unwrap().ends_with("body=3"));
    }

    #[test]
    fn refusals_are_not_retried() {
        // google.rpc.Status { code: 3, message: "unknown field" }
        let status = [&[0x08, 0x03, 0x12, 13][..], b"unknown field"].concat();
        let (url, _rx) = scripted(vec![(200, "", Vec::new()), (400, "", status)]);
        let ex = Exporter::connect(Config::resolve(Some(&url), &env(&[])).unwrap()).unwrap();
        ex.submit(vec![1]);
        let s = ex.close(Duration::from_secs(10));
        assert_eq!((s.sent, s.retries, s.dropped_failed), (0, 0, 1), "{s:?}");
        assert_eq!(s.last_error.as_deref(), Some("HTTP 400: unknown field"));
        let (url, _rx) = scripted(vec![(401, "", Vec::new())]);
        let Err(err) = Exporter::connect(Config::resolve(Some(&url), &env(&[])).unwrap()) else {
            panic!("401 accepted")
        };
        assert!(
            err.to_string()
                .contains("does not take profiles: HTTP 401, not authorized"),
            "{err}"
        );
    }
}
