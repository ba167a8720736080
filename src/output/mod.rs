//! Writers: gzip'd pprof, collapsed stacks, SVG flamegraph; OTLP profiles to a Collector.

pub mod collapsed;
pub mod dest;
pub mod flamegraph;
pub mod otlp;
pub mod otlp_export;
pub mod pprof;

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// gzip'd pprof protobuf (go tool pprof, Pyroscope, Parca, speedscope)
    Pprof,
    /// one line per stack: `frame;frame;... count` (inferno, speedscope, flamegraph.pl)
    Collapsed,
    /// SVG flamegraph
    Flamegraph,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Pprof => "pb.gz",
            Format::Collapsed => "txt",
            Format::Flamegraph => "svg",
        }
    }
}
