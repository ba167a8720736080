//! gzip'd pprof (profile.proto) through the `pprof` crate's prost types.
//!
//! Sample types `samples/count` and `cpu/nanoseconds` (with `--off-cpu` also
//! `off-cpu/nanoseconds` and `wall/nanoseconds`, the default then, and a `wait` label on
//! off-CPU samples); one Location per distinct frame address
//! (inlined functions as several lines, leaf first); one Mapping per file (with its build id),
//! plus `[kernel.kallsyms]` and `[python]` (frames named by perf maps). Labels per sample: `pid`
//! and `tid` (numbers), `comm`, `thread_name`, `frames_from` (strings).

use crate::ids::FileId;
use std::collections::HashMap;
use std::io::Write;

use pprof::protos::{self, Message};

use crate::profile::FrameKey;
use crate::report::Report;
use crate::symbols::Kind;

struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut s = Self {
            table: Vec::new(),
            index: HashMap::new(),
        };
        s.id("");
        s
    }
    fn id(&mut self, v: &str) -> i64 {
        if let Some(i) = self.index.get(v) {
            return *i;
        }
        let i = self.table.len() as i64;
        self.table.push(super::printable(v).into_owned());
        self.index.insert(v.to_string(), i);
        i
    }
}

/// Synthetic address spaces: each mapping gets its own range so addresses never collide.
const FILE_SPACE: u64 = 1 << 40;
const PYTHON_MAPPING_BASE: u64 = 0xfe << 40;

pub fn encode(r: &Report) -> protos::Profile {
    let mut st = Strings::new();
    let mut p = header(r, &mut st);
    p.mapping = mappings(r, &mut st);
    (p.location, p.function) = locations(r, &mut st);
    p.sample = samples(r, &mut st);
    p.string_table = st.table;
    p
}

/// Sample types, period, time, duration, comment.
fn header(r: &Report, st: &mut Strings) -> protos::Profile {
    let mut sample_type = vec![
        protos::ValueType {
            ty: st.id("samples"),
            unit: st.id("count"),
        },
        protos::ValueType {
            ty: st.id("cpu"),
            unit: st.id("nanoseconds"),
        },
    ];
    // --off-cpu: the time off the CPU, and both together (the default view then).
    if r.offcpu {
        for ty in ["off-cpu", "wall"] {
            sample_type.push(protos::ValueType {
                ty: st.id(ty),
                unit: st.id("nanoseconds"),
            });
        }
    }
    let mut p = protos::Profile {
        sample_type,
        ..Default::default()
    };
    p.period_type = Some(protos::ValueType {
        ty: st.id("cpu"),
        unit: st.id("nanoseconds"),
    });
    p.period = r.period_ns as i64;
    p.time_nanos = r
        .start
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    p.duration_nanos = r.duration.as_nanos() as i64;
    p.default_sample_type = st.id(if r.offcpu { "wall" } else { "cpu" });
    p.comment = vec![st.id(&format!(
        "perfpy {}: {}",
        env!("CARGO_PKG_VERSION"),
        r.command
    ))];

    p
}

/// One mapping per file the stacks use, the program's executable first; then the kernel's and
/// the Python frames' synthetic ones.
fn mappings(r: &Report, st: &mut Strings) -> Vec<protos::Mapping> {
    // Mappings: one per file (id = file id + 3), first, so that `go tool pprof` shows the
    // program's file as the profile's main file; then 1 = kernel, 2 = python.
    let mut mappings: Vec<protos::Mapping> = Vec::new();
    let mut used_files: Vec<bool> = vec![false; r.files.len()];
    for k in &r.locations {
        if let FrameKey::File { file, .. } = k {
            used_files[file.index()] = true;
        }
    }
    // The main file first: `go tool pprof` names the profile after the first mapping
    // ("File: python3.12", not "File: libc.so.6"). It is the executable of the process with
    // the most samples, listed even when its own frames were left out of the stacks.
    let main = main_file(r);
    let mut order: Vec<usize> = (0..r.files.len()).collect();
    if let Some(m) = main {
        used_files[m.index()] = true;
        order.retain(|i| *i != m.index());
        order.insert(0, m.index());
    }
    for id in order {
        let (path, build_id) = &r.files[id];
        if !used_files[id] {
            continue;
        }
        let base = (id as u64 + 1) * FILE_SPACE;
        mappings.push(protos::Mapping {
            id: id as u64 + 3,
            memory_start: base,
            memory_limit: base + FILE_SPACE,
            file_offset: 0,
            filename: st.id(path),
            build_id: st.id(&build_id.as_ref().map(|b| hex(b)).unwrap_or_default()),
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        });
    }

    // Mappings: 1 = kernel, 2 = python, then one per file (id = file id + 3).
    mappings.push(protos::Mapping {
        id: 1,
        memory_start: 0xffff_0000_0000_0000,
        memory_limit: u64::MAX,
        filename: st.id("[kernel.kallsyms]"),
        has_functions: true,
        ..Default::default()
    });
    mappings.push(protos::Mapping {
        id: 2,
        memory_start: PYTHON_MAPPING_BASE,
        memory_limit: PYTHON_MAPPING_BASE + FILE_SPACE,
        filename: st.id("[python]"),
        has_functions: true,
        has_filenames: true,
        ..Default::default()
    });
    mappings
}

