//! perfpy-bpf's integration tests, one binary: offset tables against each installed CPython's
//! headers (`offsets`), the `_Py_DebugOffsets` layouts and a live 3.13's table
//! (`debug_offsets`), and the walker on synthetic 3.14/3.15 memory (`synthetic_frames`).
//! Shared helpers come from `perfpy-test-support` (testdata/support).

mod debug_offsets;
mod offsets;
mod synthetic_frames;
