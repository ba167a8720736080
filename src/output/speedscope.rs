//! speedscope's own JSON format (https://www.speedscope.app/file-format-schema.json): one
//! sampled profile per thread (named `comm pid / thread tid`), frames shared, stacks root
//! first, weights in nanoseconds of CPU.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use super::printable;
use crate::report::Report;
use crate::symbols::Kind;

pub fn write(r: &Report, name: &str, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, &document(r, name))?;
    out.write_all(b"\n")
}

fn document(r: &Report, name: &str) -> Value {
    let mut frames: Vec<Value> = Vec::new();
    let mut frame_ids: HashMap<(String, Option<String>, Option<u32>), usize> = HashMap::new();
    // (pid, tid) -> (comm, thread name, stacks, weights); equal stacks merged.
    type Thread = (String, String, Vec<Vec<usize>>, Vec<u64>);
    let mut threads: BTreeMap<(u32, u32), Thread> = BTreeMap::new();
    let mut stack_ids: HashMap<(u32, u32, Vec<usize>), usize> = HashMap::new();
    for s in &r.samples {
        let mut stack = Vec::new();
        for l in s.locs.iter().rev() {
            let res = &r.resolved[*l as usize];
            for f in res.frames.iter().rev() {
                let python = matches!(res.kind, Kind::Python | Kind::PythonEbpf);
                let name = match res.kind {
                    Kind::Kernel => format!("{} [kernel]", f.function),
                    _ => f.function.clone(),
                };
                let file = f.file.as_deref().filter(|_| python);
                let key = (
                    printable(&name).into_owned(),
                    file.map(|f| printable(f).into_owned()),
                    f.line,
                );
                let id = *frame_ids.entry(key.clone()).or_insert_with(|| {
                    let mut v = json!({ "name": key.0 });
                    if let Some(file) = &key.1 {
                        v["file"] = json!(file);
                    }
                    if let Some(line) = key.2 {
                        v["line"] = json!(line);
                    }
                    frames.push(v);
                    frames.len() - 1
                });
                stack.push(id);
            }
        }
        let t = threads
            .entry((s.pid, s.tid.0))
            .or_insert_with(|| (s.comm.clone(), s.thread.clone(), Vec::new(), Vec::new()));
        let w = s.count * r.period_ns;
        match stack_ids.get(&(s.pid, s.tid.0, stack.clone())) {
            Some(i) => t.3[*i] += w,
            None => {
                stack_ids.insert((s.pid, s.tid.0, stack.clone()), t.2.len());
                t.2.push(stack);
                t.3.push(w);
            }
        }
    }
    // Heaviest thread first: speedscope opens the first profile.
    let mut profiles: Vec<(u64, Value)> = threads
        .into_iter()
        .map(|((pid, tid), (comm, thread, samples, weights))| {
            let total: u64 = weights.iter().sum();
            (
                total,
                json!({
                    "type": "sampled",
                    "name": format!("{} {pid} / {} {tid}", printable(&comm), printable(&thread)),
                    "unit": "nanoseconds",
                    "startValue": 0,
                    "endValue": total,
                    "samples": samples,
                    "weights": weights,
                }),
            )
        })
        .collect();
    profiles.sort_by_key(|p| std::cmp::Reverse(p.0));
    json!({
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "shared": { "frames": frames },
        "profiles": profiles.into_iter().map(|p| p.1).collect::<Vec<_>>(),
        "name": printable(name),
        "activeProfileIndex": 0,
        "exporter": format!("perfpy {}", env!("CARGO_PKG_VERSION")),
    })
}
