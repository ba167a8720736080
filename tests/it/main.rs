//! perfpy's integration tests, one binary (one link, one build shared by all): each module is
//! a user-facing area, run against the real binary, real perf events and real interpreters.
//! What the modules share is the `perfpy-test-support` crate (testdata/support). The fault
//! suite (`fault::`) is run on its own, last, by scripts/test.sh.

mod all;
mod debian;
mod dump;
mod ebpf;
mod fault;
mod hostile;
mod inject_record;
mod offcpu;
mod otlp;
mod outputs;
mod permissions;
mod record;
mod replay;
mod sessions;
mod short_lived;
mod symbols;
mod top;
