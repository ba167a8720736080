//! OTLP profiles (`opentelemetry.proto.profiles.v1development`, proto v1.10.0, through the
//! `opentelemetry-proto` crate) from a report: one `ResourceProfiles` per process, all sharing
//! one `ProfilesDictionary`.
//!
//! The mappings, locations and functions are the pprof writer's ([`super::pprof::encode`]), moved
//! into the dictionary: one place decides how frames are named and addressed. In this version
//! of the protocol a profile has one sample type: per process a profile `cpu`/`nanoseconds`
//! (period the sampling period) and, with `--off-cpu`, a second one `off_cpu`/`nanoseconds`
//! (the protocol's own example name; no period: every wait above `--min-block` is recorded, with
//! its length; the stack's root frame names its kind, as in the pprof). Per location the
//! `profile.frame.type` attribute (`kernel`, `native`, `cpython`); per mapping its GNU build id
//! (`process.executable.build_id.gnu`); per sample `thread.name`, `thread.id` and, off-CPU,
//! `thread.wait` (what it waited for: `sleep`, `GIL`, `I/O read`…, the pprof's `wait` label). Resource attributes per the semantic conventions:
//! `host.name`, `process.pid`, `process.executable.name`, `process.runtime.name`/`version`,
//! `container.id`, `service.name` (the target's `OTEL_SERVICE_NAME`, else its executable name).

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Result};
use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::profiles::v1development as otlp;
use opentelemetry_proto::tonic::resource::v1::Resource;
use pprof::protos as pp;
use prost14::Message;

use super::otlp_export::Exporter;
use crate::report::Report;
use crate::symbols::Kind;

/// What describes one process as an OpenTelemetry resource.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub executable: String,
    pub python_version: Option<String>,
    pub container_id: Option<String>,
    pub service_name: String,
}

impl ProcessInfo {
    /// From what the report knows of `pid`, completed from `/proc` while the process lives:
    /// its executable's name and its `OTEL_SERVICE_NAME`.
    pub fn read(
        pid: u32,
        comm: &str,
        python_version: Option<&str>,
        container: Option<&str>,
    ) -> Self {
        let executable = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .map(|n| n.trim_end_matches(" (deleted)").to_string())
            .unwrap_or_else(|| comm.to_string());
        let service = std::fs::read(format!("/proc/{pid}/environ"))
            .ok()
            .and_then(|env| service_name_from_environ(&env));
        Self {
            pid,
            service_name: service.unwrap_or_else(|| executable.clone()),
            executable,
            python_version: python_version.map(str::to_string),
            container_id: container.map(str::to_string),
        }
    }
}

fn service_name_from_environ(env: &[u8]) -> Option<String> {
    env.split(|b| *b == 0)
        .filter_map(|kv| kv.strip_prefix(b"OTEL_SERVICE_NAME="))
        .map(|v| String::from_utf8_lossy(v).trim().to_string())
        .find(|v| !v.is_empty())
}

pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The processes of a report, each once, described from the report and `/proc`.
pub fn processes(r: &Report) -> Vec<ProcessInfo> {
    let mut seen: BTreeMap<u32, ProcessInfo> = BTreeMap::new();
    for s in &r.samples {
        seen.entry(s.pid).or_insert_with(|| {
            ProcessInfo::read(
                s.pid,
                &s.comm,
                s.python_version.as_deref(),
                s.container_id.as_deref(),
            )
        });
    }
    seen.into_values().collect()
}

/// Deduplicating tables of the dictionary; index 0 of each is its zero value, as the protocol
/// requires.
struct Dict {
    d: otlp::ProfilesDictionary,
    strings: HashMap<String, i32>,
    attrs: HashMap<(i32, String), i32>,
    stacks: HashMap<Vec<i32>, i32>,
}

impl Dict {
    fn new() -> Self {
        let mut d = Self {
            d: otlp::ProfilesDictionary {
                mapping_table: vec![Default::default()],
                location_table: vec![Default::default()],
                function_table: vec![Default::default()],
                link_table: vec![Default::default()],
                string_table: Vec::new(),
                attribute_table: vec![Default::default()],
                stack_table: vec![Default::default()],
            },
            strings: HashMap::new(),
            attrs: HashMap::new(),
            stacks: HashMap::new(),
        };
        d.string("");
        d.stacks.insert(Vec::new(), 0);
        d
    }