/// The locations the samples use, with their functions (inlined ones included).
fn locations(r: &Report, st: &mut Strings) -> (Vec<protos::Location>, Vec<protos::Function>) {
    // Functions and locations.
    let mut functions: HashMap<(String, String), u64> = HashMap::new();
    let mut fn_list: Vec<protos::Function> = Vec::new();
    let mut locations = Vec::with_capacity(r.locations.len());
    let mut used = vec![false; r.locations.len()];
    for s in &r.samples {
        for l in &s.locs {
            used[*l as usize] = true;
        }
    }
    for (i, key) in r.locations.iter().enumerate() {
        if !used[i] {
            continue;
        }
        let res = &r.resolved[i];
        let (mapping_id, address) = match *key {
            FrameKey::Kernel(a) => (1, a),
            FrameKey::File { file, offset } => {
                (file.0 as u64 + 3, (file.0 as u64 + 1) * FILE_SPACE + offset)
            }
            FrameKey::Anon { addr, .. } => (2, PYTHON_MAPPING_BASE + (addr & (FILE_SPACE - 1))),
            FrameKey::Truncated(_) | FrameKey::Wait(_) => (0, 0),
            FrameKey::Py { func, line } => (
                2,
                PYTHON_MAPPING_BASE + (1 << 39) + ((func as u64) << 20) + line as u64,
            ),
        };
        let mut lines = Vec::with_capacity(res.frames.len());
        for f in &res.frames {
            let file = f.file.clone().unwrap_or_default();
            let fid = *functions
                .entry((f.function.clone(), file.clone()))
                .or_insert_with(|| {
                    let id = fn_list.len() as u64 + 1;
                    let system_name = match res.kind {
                        Kind::Python | Kind::PythonEbpf => format!("py::{}:{}", f.function, file),
                        _ => f.function.clone(),
                    };
                    fn_list.push(protos::Function {
                        id,
                        name: st.id(&f.function),
                        system_name: st.id(&system_name),
                        filename: st.id(&file),
                        start_line: 0,
                    });
                    id
                });
            lines.push(protos::Line {
                function_id: fid,
                line: f.line.unwrap_or(0) as i64,
            });
        }
        locations.push(protos::Location {
            id: i as u64 + 1,
            mapping_id,
            address,
            line: lines,
            is_folded: false,
        });
    }

    (locations, fn_list)
}

/// The samples with their values and labels.
fn samples(r: &Report, st: &mut Strings) -> Vec<protos::Sample> {
    let mut out = Vec::with_capacity(r.samples.len());
    let (k_pyver, k_container) = (st.id("python_version"), st.id("container_id"));
    let (k_pid, k_tid, k_comm, k_thread, k_from) = (
        st.id("pid"),
        st.id("tid"),
        st.id("comm"),
        st.id("thread_name"),
        st.id("frames_from"),
    );
    for s in &r.samples {
        let label_str = |st: &mut Strings, key: i64, v: &str| protos::Label {
            key,
            str: st.id(v),
            ..Default::default()
        };
        let mut label = vec![
            protos::Label {
                key: k_pid,
                num: s.pid as i64,
                ..Default::default()
            },
            protos::Label {
                key: k_tid,
                num: s.tid.0 as i64,
                ..Default::default()
            },
            label_str(st, k_comm, &s.comm),
            label_str(st, k_thread, &s.thread),
            label_str(st, k_from, s.frames_from.label()),
        ];
        if let Some(v) = &s.python_version {
            label.push(label_str(st, k_pyver, v));
        }
        if let Some(v) = &s.container_id {
            label.push(label_str(st, k_container, v));
        }
        if let Some(w) = s.wait {
            let k = st.id("wait");
            label.push(label_str(st, k, w.label()));
        }
        let cpu_ns = s.count * r.period_ns;
        let mut value = vec![s.count as i64, cpu_ns as i64];
        if r.offcpu {
            value.extend([s.offcpu_ns as i64, (cpu_ns + s.offcpu_ns) as i64]);
        }
        out.push(protos::Sample {
            location_id: s.locs.iter().map(|l| *l as u64 + 1).collect(),
            value,
            label,
        });
    }
    out
}

pub fn write(r: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    let p = encode(r);
    let bytes = p.encode_to_vec();
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    gz.write_all(&bytes)?;
    gz.finish()?;
    Ok(())
}

/// The executable of the process with the most samples.
fn main_file(r: &Report) -> Option<FileId> {
    let mut per_file: HashMap<FileId, u64> = HashMap::new();
    for s in &r.samples {
        if let Some(f) = s.main_file {
            *per_file.entry(f).or_default() += s.count;
        }
    }
    per_file
        .into_iter()
        .filter(|(f, _)| f.index() < r.files.len())
        .max_by_key(|(f, n)| (*n, std::cmp::Reverse(*f)))
        .map(|(f, _)| f)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
