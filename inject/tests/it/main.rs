//! perfpy-inject's integration tests, one binary: injection into real interpreters
//! (`inject`) and processes that only look like Python (`fake_libpython`). Shared helpers come
//! from `perfpy-test-support` (testdata/support).

mod fake_libpython;
mod inject;
