//! Reading another process, in one place: its memory ([`mem`]), its `/proc` files ([`proc`]),
//! the ELF files it maps ([`elf`]: one cached fact set per file, one load-bias function) and
//! the CPython version it runs ([`Version`]).
//!
//! Every crate of perfpy that looks at a target uses this one: `perfpy-inject` (discovery,
//! injection), `perfpy-bpf` (the code-object and debug-offset readers) and the binary
//! (sampling, `info`, `dump`). It sits under `inject/` because the design fixes the top-level
//! folders, and it depends on no other crate of perfpy, so any of them can use it.

pub mod elf;
pub mod mem;
pub mod proc;
mod version;

pub use mem::{LiveMemory, ReadMemory};
pub use version::Version;
