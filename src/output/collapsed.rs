//! Collapsed stacks: root first, `;`-separated, then the count.

use std::collections::BTreeMap;

use crate::report::{display_name, Report};

/// The lines, merged by stack text, sorted. The root is `comm` (the process name) when the
/// recording holds more than one process.
pub fn lines(r: &Report) -> Vec<String> {
    lines_named(r, &|l, i| display_name(&r.resolved[l as usize], i))
}

/// The lines with frames named by `name(location, inline index)`.
pub fn lines_named(r: &Report, name: &dyn Fn(u32, usize) -> String) -> Vec<String> {
    let multi = {
        let mut pids: Vec<u32> = r.samples.iter().map(|s| s.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        pids.len() > 1
    };
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for s in &r.samples {
        let mut parts: Vec<String> = Vec::new();
        if multi {
            parts.push(format!("{}-{}", super::printable(&s.comm), s.pid).replace(';', ":"));
        }
        for l in s.locs.iter().rev() {
            let res = &r.resolved[*l as usize];
            for i in (0..res.frames.len()).rev() {
                parts.push(super::printable(&name(*l, i)).replace(';', ":"));
            }
        }
        if parts.is_empty() {
            parts.push("[no stack]".into());
        }
        *merged.entry(parts.join(";")).or_default() += s.count;
    }
    merged
        .into_iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect()
}

pub fn write(r: &Report, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    for l in lines(r) {
        writeln!(out, "{l}")?;
    }
    Ok(())
}
