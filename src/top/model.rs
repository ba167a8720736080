//! The view model of `perfpy top`: named stacks with their counts per thread, over the last
//! interval and since the start, turned into rows of functions with their own and total
//! shares, filtered by thread, folded to Python frames where a stack has them, and sorted.
//! Pure: no terminal, no sampling (the tests below drive it with made-up stacks).

use std::collections::{BTreeMap, HashMap, HashSet};

/// What kind of code a frame is: decides what folding hides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    Python,
    Native,
    /// CPython's own native frames (eval loop, call machinery): hidden in stacks with Python
    /// frames, as `record` does unless --keep-interpreter-frames.
    Interpreter,
    Kernel,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    pub name: String,
    pub class: Class,
}

/// Frame ids of one stack, leaf first, and the thread it ran in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Stack {
    pub tid: u32,
    pub frames: Vec<u32>,
}

/// Which figure rows are sorted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    Own,
    Total,
    Name,
}

/// How the table is shown: changed by keys, never by new samples.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub sort: SortKey,
    /// Own and total sorted by the last interval (true) or since the start.
    pub by_interval: bool,
    /// Only this thread (tid).
    pub thread: Option<u32>,
    /// Stacks with Python frames show only those (false: native and kernel frames too).
    pub python_only: bool,
}

impl Default for View {
    fn default() -> View {
        View {
            sort: SortKey::Own,
            by_interval: true,
            thread: None,
            python_only: true,
        }
    }
}

/// One function's figures: samples where it is the leaf (own) and where it is on the stack
/// (total), over the last interval and since the start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Row {
    pub name: String,
    pub own_now: u64,
    pub total_now: u64,
    pub own_all: u64,
    pub total_all: u64,
}

/// The rows to show and the sample counts their shares are of.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub rows: Vec<Row>,
    pub samples_now: u64,
    pub samples_all: u64,
}

impl Table {
    /// A share in percent of the interval's (`now`) or all samples.
    pub fn share(&self, n: u64, now: bool) -> f64 {
        let of = if now {
            self.samples_now
        } else {
            self.samples_all
        };
        if of == 0 {
            0.0
        } else {
            100.0 * n as f64 / of as f64
        }
    }
}

#[derive(Default)]
pub struct Model {
    frames: Vec<Frame>,
    frame_ids: HashMap<Frame, u32>,
    stacks: Vec<Stack>,
    stack_ids: HashMap<Stack, u32>,
    /// Per stack id: samples in the interval being taken, in the last one complete, and
    /// since the start.
    pending: HashMap<u32, u64>,
    now: HashMap<u32, u64>,
    all: HashMap<u32, u64>,
    threads: BTreeMap<u32, String>,
}

impl Model {
    pub fn frame(&mut self, name: String, class: Class) -> u32 {
        let f = Frame { name, class };
        if let Some(id) = self.frame_ids.get(&f) {
            return *id;
        }
        let id = self.frames.len() as u32;
        self.frames.push(f.clone());
        self.frame_ids.insert(f, id);
        id
    }

    pub fn thread_name(&mut self, tid: u32, name: &str) {
        if !self.threads.contains_key(&tid) || !name.is_empty() {
            self.threads.insert(tid, name.to_string());
        }
    }

    /// Threads seen so far (tid, name), by tid.
    pub fn threads(&self) -> impl Iterator<Item = (u32, &str)> {
        self.threads.iter().map(|(t, n)| (*t, n.as_str()))
    }

    /// The interval being taken is complete: it becomes the last interval shown, and a new one
    /// begins.
    pub fn next_interval(&mut self) {
        self.now = std::mem::take(&mut self.pending);
    }

    /// Adds samples of a stack to the interval being taken (and since the start) or, with
    /// `interval` false, since the start only (samples taken while the view was paused).
    pub fn add(&mut self, stack: Stack, count: u64, interval: bool) {
        self.threads.entry(stack.tid).or_default();
        let id = match self.stack_ids.get(&stack) {
            Some(id) => *id,
            None => {
                let id = self.stacks.len() as u32;
                self.stacks.push(stack.clone());
                self.stack_ids.insert(stack, id);
                id
            }
        };
        if interval {
            *self.pending.entry(id).or_default() += count;
        }
        *self.all.entry(id).or_default() += count;
    }

