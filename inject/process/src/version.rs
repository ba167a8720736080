//! The CPython version a process runs.

use std::fmt;

/// A CPython version: `major.minor`, and the micro version when it is known (from the
/// interpreter's `Py_Version` constant, 3.11+; a version read from a file name has none).
///
/// Ordered as the numbers are (`3.12` < `3.12.0` < `3.12.1` < `3.13`), so comparisons with
/// [`Version::new`] ask "this minor version or later".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u8,
    pub minor: u8,
    pub micro: Option<u8>,
}

impl Version {
    /// `major.minor` (no micro version).
    pub const fn new(major: u8, minor: u8) -> Self {
        Self {
            major,
            minor,
            micro: None,
        }
    }

    /// From `PY_VERSION_HEX` (the value of `Py_Version`): `0x030c01f0` is 3.12.1. `None` for
    /// a major version that is not CPython's (2 or 3).
    pub fn from_hex(hex: u32) -> Option<Self> {
        let (major, minor, micro) = ((hex >> 24) as u8, (hex >> 16) as u8, (hex >> 8) as u8);
        (major == 2 || major == 3).then_some(Self {
            major,
            minor,
            micro: Some(micro),
        })
    }

    /// `X.Y` from a file name such as `libpython3.9.so.1.0`, `libpython2.7.so`, `python3.11`,
    /// `python3.13t`: the fallback for an interpreter without `Py_Version` (before 3.11).
    pub fn from_file_name(path: &str) -> Option<Self> {
        let name = path.rsplit('/').next()?;
        let rest = name
            .strip_prefix("libpython")
            .or_else(|| name.strip_prefix("python"))?;
        let mut it = rest.splitn(3, '.');
        let major: u8 = it.next()?.parse().ok()?;
        let minor: String = it
            .next()?
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        let minor: u8 = minor.parse().ok()?;
        (major == 2 || major == 3).then_some(Self::new(major, minor))
    }

    /// `(major, minor)`: the key of per-minor-version tables.
    pub const fn minor_pair(self) -> (u8, u8) {
        (self.major, self.minor)
    }

    /// This minor version or a later one.
    pub fn at_least(self, major: u8, minor: u8) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.micro {
            Some(micro) => write!(f, "{}.{}.{micro}", self.major, self.minor),
            None => write!(f, "{}.{}", self.major, self.minor),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn versions_from_names() {
        let name = |p| Version::from_file_name(p).map(|v| v.to_string());
        assert_eq!(name("/x/libpython3.9.so.1.0").as_deref(), Some("3.9"));
        assert_eq!(name("libpython2.7.so").as_deref(), Some("2.7"));
        assert_eq!(name("/usr/bin/python3.11").as_deref(), Some("3.11"));
        assert_eq!(name("/usr/bin/python3.13t").as_deref(), Some("3.13"));
        assert_eq!(name("/usr/bin/perl"), None);
        assert_eq!(name("/usr/bin/python4.1"), None);
    }

    #[test]
    fn versions_from_hex_and_order() {
        let v = Version::from_hex(0x030c_01f0).unwrap();
        assert_eq!(v.to_string(), "3.12.1");
        assert_eq!(v.minor_pair(), (3, 12));
        assert!(v.at_least(3, 12) && !v.at_least(3, 13));
        assert_eq!(Version::from_hex(0x0709_0000), None);
        assert!(Version::new(3, 12) < v && v < Version::new(3, 13));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any path a process maps (a name from `/proc/PID/maps`, odd bytes included): a
        /// version only for a python-named file, and then `2.Y` or `3.Y`.
        #[test]
        fn version_from_any_name(path in "\\PC{0,80}|/[a-z/]{0,20}(lib)?python[0-9.]{0,30}[a-z0-9.]{0,10}") {
            if let Some(v) = Version::from_file_name(&path) {
                let name = path.rsplit('/').next().unwrap();
                prop_assert!(name.starts_with("python") || name.starts_with("libpython"), "{}", path);
                prop_assert!(v.major == 2 || v.major == 3, "{}", v);
                prop_assert_eq!(v.micro, None);
            }
        }

        /// Well-formed names (any directory, `m`/`t`/`d` builds, `.so` suffixes) give exactly
        /// their version.
        #[test]
        fn version_from_well_formed_names(
            dir in "(/[a-zA-Z0-9_ .-]{1,12}){0,4}",
            lib in any::<bool>(),
            major in 2u8..=3,
            minor in any::<u8>(),
            suffix in "(m|t|d)?(\\.so(\\.1\\.0)?)?",
        ) {
            let path = format!("{dir}/{}python{major}.{minor}{suffix}", if lib { "lib" } else { "" });
            prop_assert_eq!(Version::from_file_name(&path), Some(Version::new(major, minor)));
        }
    }
}