    fn string(&mut self, s: &str) -> i32 {
        if let Some(i) = self.strings.get(s) {
            return *i;
        }
        let i = self.d.string_table.len() as i32;
        self.d.string_table.push(super::printable(s).into_owned());
        self.strings.insert(s.to_string(), i);
        i
    }

    fn attr(&mut self, key: &str, value: any_value::Value) -> i32 {
        let k = self.string(key);
        let id = (k, format!("{value:?}"));
        if let Some(i) = self.attrs.get(&id) {
            return *i;
        }
        let i = self.d.attribute_table.len() as i32;
        self.d.attribute_table.push(otlp::KeyValueAndUnit {
            key_strindex: k,
            value: Some(AnyValue { value: Some(value) }),
            unit_strindex: 0,
        });
        self.attrs.insert(id, i);
        i
    }

    fn stack(&mut self, locs: Vec<i32>) -> i32 {
        if let Some(i) = self.stacks.get(&locs) {
            return *i;
        }
        let i = self.d.stack_table.len() as i32;
        self.d.stack_table.push(otlp::Stack {
            location_indices: locs.clone(),
        });
        self.stacks.insert(locs, i);
        i
    }
}

fn s(v: &str) -> any_value::Value {
    any_value::Value::StringValue(v.to_string())
}

/// The pprof writer's mappings, functions and locations in the dictionary; per pprof location
/// id, its index there.
fn fill_tables(r: &Report, p: &pp::Profile, dict: &mut Dict) -> HashMap<u64, i32> {
    let text = |i: i64| {
        p.string_table
            .get(i as usize)
            .map(String::as_str)
            .unwrap_or("")
    };
    let mut mapping_index = HashMap::new();
    for m in &p.mapping {
        let mut attribute_indices = Vec::new();
        let build_id = text(m.build_id);
        if !build_id.is_empty() {
            attribute_indices.push(dict.attr("process.executable.build_id.gnu", s(build_id)));
        }
        let filename_strindex = dict.string(text(m.filename));
        mapping_index.insert(m.id, dict.d.mapping_table.len() as i32);
        dict.d.mapping_table.push(otlp::Mapping {
            memory_start: m.memory_start,
            memory_limit: m.memory_limit,
            file_offset: m.file_offset,
            filename_strindex,
            attribute_indices,
        });
    }
    let mut function_index = HashMap::new();
    for f in &p.function {
        let func = otlp::Function {
            name_strindex: dict.string(text(f.name)),
            system_name_strindex: dict.string(text(f.system_name)),
            filename_strindex: dict.string(text(f.filename)),
            start_line: f.start_line,
        };
        function_index.insert(f.id, dict.d.function_table.len() as i32);
        dict.d.function_table.push(func);
    }
    let mut location_index = HashMap::new();
    for l in &p.location {
        // pprof location ids are report location indices + 1.
        let kind = r.resolved.get(l.id as usize - 1).map(|x| x.kind);
        let frame_type = match kind {
            Some(Kind::Kernel) => "kernel",
            Some(Kind::Python | Kind::PythonEbpf) => "cpython",
            _ => "native",
        };
        let loc = otlp::Location {
            mapping_index: mapping_index.get(&l.mapping_id).copied().unwrap_or(0),
            address: l.address,
            lines: l
                .line
                .iter()
                .map(|ln| otlp::Line {
                    function_index: function_index.get(&ln.function_id).copied().unwrap_or(0),
                    line: ln.line,
                    column: 0,
                })
                .collect(),
            attribute_indices: vec![dict.attr("profile.frame.type", s(frame_type))],
        };
        location_index.insert(l.id, dict.d.location_table.len() as i32);
        dict.d.location_table.push(loc);
    }
    location_index
}

