//! SVG flamegraph from the collapsed lines, by inferno.
//!
//! A Python frame's box shows the file's base name (`hot (split.py:13)`); its tooltip (the SVG
//! `<title>`, also what the search and the details line use) shows the full path. inferno's
//! per-function attributes would replace the whole tooltip, sample counts included, so the
//! titles are rewritten after rendering instead.

use std::collections::HashMap;

use crate::report::{display_name, Report};
use crate::symbols::Kind;

pub fn write(r: &Report, title: &str, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let (names, full) = short_names(r);
    let lines = super::collapsed::lines_named(r, &|l, i| {
        names
            .get(&(l, i))
            .cloned()
            .unwrap_or_else(|| display_name(&r.resolved[l as usize], i))
    });
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = super::printable(title).into_owned();
    opts.count_name = "samples".into();
    if lines.is_empty() {
        // inferno refuses empty input; an empty profile is still a valid (empty) SVG.
        write!(
            out,
            "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"600\" height=\"40\"><text x=\"10\" y=\"24\">{}: no samples</text></svg>\n",
            escape(&super::printable(title))
        )?;
        return Ok(());
    }
    let mut svg = Vec::new();
    inferno::flamegraph::from_lines(&mut opts, lines.iter().map(|s| s.as_str()), &mut svg)?;
    let svg = String::from_utf8(svg)?;
    out.write_all(full_titles(&svg, &full).as_bytes())?;
    Ok(())
}

/// Per (location, inline index) of a Python frame: its name with the file's base name; and
/// the full name of each short name. A short name two different files share keeps the full
/// path (the boxes must not merge).
#[allow(clippy::type_complexity)]
fn short_names(r: &Report) -> (HashMap<(u32, usize), String>, HashMap<String, String>) {
    let mut by_short: HashMap<String, Vec<(u32, usize, String)>> = HashMap::new();
    for (l, res) in r.resolved.iter().enumerate() {
        if !matches!(res.kind, Kind::Python | Kind::PythonEbpf) {
            continue;
        }
        for (i, f) in res.frames.iter().enumerate() {
            let Some(file) = &f.file else { continue };
            let base = file.rsplit('/').next().unwrap_or(file);
            if base == file {
                continue;
            }
            let mut short = f.clone();
            short.file = Some(base.to_string());
            let res_short = crate::symbols::Resolved {
                frames: vec![short],
                kind: res.kind,
            };
            let s = super::printable(&display_name(&res_short, 0)).replace(';', ":");
            let full = super::printable(&display_name(res, i)).replace(';', ":");
            by_short.entry(s).or_default().push((l as u32, i, full));
        }
    }
    let (mut names, mut full) = (HashMap::new(), HashMap::new());
    for (short, v) in by_short {
        let first = &v[0].2;
        if v.iter().all(|(_, _, f)| f == first) {
            full.insert(short.clone(), first.clone());
            for (l, i, _) in v {
                names.insert((l, i), short.clone());
            }
        }
    }
    (names, full)
}

/// Replaces `<title>SHORT (N samples, P%)</title>` by the full name.
fn full_titles(svg: &str, full: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(svg.len() + svg.len() / 4);
    let mut rest = svg;
    while let Some(i) = rest.find("<title>") {
        let (head, tail) = rest.split_at(i + "<title>".len());
        out.push_str(head);
        let Some(end) = tail.find("</title>") else {
            rest = tail;
            break;
        };
        let text = unescape(&tail[..end]);
        let replaced = text.rfind(" (").and_then(|p| {
            full.get(&text[..p])
                .map(|f| escape(&format!("{f}{}", &text[p..])))
        });
        match replaced {
            Some(t) => out.push_str(&t),
            None => out.push_str(&tail[..end]),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_get_the_full_path() {
        let full: HashMap<String, String> = [(
            "&lt;module&gt; (a.py:3)"
                .replace("&lt;", "<")
                .replace("&gt;", ">"),
            "<module> (/srv/app/a.py:3)".to_string(),
        )]
        .into();
        let svg = "<g><title>&lt;module&gt; (a.py:3) (5 samples, 50.00%)</title><text>x</text></g><title>other (1 samples, 1%)</title>";
        assert_eq!(
            full_titles(svg, &full),
            "<g><title>&lt;module&gt; (/srv/app/a.py:3) (5 samples, 50.00%)</title><text>x</text></g><title>other (1 samples, 1%)</title>"
        );
    }
}
