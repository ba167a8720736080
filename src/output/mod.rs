//! Writers: gzip'd pprof, collapsed stacks, SVG flamegraph, speedscope JSON; OTLP profiles to a Collector.

pub mod collapsed;
pub mod dest;
pub mod flamegraph;
pub mod otlp;
pub mod otlp_export;
pub mod pprof;
#[cfg(test)]
mod snapshots;
pub mod speedscope;

use std::borrow::Cow;

use clap::ValueEnum;

/// `s` with each control character (C0, DEL, C1) and XML-forbidden noncharacter (U+FFFE,
/// U+FFFF) written as an escape (`\x00`, `\u{fffe}`), for every writer. No real function or
/// file name holds them, but a name read from memory that was reused may: a NUL makes an SVG
/// invalid XML, a newline splits a collapsed line.
pub fn printable(s: &str) -> Cow<'_, str> {
    let bad = |c: char| c.is_control() || c == '\u{fffe}' || c == '\u{ffff}';
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if bad(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// gzip'd pprof protobuf (go tool pprof, Pyroscope, Parca, speedscope)
    Pprof,
    /// one line per stack: `frame;frame;... count` (inferno, speedscope, flamegraph.pl)
    Collapsed,
    /// SVG flamegraph
    Flamegraph,
    /// speedscope's JSON (one sampled profile per thread)
    Speedscope,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Pprof => "pb.gz",
            Format::Collapsed => "txt",
            Format::Flamegraph => "svg",
            Format::Speedscope => "speedscope.json",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("Klass.method"), "Klass.method");
        assert!(matches!(
            printable("é <module>"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(printable("a\0b\n\u{7f}\u{85}"), "a\\x00b\\x0a\\x7f\\x85");
        assert_eq!(printable("\u{fffe}x"), "\\u{fffe}x");
    }
}