    /// The thread after `current` in tid order (None: all threads; after the last: None).
    pub fn next_thread(&self, current: Option<u32>) -> Option<u32> {
        match current {
            None => self.threads.keys().next().copied(),
            Some(t) => self
                .threads
                .range(t.saturating_add(1)..)
                .next()
                .map(|(t, _)| *t),
        }
    }

    /// The frames of a stack as the view shows them, leaf first.
    fn shown(&self, stack: &Stack, python_only: bool) -> Vec<u32> {
        let class = |f: &u32| self.frames[*f as usize].class;
        let has_python = stack.frames.iter().any(|f| class(f) == Class::Python);
        stack
            .frames
            .iter()
            .copied()
            .filter(|f| match class(f) {
                Class::Python => true,
                Class::Interpreter => !has_python,
                Class::Native | Class::Kernel => !(has_python && python_only),
            })
            .collect()
    }

    /// The table for `view`: every function of the stacks it selects, sorted.
    pub fn table(&self, view: &View) -> Table {
        let mut rows: HashMap<u32, Row> = HashMap::new();
        let mut t = Table::default();
        let mut seen = HashSet::new();
        for (id, stack) in self.stacks.iter().enumerate() {
            if view.thread.is_some_and(|tid| tid != stack.tid) {
                continue;
            }
            let id = id as u32;
            let now = self.now.get(&id).copied().unwrap_or(0);
            let all = self.all.get(&id).copied().unwrap_or(0);
            if all == 0 {
                continue;
            }
            t.samples_now += now;
            t.samples_all += all;
            let frames = self.shown(stack, view.python_only);
            seen.clear();
            for (i, f) in frames.iter().enumerate() {
                let row = rows.entry(*f).or_default();
                if i == 0 {
                    row.own_now += now;
                    row.own_all += all;
                }
                // Recursion counts once in total.
                if seen.insert(*f) {
                    row.total_now += now;
                    row.total_all += all;
                }
            }
        }
        t.rows = rows
            .into_iter()
            .map(|(f, mut r)| {
                r.name = self.frames[f as usize].name.clone();
                r
            })
            .collect();
        sort(&mut t.rows, view);
        t
    }
}

