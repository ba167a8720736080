//! `perfpy top`: a live view of the sampling pipeline (see `record::live` for the driver).

pub mod model;
pub mod screen;