fn resource(info: &ProcessInfo, host: &str) -> Resource {
    let kv = |k: &str, v: any_value::Value| KeyValue {
        key: k.to_string(),
        value: Some(AnyValue { value: Some(v) }),
        key_strindex: 0,
    };
    let mut attributes = vec![
        kv("service.name", s(&info.service_name)),
        kv("host.name", s(host)),
        kv("process.pid", any_value::Value::IntValue(info.pid as i64)),
        kv("process.executable.name", s(&info.executable)),
    ];
    if let Some(v) = &info.python_version {
        attributes.push(kv("process.runtime.name", s("CPython")));
        attributes.push(kv("process.runtime.version", s(v)));
    }
    if let Some(c) = &info.container_id {
        attributes.push(kv("container.id", s(c)));
    }
    Resource {
        attributes,
        ..Default::default()
    }
}

/// A process's samples: CPU, off-CPU.
#[derive(Default)]
struct Samples {
    cpu: Vec<otlp::Sample>,
    off_cpu: Vec<otlp::Sample>,
}

/// One request: per process of `procs` that has samples, a `ResourceProfiles` with its CPU
/// profile and, with off-CPU samples, its off-CPU profile.
pub fn encode(r: &Report, procs: &[ProcessInfo], host: &str) -> ExportProfilesServiceRequest {
    let p = super::pprof::encode(r);
    let mut dict = Dict::new();
    let location_index = fill_tables(r, &p, &mut dict);
    let per_pid = samples(&p, &location_index, &mut dict);
    let cpu = otlp::ValueType {
        type_strindex: dict.string("cpu"),
        unit_strindex: dict.string("nanoseconds"),
    };
    let off_cpu = per_pid
        .values()
        .any(|s| !s.off_cpu.is_empty())
        .then(|| otlp::ValueType {
            type_strindex: dict.string("off_cpu"),
            unit_strindex: cpu.unit_strindex,
        });
    let scope = InstrumentationScope {
        name: "perfpy".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    let mut resource_profiles = Vec::new();
    for (pid, samples) in per_pid {
        let info = procs
            .iter()
            .find(|i| i.pid == pid)
            .cloned()
            .unwrap_or(ProcessInfo {
                pid,
                executable: format!("pid-{pid}"),
                service_name: format!("pid-{pid}"),
                ..Default::default()
            });
        let profile = |sample_type, samples, period_type, period, kind| otlp::Profile {
            sample_type: Some(sample_type),
            samples,
            time_unix_nano: p.time_nanos as u64,
            duration_nano: p.duration_nanos as u64,
            period_type,
            period,
            profile_id: profile_id(pid, p.time_nanos, kind),
            ..Default::default()
        };
        let mut profiles = Vec::new();
        if !samples.cpu.is_empty() {
            profiles.push(profile(cpu, samples.cpu, Some(cpu), p.period, 0));
        }
        if let (Some(off), false) = (off_cpu, samples.off_cpu.is_empty()) {
            profiles.push(profile(off, samples.off_cpu, None, 0, 1));
        }
        resource_profiles.push(otlp::ResourceProfiles {
            resource: Some(resource(&info, host)),
            scope_profiles: vec![otlp::ScopeProfiles {
                scope: Some(scope.clone()),
                profiles,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        });
    }
    ExportProfilesServiceRequest {
        resource_profiles,
        dictionary: Some(dict.d),
    }
}

/// The pprof's samples per process, split by type, their stacks and attributes in the
/// dictionary (`location_index`: per pprof location id, its index there).
fn samples(
    p: &pp::Profile,
    location_index: &HashMap<u64, i32>,
    dict: &mut Dict,
) -> BTreeMap<u32, Samples> {
    let label = |name: &str| {
        p.string_table
            .iter()
            .position(|x| x == name)
            .map(|i| i as i64)
    };
    let (k_pid, k_tid, k_thread) = (label("pid"), label("tid"), label("thread_name"));
    let k_wait = label("wait");
    let text = |i: i64| {
        p.string_table
            .get(i as usize)
            .map(String::as_str)
            .unwrap_or("")
    };
    let mut per_pid: BTreeMap<u32, Samples> = BTreeMap::new();
    for smp in &p.sample {
        // pprof values: samples/count, cpu/nanoseconds[, off-cpu/nanoseconds, wall/nanoseconds].
        let (cpu_ns, off_ns) = (value(smp, 1), value(smp, 2));
        if cpu_ns == 0 && off_ns == 0 {
            continue;
        }
        let find = |k: Option<i64>| smp.label.iter().find(|l| Some(l.key) == k);
        let pid = find(k_pid).map_or(0, |l| l.num as u32);
        let mut attribute_indices = Vec::new();
        if let Some(l) = find(k_thread) {
            attribute_indices.push(dict.attr("thread.name", s(text(l.str))));
        }
        if let Some(l) = find(k_tid) {
            attribute_indices.push(dict.attr("thread.id", any_value::Value::IntValue(l.num)));
        }
        if let Some(l) = find(k_wait).filter(|_| off_ns > 0) {
            attribute_indices.push(dict.attr("thread.wait", s(text(l.str))));
        }
        let locs = smp
            .location_id
            .iter()
            .map(|id| location_index.get(id).copied().unwrap_or(0))
            .collect();
        let sample = otlp::Sample {
            stack_index: dict.stack(locs),
            attribute_indices,
            link_index: 0,
            values: vec![cpu_ns],
            timestamps_unix_nano: Vec::new(),
        };
        let of = per_pid.entry(pid).or_default();
        if off_ns > 0 {
            of.off_cpu.push(otlp::Sample {
                values: vec![off_ns],
                ..sample.clone()
            });
        }
        if cpu_ns > 0 {
            of.cpu.push(sample);
        }
    }
    per_pid
}

/// A pprof sample's value at `i` (0 where the profile has no such type).
fn value(smp: &pp::Sample, i: usize) -> i64 {
    smp.value.get(i).copied().unwrap_or(0)
}

/// 16 bytes, unique per process, recording and sample type (`kind`: 0 CPU, 1 off-CPU; not all
/// zero, as the protocol asks).
fn profile_id(pid: u32, time_nanos: i64, kind: u32) -> Vec<u8> {
    let mut id = Vec::with_capacity(16);
    id.extend_from_slice(&(time_nanos as u64).to_be_bytes());
    id.extend_from_slice(&pid.to_be_bytes());
    // Pids fit in 22 bits: the top bit tells the sample types apart.
    id.extend_from_slice(&(std::process::id() | kind << 31).to_be_bytes());
    id
}

/// The encoded export request of a report (its processes described from `/proc` now), and how
/// many profiles it holds: what an exporter's [`Exporter::submit`] takes, once per recording or
/// interval.
pub fn request(r: &Report) -> (Vec<u8>, usize) {
    let req = encode(r, &processes(r), &host_name());
    let profiles = req
        .resource_profiles
        .iter()
        .flat_map(|rp| &rp.scope_profiles)
        .map(|sp| sp.profiles.len())
        .sum();
    (req.encode_to_vec(), profiles)
}

/// `perfpy record --otlp-endpoint`: the recording's profile, sent (with retries) before
/// `record` ends; an error says what became of it. `written` names the file also written.
pub fn send_recording(exporter: Exporter, r: &Report, written: &str) -> Result<()> {
    let (body, n) = request(r);
    let url = exporter.url().to_string();
    exporter.submit(body);
    let st = exporter.close(RECORD_GRACE);
    if st.sent == 1 && st.rejected_profiles == 0 {
        say!(
            "perfpy: sent {n} profile{} (OTLP) to {url}",
            if n == 1 { "" } else { "s" }
        );
        return Ok(());
    }
    if st.sent == 1 {
        bail!("OTLP export to {url}: the Collector rejected {} of {n} profiles (the profile is in {written})", st.rejected_profiles);
    }
    bail!(
        "OTLP export to {url} failed after {} retr{}: {}; {} profile request dropped (it is in {written})",
        st.retries,
        if st.retries == 1 { "y" } else { "ies" },
        st.last_error.as_deref().unwrap_or("unknown error"),
        st.dropped()
    )
}

/// How long `record` keeps retrying its one export at the end.
pub const RECORD_GRACE: std::time::Duration = std::time::Duration::from_secs(15);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::FrameKey;
    use crate::report::Sample;
    use crate::symbols::Resolved;
    use perfpy_symbolize::Frame;
    use std::time::{Duration, SystemTime};

    fn frame(f: &str, file: Option<&str>, line: Option<u32>) -> Vec<Frame> {
        vec![Frame {
            function: f.into(),
            file: file.map(str::to_string),
            line,
        }]
    }

    fn sample(locs: Vec<u32>, count: u64, pid: u32, thread: &str) -> Sample {
        Sample {
            locs,
            count,
            offcpu_ns: 0,
            wait: None,
            gil_wait: false,
            pid,
            tid: crate::ids::Tid(pid + 1),
            comm: "python3.12".into(),
            thread: thread.into(),
            frames_from: crate::report::FramesFrom::Ebpf,
            python_version: Some("3.12.7".into()),
            container_id: (pid == 20).then(|| "abc123".into()),
            main_file: None,
        }
    }

    /// Two processes sharing a library frame: kernel, native (with a build id) and Python.
    fn report() -> Report {
        Report {
            locations: vec![
                FrameKey::Py { func: 0, line: 7 },
                FrameKey::Py { func: 1, line: 12 },
                FrameKey::File {
                    file: crate::ids::FileId(0),
                    offset: 0x1234,
                },
                FrameKey::Kernel(0xffff_ffff_8100_0000),
            ],
            resolved: vec![
                Resolved {
                    frames: frame("spin", Some("app.py"), Some(7)),
                    kind: Kind::PythonEbpf,
                },
                Resolved {
                    frames: frame("main", Some("app.py"), Some(12)),
                    kind: Kind::PythonEbpf,
                },
                Resolved {
                    frames: frame("sha256_update", None, None),
                    kind: Kind::Native { interpreter: false },
                },
                Resolved {
                    frames: frame("do_syscall_64", None, None),
                    kind: Kind::Kernel,
                },
            ],
            samples: vec![
                sample(vec![0, 1], 30, 10, "MainThread"),
                sample(vec![3, 2, 1], 10, 10, "worker"),
                sample(vec![2, 1], 5, 20, "MainThread"),
            ],
            period_ns: 10_000_000,
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: Duration::from_secs(5),
            files: vec![("/usr/lib/libcrypto.so.3".into(), Some(vec![0xab, 0xcd]))],
            command: "perfpy record".into(),
            offcpu: false,
        }
    }

    fn procs() -> Vec<ProcessInfo> {
        vec![
            ProcessInfo {
                pid: 10,
                executable: "python3.12".into(),
                python_version: Some("3.12.7".into()),
                container_id: None,
                service_name: "checkout".into(),
            },
            ProcessInfo {
                pid: 20,
                executable: "python3.12".into(),
                python_version: Some("3.12.7".into()),
                container_id: Some("abc123".into()),
                service_name: "python3.12".into(),
            },
        ]
    }

    fn attr(res: &Resource, k: &str) -> Option<any_value::Value> {
        res.attributes
            .iter()
            .find(|a| a.key == k)
            .and_then(|a| a.value.clone()?.value)
    }

    #[test]
    fn one_profile_per_process_with_a_shared_dictionary() {
        let req = encode(&report(), &procs(), "node-1");
        let d = req.dictionary.as_ref().unwrap();
        // Index 0 of every table is its zero value.
        assert_eq!(d.string_table[0], "");
        assert_eq!(d.mapping_table[0], Default::default());
        assert_eq!(d.location_table[0], Default::default());
        assert_eq!(d.function_table[0], Default::default());
        assert_eq!(d.attribute_table[0], Default::default());
        assert_eq!(d.stack_table[0], Default::default());
        assert_eq!(d.link_table[0], Default::default());
        let str_of = |i: i32| d.string_table[i as usize].as_str();
        // No duplicates in the string table.
        let mut sorted = d.string_table.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), d.string_table.len());

        assert_eq!(req.resource_profiles.len(), 2);
        let mut leaf_ns: HashMap<(u32, String), i64> = HashMap::new();
        for rp in &req.resource_profiles {
            let res = rp.resource.as_ref().unwrap();
            let Some(any_value::Value::IntValue(pid)) = attr(res, "process.pid") else {
                panic!("no process.pid")
            };
            let profile = &rp.scope_profiles[0].profiles[0];
            let st = profile.sample_type.unwrap();
            assert_eq!(
                (str_of(st.type_strindex), str_of(st.unit_strindex)),
                ("cpu", "nanoseconds")
            );
            assert_eq!(profile.period, 10_000_000);
            assert_eq!(profile.duration_nano, 5_000_000_000);
            assert_eq!(profile.profile_id.len(), 16);
            for s in &profile.samples {
                let stack = &d.stack_table[s.stack_index as usize];
                let leaf = &d.location_table[stack.location_indices[0] as usize];
                let f = &d.function_table[leaf.lines[0].function_index as usize];
                *leaf_ns
                    .entry((pid as u32, str_of(f.name_strindex).to_string()))
                    .or_default() += s.values[0];
                let keys: Vec<&str> = s
                    .attribute_indices
                    .iter()
                    .map(|i| str_of(d.attribute_table[*i as usize].key_strindex))
                    .collect();
                assert_eq!(keys, ["thread.name", "thread.id"]);
            }
        }
        assert_eq!(leaf_ns[&(10, "spin".to_string())], 300_000_000);
        assert_eq!(leaf_ns[&(10, "do_syscall_64".to_string())], 100_000_000);
        assert_eq!(leaf_ns[&(20, "sha256_update".to_string())], 50_000_000);
        // The stack [sha256_update, main] of pid 20 is the tail of one of pid 10's, but its own
        // entry; identical stacks would share one.
        assert_eq!(d.stack_table.len(), 4);
    }

    #[test]
    fn python_frames_carry_files_and_lines_native_their_mapping_and_build_id() {
        let req = encode(&report(), &procs(), "node-1");
        let d = req.dictionary.as_ref().unwrap();
        let str_of = |i: i32| d.string_table[i as usize].as_str();
        let frame_type = |l: &otlp::Location| {
            l.attribute_indices
                .iter()
                .map(|i| &d.attribute_table[*i as usize])
                .find(|a| str_of(a.key_strindex) == "profile.frame.type")
                .and_then(|a| a.value.clone()?.value)
        };
        let by_name = |n: &str| {
            d.location_table
                .iter()
                .find(|l| {
                    !l.lines.is_empty()
                        && str_of(
                            d.function_table[l.lines[0].function_index as usize].name_strindex,
                        ) == n
                })
                .unwrap()
        };
        let spin = by_name("spin");
        let f = &d.function_table[spin.lines[0].function_index as usize];
        assert_eq!(str_of(f.filename_strindex), "app.py");
        assert_eq!(spin.lines[0].line, 7);
        assert_eq!(frame_type(spin), Some(s("cpython")));
        let native = by_name("sha256_update");
        assert_eq!(frame_type(native), Some(s("native")));
        let m = &d.mapping_table[native.mapping_index as usize];
        assert_eq!(str_of(m.filename_strindex), "/usr/lib/libcrypto.so.3");
        let bid = &d.attribute_table[m.attribute_indices[0] as usize];
        assert_eq!(str_of(bid.key_strindex), "process.executable.build_id.gnu");
        assert_eq!(bid.value.clone().unwrap().value, Some(s("abcd")));
        // The file offset survives the synthetic address space.
        assert_eq!(native.address - m.memory_start + m.file_offset, 0x1234);
        let k = by_name("do_syscall_64");
        assert_eq!(frame_type(k), Some(s("kernel")));
        assert_eq!(
            str_of(d.mapping_table[k.mapping_index as usize].filename_strindex),
            "[kernel.kallsyms]"
        );
    }

    #[test]
    fn resource_attributes_per_semantic_conventions() {
        let req = encode(&report(), &procs(), "node-1");
        let a = req.resource_profiles[0].resource.as_ref().unwrap();
        assert_eq!(attr(a, "service.name"), Some(s("checkout")));
        assert_eq!(attr(a, "host.name"), Some(s("node-1")));
        assert_eq!(attr(a, "process.executable.name"), Some(s("python3.12")));
        assert_eq!(attr(a, "process.runtime.name"), Some(s("CPython")));
        assert_eq!(attr(a, "process.runtime.version"), Some(s("3.12.7")));
        assert_eq!(attr(a, "container.id"), None);
        let b = req.resource_profiles[1].resource.as_ref().unwrap();
        assert_eq!(attr(b, "container.id"), Some(s("abc123")));
        assert_eq!(attr(b, "process.pid"), Some(any_value::Value::IntValue(20)));
    }

    #[test]
    fn service_name_from_the_targets_environment() {
        assert_eq!(
            service_name_from_environ(b"PATH=/bin\0OTEL_SERVICE_NAME=billing\0X=1\0"),
            Some("billing".into())
        );
        assert_eq!(service_name_from_environ(b"OTEL_SERVICE_NAME=\0"), None);
        // Our own process: its executable is the test binary.
        let me = ProcessInfo::read(std::process::id(), "comm", None, None);
        assert!(me.executable.starts_with("perfpy"), "{me:?}");
    }

    #[test]
    fn off_cpu_time_is_a_second_profile_per_process() {
        let mut r = report();
        r.offcpu = true;
        let mut sleep = sample(vec![1], 0, 10, "sleeper");
        sleep.offcpu_ns = 2_500_000_000;
        sleep.wait = Some(crate::wait::WaitKind::Sleep);
        r.samples.push(sleep);
        let req = encode(&r, &procs(), "node-1");
        let d = req.dictionary.as_ref().unwrap();
        let str_of = |i: i32| d.string_table[i as usize].as_str();
        let types = |rp: &otlp::ResourceProfiles| -> Vec<(String, i64, usize)> {
            rp.scope_profiles[0]
                .profiles
                .iter()
                .map(|p| {
                    let st = p.sample_type.unwrap();
                    let v = p.samples.iter().map(|s| s.values[0]).sum();
                    (
                        format!("{}/{}", str_of(st.type_strindex), str_of(st.unit_strindex)),
                        v,
                        p.samples.len(),
                    )
                })
                .collect()
        };
        // pid 10: CPU (30 + 10 samples of 10 ms) and the 2.5 s sleep; pid 20 no off-CPU time.
        assert_eq!(
            types(&req.resource_profiles[0]),
            [
                ("cpu/nanoseconds".to_string(), 400_000_000, 2),
                ("off_cpu/nanoseconds".to_string(), 2_500_000_000, 1)
            ]
        );
        assert_eq!(types(&req.resource_profiles[1]).len(), 1);
        let profiles = &req.resource_profiles[0].scope_profiles[0].profiles;
        assert_ne!(profiles[0].profile_id, profiles[1].profile_id);
        assert_eq!((profiles[1].period, profiles[1].period_type), (0, None));
        // The wait's kind as an attribute, its stack under `main`.
        let s = &profiles[1].samples[0];
        let attrs: Vec<(&str, Option<any_value::Value>)> = s
            .attribute_indices
            .iter()
            .map(|i| &d.attribute_table[*i as usize])
            .map(|a| {
                (
                    str_of(a.key_strindex),
                    a.value.clone().and_then(|v| v.value),
                )
            })
            .collect();
        assert!(
            attrs.contains(&("thread.wait", Some(super::s("sleep")))),
            "{attrs:?}"
        );
        assert!(
            attrs.contains(&("thread.name", Some(super::s("sleeper")))),
            "{attrs:?}"
        );
        let leaf = d.stack_table[s.stack_index as usize].location_indices[0];
        let line = &d.location_table[leaf as usize].lines[0];
        assert_eq!(
            str_of(d.function_table[line.function_index as usize].name_strindex),
            "main"
        );
        assert_eq!(line.line, 12);
        // The CPU profile's values are the CPU samples' only.
        assert!(profiles[0].samples.iter().all(|s| s.values[0] > 0));
    }

    #[test]
    fn the_request_round_trips_through_protobuf() {
        let req = encode(&report(), &procs(), "node-1");
        let back = ExportProfilesServiceRequest::decode(&req.encode_to_vec()[..]).unwrap();
        assert_eq!(back, req);
    }
}
