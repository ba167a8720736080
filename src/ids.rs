//! The numbers the collection stage passes around, each a type of its own so that one is never
//! taken for another: a process key is not a pid, a thread id is not a process key, a file id
//! is not an offset. (Pids stay `u32`: every kernel, `/proc` and BPF interface takes one.)

/// A thread id as perfpy sees it (in its own PID namespace).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tid(pub u32);

/// A process as the recording knows it: one pid running one program (an exec, or a pid reused
/// by another process, gets a new key). Its index in the collector's list of processes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessKey(pub u32);

impl ProcessKey {
    /// Its place in the collector's list.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A mapped file opened for the recording (once per device and inode): its index in
/// `Files::list`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u32);

impl FileId {
    /// Its place in `Files::list`.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for ProcessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Display for Tid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
