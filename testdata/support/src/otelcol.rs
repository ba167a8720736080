//! The real OpenTelemetry Collector `scripts/deps.sh` builds (testdata/otelcol/main.go), started
//! on 127.0.0.1 with a `profiles` pipeline: OTLP receiver → debug exporter (detailed: what it
//! printed is kept) and, optionally, OTLP/HTTP exporter → a [`Sink`] of the test (the debug
//! exporter does not print which stack a sample has; what the Collector forwards has it).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The test Collector's binary; missing: a failure under CI=true, otherwise `None` with a note.
pub fn otelcol_binary() -> Option<PathBuf> {
    let p = std::env::var_os("PERFPY_OTELCOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/perfpy/otelcol"));
    if p.exists() {
        return Some(p);
    }
    if super::ci() {
        panic!(
            "the test OpenTelemetry Collector {} is missing: run scripts/deps.sh (CI needs it)",
            p.display()
        );
    }
    eprintln!(
        "NOTE: the test OpenTelemetry Collector {} is missing (scripts/deps.sh builds it); test not run",
        p.display()
    );
    None
}

/// A port nothing listens on now (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Collector {
    child: Child,
    pub port: u16,
    output: Arc<Mutex<String>>,
}

impl Collector {
    /// Starts the Collector on a free port and waits until it says it is ready. `forward_to`:
    /// also forward what arrives (OTLP/HTTP, protobuf, uncompressed) to this base URL.
    /// `profiles: false` configures only a traces pipeline (no profiles receiver).
    pub fn start(forward_to: Option<&str>, profiles: bool) -> Option<Collector> {
        Self::start_at(free_port(), forward_to, profiles)
    }

    /// [`Collector::start`] on a given port (a Collector restarted where the last one was).
    pub fn start_at(port: u16, forward_to: Option<&str>, profiles: bool) -> Option<Collector> {
        let bin = otelcol_binary()?;
        let mut exporters = vec!["debug"];
        let mut forward = String::new();
        if let Some(url) = forward_to {
            exporters.push("otlp_http");
            forward = format!(
                "  otlp_http:\n    endpoint: {url}\n    compression: none\n    encoding: proto\n    retry_on_failure:\n      enabled: false\n"
            );
        }
        let config = format!(
            "receivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: 127.0.0.1:{port}\n\
             exporters:\n  debug:\n    verbosity: detailed\n{forward}\
             service:\n  telemetry:\n    metrics:\n      level: none\n  pipelines:\n    {}:\n      receivers: [otlp]\n      exporters: [{}]\n",
            if profiles { "profiles" } else { "traces" },
            exporters.join(", ")
        );
        let path = super::tmp(&format!("otelcol-{port}.yaml"));
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&path)
            .arg("--feature-gates=+service.profilesSupport")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the Collector");
        let output = Arc::new(Mutex::new(String::new()));
        for r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let out = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    let mut o = out.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        let c = Collector {
            child,
            port,
            output,
        };
        if !c.wait_for("Everything is ready", Duration::from_secs(30)) {
            panic!("the Collector did not start:\n{}", c.output());
        }
        Some(c)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything it printed so far (stdout and stderr).
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits until its output contains `needle`.
    pub fn wait_for(&self, needle: &str, limit: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < limit {
            if self.output.lock().unwrap().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Sends it a signal (by pid).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill();
    }
}

/// One HTTP request a [`Sink`] received.
pub struct Received {
    pub path: String,
    pub body: Vec<u8>,
}

/// A minimal HTTP/1.1 server on 127.0.0.1 that answers 200 to every POST and keeps the bodies:
/// the "store" behind the Collector.
pub struct Sink {
    pub url: String,
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl Sink {
    pub fn start() -> Sink {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let r = received.clone();
        std::thread::spawn(move || {
            for conn in l.incoming().map_while(Result::ok) {
                let r = r.clone();
                std::thread::spawn(move || serve(conn, &r));
            }
        });
        Sink { url, received }
    }

    /// Waits for `n` requests.
    pub fn wait(&self, n: usize, limit: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < limit {
            if self.received.lock().unwrap().len() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

fn serve(conn: TcpStream, into: &Mutex<Vec<Received>>) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut request_line = String::new();
        if r.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_string();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        into.lock().unwrap().push(Received { path, body });
        let _ = w.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n",
        );
    }
}

/// What the debug exporter printed of one export (detailed): the dictionary's string table,
/// functions (name, file) and locations (lines), and the resources' attributes.
#[derive(Debug, Default)]
pub struct Printed {
    pub strings: Vec<String>,
    /// (name, file) per function, by index.
    pub functions: Vec<(String, String)>,
    /// (function index, line) per line of each location.
    pub lines: Vec<(usize, i64)>,
    /// Per resource: `key: Value(...)` lines.
    pub resources: Vec<Vec<(String, String)>>,
    /// Values of every sample, in order.
    pub sample_values: Vec<i64>,
}

impl Printed {
    pub fn parse(out: &str) -> Printed {
        let mut p = Printed::default();
        let mut section = "";
        let num = |l: &str| -> i64 {
            l.rsplit(':')
                .next()
                .unwrap_or("")
                .trim()
                .parse()
                .unwrap_or(-1)
        };
        let mut function_index = 0usize;
        for line in out.lines() {
            let t = line.trim();
            if line.contains("Function #") || line.starts_with("Function #") {
                section = "function";
                p.functions.push((String::new(), String::new()));
                continue;
            }
            if line.starts_with("String table:") {
                section = "strings";
                continue;
            }
            if line.starts_with("Resource attributes:") {
                section = "resource";
                p.resources.push(Vec::new());
                continue;
            }
            if line.starts_with("Location #") || line.starts_with("Mapping #") {
                section = "location";
                continue;
            }
            if !line.starts_with(' ') {
                section = "";
            }
            match section {
                "function" if t.starts_with("Name:") => {
                    p.functions.last_mut().unwrap().0 = num(t).to_string()
                }
                "function" if t.starts_with("Filename:") => {
                    p.functions.last_mut().unwrap().1 = num(t).to_string()
                }
                "location" if t.starts_with("Function index:") => function_index = num(t) as usize,
                "location" if t.starts_with("Line:") => p.lines.push((function_index, num(t))),
                "strings" if line.starts_with("    ") => p.strings.push(line[4..].to_string()),
                "resource" if t.starts_with("-> ") => {
                    if let Some((k, v)) = t[3..].split_once(": ") {
                        p.resources
                            .last_mut()
                            .unwrap()
                            .push((k.to_string(), v.to_string()));
                    }
                }
                _ => {}
            }
            if let Some(values) = t.strip_prefix("Values: [") {
                p.sample_values.extend(
                    values
                        .trim_end_matches(']')
                        .split_whitespace()
                        .filter_map(|v| v.parse::<i64>().ok()),
                );
            }
        }
        // Function names and files as strings.
        let s = |i: &str| {
            i.parse::<usize>()
                .ok()
                .and_then(|i| p.strings.get(i).cloned())
                .unwrap_or_default()
        };
        p.functions = p.functions.iter().map(|(n, f)| (s(n), s(f))).collect();
        p
    }

    /// The lines (> 0) printed for locations of the function `name`, and its file.
    pub fn function(&self, name: &str) -> Option<(String, Vec<i64>)> {
        let i = self.functions.iter().position(|(n, _)| n == name)?;
        let lines = self
            .lines
            .iter()
            .filter(|(f, _)| *f == i)
            .map(|(_, l)| *l)
            .collect();
        Some((self.functions[i].1.clone(), lines))
    }
}
