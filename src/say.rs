//! Lines for the user. They never panic nor kill perfpy: SIGPIPE is ignored, and a closed or
//! full stderr or stdout (`perfpy record ... 2>&1 | head -1`) loses the line, not the profile.

/// A line on stderr (messages, warnings, the summary).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// Text on stderr without a newline (the status line).
macro_rules! say_part {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let mut e = std::io::stderr();
        let _ = write!(e, $($t)*);
        let _ = e.flush();
    }};
}

/// A line on stdout (the answer of `info` and `inject`).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}
