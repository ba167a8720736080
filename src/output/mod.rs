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

use clap::ValueEnum;

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
