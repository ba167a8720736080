//! Where the profile goes: a file written under a temporary name beside it and renamed into
//! place once complete (an existing file is untouched until then, and no empty or partial file
//! is ever left), or stdout (`-o -`). Checked before anything is recorded.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub enum Dest {
    Stdout,
    File {
        path: PathBuf,
        tmp: PathBuf,
        file: Option<File>,
    },
}

impl Dest {
    /// Checks `path` and creates the temporary file beside it.
    pub fn prepare(path: &Path) -> Result<Dest> {
        if path.as_os_str() == "-" {
            return Ok(Dest::Stdout);
        }
        if let Ok(m) = std::fs::metadata(path) {
            let t = m.file_type();
            let kind = if t.is_dir() {
                Some("a directory")
            } else if t.is_char_device() || t.is_block_device() {
                Some("a device")
            } else if t.is_fifo() {
                Some("a FIFO")
            } else if t.is_socket() {
                Some("a socket")
            } else {
                None
            };
            if let Some(kind) = kind {
                bail!(
                    "cannot write the output file {}: it is {kind}; give a regular file with -o, or -o - for stdout",
                    path.display()
                );
            }
        }
        let name = path.file_name().with_context(|| {
            format!(
                "cannot write the output file {}: it names no file; give a file name with -o",
                path.display()
            )
        })?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = dir.join(format!(
            ".{}.perfpy-{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .with_context(|| {
                format!(
                    "cannot write the output file {}: cannot create a file in {}; choose a writable path with -o",
                    path.display(),
                    dir.display()
                )
            })?;
        Ok(Dest::File {
            path: path.to_path_buf(),
            tmp,
            file: Some(file),
        })
    }

    /// The name users read in messages.
    pub fn display(&self) -> String {
        match self {
            Dest::Stdout => "stdout".into(),
            Dest::File { path, .. } => path.display().to_string(),
        }
    }

    /// Writes the profile with `write` and puts it in place. On an error nothing is left
    /// behind and an existing file keeps its content; the error names the file.
    pub fn write_with(mut self, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
        match &mut self {
            Dest::Stdout => {
                let out = std::io::stdout();
                let mut w = std::io::BufWriter::new(out.lock());
                let r = write(&mut w).and_then(|_| w.flush().map_err(Into::into));
                match r {
                    // Whoever reads stdout stopped reading (`| head -c 100`): as for any tool
                    // in a pipeline, that is not our failure.
                    Err(e) if is_broken_pipe(&e) => Ok(()),
                    r => r.context("cannot write the profile to stdout"),
                }
            }
            Dest::File { path, tmp, file } => {
                let f = file.take().expect("written once");
                let mut w = std::io::BufWriter::new(f);
                let r = write(&mut w)
                    .and_then(|_| w.flush().map_err(anyhow::Error::from))
                    .and_then(|_| {
                        w.get_ref().sync_all()?;
                        Ok(())
                    });
                drop(w);
                let r = r.and_then(|_| std::fs::rename(&*tmp, &*path).map_err(Into::into));
                match r {
                    Ok(()) => {
                        // Renamed: nothing to remove in Drop.
                        tmp.clear();
                        Ok(())
                    }
                    Err(e) => Err(e.context(format!(
                        "cannot write the profile to {} (nothing was written there; an existing file keeps its content)",
                        path.display()
                    ))),
                }
            }
        }
    }
}

impl Drop for Dest {
    fn drop(&mut self) {
        if let Dest::File { tmp, .. } = self {
            if !tmp.as_os_str().is_empty() {
                let _ = std::fs::remove_file(&*tmp);
            }
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaced_only_when_complete() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.pb.gz");
        std::fs::write(&p, b"old").unwrap();
        let dest = Dest::prepare(&p).unwrap();
        let e = dest
            .write_with(|w| {
                w.write_all(b"partial")?;
                bail!("disk full")
            })
            .unwrap_err();
        assert!(format!("{e:#}").contains(&p.display().to_string()), "{e:#}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "temp file left"
        );
        Dest::prepare(&p)
            .unwrap()
            .write_with(|w| Ok(w.write_all(b"new")?))
            .unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn special_files_and_unwritable_places_are_refused_up_front() {
        for (p, want) in [
            ("/dev/full", "a device"),
            ("/dev/null", "a device"),
            ("/proc/version", "cannot create a file in /proc"),
            (
                "/nonexistent-dir/x.pb.gz",
                "cannot create a file in /nonexistent-dir",
            ),
            ("/tmp", "a directory"),
        ] {
            let e = Dest::prepare(Path::new(p))
                .err()
                .unwrap_or_else(|| panic!("{p} accepted"));
            assert!(format!("{e:#}").contains(want), "{p}: {e:#}");
        }
        assert!(matches!(
            Dest::prepare(Path::new("-")).unwrap(),
            Dest::Stdout
        ));
    }
}