/// Sorts rows: by the figure asked, heaviest first (ties by name), or by name.
pub fn sort(rows: &mut [Row], view: &View) {
    let key = |r: &Row| match (view.sort, view.by_interval) {
        (SortKey::Own, true) => (r.own_now, r.own_all),
        (SortKey::Own, false) => (r.own_all, r.own_now),
        (SortKey::Total, true) => (r.total_now, r.total_all),
        (SortKey::Total, false) => (r.total_all, r.total_now),
        (SortKey::Name, _) => (0, 0),
    };
    rows.sort_by(|a, b| key(b).cmp(&key(a)).then_with(|| a.name.cmp(&b.name)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// main → work → spin (Python) over libc memcpy and a kernel frame, in thread 1; main →
    /// idle in thread 2; a native-only stack in thread 3.
    fn model() -> Model {
        let mut m = Model::default();
        let main = m.frame("main (a.py:1)".into(), Class::Python);
        let work = m.frame("work (a.py:5)".into(), Class::Python);
        let spin = m.frame("spin (a.py:9)".into(), Class::Python);
        let eval = m.frame("_PyEval_EvalFrameDefault".into(), Class::Interpreter);
        let memcpy = m.frame("memcpy".into(), Class::Native);
        let kern = m.frame("asm_sysvec_apic_timer_interrupt_[k]".into(), Class::Kernel);
        let idle = m.frame("idle (a.py:20)".into(), Class::Python);
        let gc = m.frame("gc_thread".into(), Class::Native);
        m.thread_name(1, "MainThread");
        m.thread_name(2, "worker");
        m.add(
            Stack {
                tid: 1,
                frames: vec![spin, eval, work, eval, main],
            },
            60,
            true,
        );
        m.add(
            Stack {
                tid: 1,
                frames: vec![kern, memcpy, work, eval, main],
            },
            20,
            true,
        );
        m.add(
            Stack {
                tid: 2,
                frames: vec![idle, main],
            },
            10,
            true,
        );
        m.add(
            Stack {
                tid: 3,
                frames: vec![gc, eval],
            },
            10,
            true,
        );
        m.next_interval();
        m
    }

    fn row<'a>(t: &'a Table, name: &str) -> &'a Row {
        t.rows.iter().find(|r| r.name.starts_with(name)).unwrap()
    }

    #[test]
    fn own_and_total_with_python_frames_where_present() {
        let t = model().table(&View::default());
        assert_eq!(t.samples_now, 100);
        let names: Vec<&str> = t.rows.iter().map(|r| r.name.as_str()).collect();
        // work is the leaf once memcpy and the kernel frame are folded away.
        assert_eq!(names[0], "spin (a.py:9)");
        assert_eq!(names[1], "work (a.py:5)");
        assert_eq!(row(&t, "work").own_now, 20);
        assert_eq!(row(&t, "work").total_now, 80);
        assert_eq!(row(&t, "main").total_now, 90);
        assert_eq!(row(&t, "main").own_now, 0);
        // A stack without Python frames keeps its native ones, the interpreter's included.
        assert_eq!(row(&t, "gc_thread").own_now, 10);
        assert_eq!(row(&t, "_PyEval").total_now, 10);
        assert!(!names.contains(&"memcpy"));
        assert_eq!(t.share(80, true), 80.0);
    }

    #[test]
    fn native_and_kernel_frames_on_request() {
        let v = View {
            python_only: false,
            ..View::default()
        };
        let t = model().table(&v);
        assert_eq!(row(&t, "asm_sysvec").own_now, 20);
        assert_eq!(row(&t, "memcpy").total_now, 20);
        assert_eq!(row(&t, "work").own_now, 0);
        // The interpreter's frames stay hidden under Python code.
        assert_eq!(row(&t, "_PyEval").total_now, 10);
    }

    #[test]
    fn interval_and_since_start() {
        let mut m = model();
        let idle = m.frame("idle (a.py:20)".into(), Class::Python);
        let main = m.frame("main (a.py:1)".into(), Class::Python);
        m.add(
            Stack {
                tid: 2,
                frames: vec![idle, main],
            },
            30,
            true,
        );
        // Paused: since the start only.
        m.add(
            Stack {
                tid: 2,
                frames: vec![idle, main],
            },
            5,
            false,
        );
        // Not shown before the interval is complete.
        assert_eq!(m.table(&View::default()).samples_now, 100);
        m.next_interval();
        let t = m.table(&View::default());
        assert_eq!(t.samples_now, 30);
        assert_eq!(t.samples_all, 135);
        assert_eq!(t.rows[0].name, "idle (a.py:20)");
        assert_eq!((t.rows[0].own_now, t.rows[0].own_all), (30, 45));
        let v = View {
            by_interval: false,
            ..View::default()
        };
        assert_eq!(m.table(&v).rows[0].name, "spin (a.py:9)");
    }

    #[test]
    fn sorting_by_total_and_name() {
        let m = model();
        let t = m.table(&View {
            sort: SortKey::Total,
            ..View::default()
        });
        assert_eq!(t.rows[0].name, "main (a.py:1)");
        let t = m.table(&View {
            sort: SortKey::Name,
            ..View::default()
        });
        let names: Vec<&str> = t.rows.iter().map(|r| r.name.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }

    #[test]
    fn thread_filter_and_cycling() {
        let m = model();
        assert_eq!(m.next_thread(None), Some(1));
        assert_eq!(m.next_thread(Some(1)), Some(2));
        assert_eq!(m.next_thread(Some(3)), None);
        let t = m.table(&View {
            thread: Some(2),
            ..View::default()
        });
        assert_eq!(t.samples_now, 10);
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.rows[0].name, "idle (a.py:20)");
        assert_eq!(t.share(t.rows[0].own_now, true), 100.0);
    }

    #[test]
    fn recursion_counts_once_in_total() {
        let mut m = Model::default();
        let f = m.frame("fib (f.py:2)".into(), Class::Python);
        m.add(
            Stack {
                tid: 1,
                frames: vec![f, f, f],
            },
            7,
            true,
        );
        m.next_interval();
        let t = m.table(&View::default());
        assert_eq!((t.rows[0].own_now, t.rows[0].total_now), (7, 7));
    }
}
