//! `perfpy top`: the recording's sampling session taken interval by interval
//! ([`super::interval::Periodic`]: same events, same walker, same cost on the targets as
//! `record` at the same rate; each location named once, in the interval it first appears),
//! fed into the view model of `crate::top`, on a terminal screen or as plain tables.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::interval::{Interval, Periodic};
use super::{write, Options};
use crate::output::dest::Dest;
use crate::profile::FrameKey;
use crate::report::Report;
use crate::symbols::Kind;
use crate::top::model::{Class, Model, Stack, View};
use crate::top::screen::{self, Action, Header, Terminal};

/// What `top` adds to a recording's options.
pub struct TopOptions {
    /// How often the view is refreshed (and the length of "the last interval").
    pub interval: Duration,
    /// Show only this thread at first (`--tid`).
    pub tid: Option<u32>,
    /// Show only the first thread of this name at first (`--thread`).
    pub thread: Option<String>,
    /// Rows per plain table (no terminal).
    pub rows: usize,
}

/// On a terminal, the session is read in slices this long, so that keys are answered promptly;
/// the view's interval is made of such slices.
const SLICE: Duration = Duration::from_millis(100);

fn class(k: Kind) -> Class {
    match k {
        Kind::Python | Kind::PythonEbpf => Class::Python,
        Kind::Kernel => Class::Kernel,
        Kind::Native { interpreter: true } => Class::Interpreter,
        Kind::Native { interpreter: false } | Kind::Other => Class::Native,
    }
}

/// What the intervals add up to: the model, the header's figures and, with -o, the profile of
/// the whole run.
struct Feed {
    model: Model,
    header: Header,
    /// The whole run's profile (with -o).
    whole: Option<Whole>,
}

impl Feed {
    fn new(header: Header, keep: bool) -> Feed {
        Feed {
            model: Model::default(),
            header,
            whole: keep.then(Whole::new),
        }
    }

    /// Adds an interval's samples: to the view's current interval, or (paused) only to the
    /// figures since the start.
    fn add(&mut self, iv: Interval, current: bool) {
        let r = &iv.report;
        let m = &mut self.model;
        for s in &r.samples {
            let frames = s
                .locs
                .iter()
                .flat_map(|l| {
                    let res = &r.resolved[*l as usize];
                    (0..res.frames.len()).map(move |i| (res, i))
                })
                .map(|(res, i)| m.frame(crate::report::display_name(res, i), class(res.kind)))
                .collect();
            m.thread_name(s.tid.0, &s.thread);
            m.add(
                Stack {
                    tid: s.tid.0,
                    frames,
                },
                s.count,
                current,
            );
            if let Some(v) = &s.python_version {
                let v = format!("CPython {v}");
                if !self.header.python.split(", ").any(|p| p == v) {
                    if !self.header.python.is_empty() {
                        self.header.python.push_str(", ");
                    }
                    self.header.python.push_str(&v);
                }
            }
            use crate::report::FramesFrom;
            match s.frames_from {
                FramesFrom::Ebpf | FramesFrom::EbpfAndTrampoline => {
                    self.header.frames_from = "eBPF walker".into()
                }
                FramesFrom::Trampoline if self.header.frames_from.is_empty() => {
                    self.header.frames_from = "perf trampoline".into()
                }
                _ => {}
            }
        }
        self.header.samples += iv.samples;
        self.header.lost += iv.lost;
        if let Some(w) = self.whole.as_mut() {
            w.add(iv.report);
        }
    }
}

/// The whole run's profile (`-o`), from the intervals' reports: a location (the same key in
/// every interval) and a stack of a thread are kept once, so that memory grows with the distinct
/// stacks, as in a recording, not with the number of intervals.
struct Whole {
    report: Report,
    ids: HashMap<FrameKey, u32>,
    stacks: HashMap<(Vec<u32>, u32, u32), usize>,
}

impl Whole {
    fn new() -> Whole {
        Whole {
            report: Report {
                locations: Vec::new(),
                resolved: Vec::new(),
                samples: Vec::new(),
                period_ns: 0,
                start: std::time::SystemTime::now(),
                duration: Duration::ZERO,
                files: Vec::new(),
                command: std::env::args().collect::<Vec<_>>().join(" "),
                offcpu: false,
            },
            ids: HashMap::new(),
            stacks: HashMap::new(),
        }
    }

    fn add(&mut self, r: Report) {
        let w = &mut self.report;
        if w.samples.is_empty() && w.duration.is_zero() {
            w.start = r.start;
        }
        let mut resolved = r.resolved.into_iter();
        let ids: Vec<u32> = r
            .locations
            .iter()
            .map(|k| {
                let res = resolved.next();
                *self.ids.entry(*k).or_insert_with(|| {
                    w.locations.push(*k);
                    w.resolved.push(res.expect("a name per location"));
                    w.locations.len() as u32 - 1
                })
            })
            .collect();
        for mut s in r.samples {
            for l in &mut s.locs {
                *l = ids[*l as usize];
            }
            match self.stacks.entry((s.locs.clone(), s.pid, s.tid.0)) {
                std::collections::hash_map::Entry::Occupied(e) => {
                    w.samples[*e.get()].count += s.count
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(w.samples.len());
                    w.samples.push(s);
                }
            }
        }
        w.period_ns = r.period_ns;
        w.duration += r.duration;
        // File ids are the session's: later lists extend earlier ones.
        if r.files.len() >= w.files.len() {
            w.files = r.files;
        }
    }
}

/// Runs `perfpy top`: the live view until `q`, Ctrl-C, a signal, the duration or the targets'
/// end; then, with -o, the profile of the whole run written as `record` writes it.
pub fn run(opts: Options, top: TopOptions, stop: Arc<AtomicBool>) -> Result<()> {
    // An unwritable output fails now, before anything is done to a target.
    let dest = opts.output.as_deref().map(Dest::prepare).transpose()?;
    let tty = std::io::stdout().is_terminal();
    let duration = opts.duration;
    let (format, rate) = (opts.format, opts.rate);
    let mut p = Periodic::start(opts, stop.clone())?;
    if tty {
        // Names kept as long as for 60 views' intervals, not 60 slices.
        let slices = (top.interval.as_nanos() / SLICE.as_nanos()).max(1) as u64;
        p.keep_names_for(crate::symbols::NameCache::KEEP_UNUSED * slices);
    }
    let target = p.sampled();
    let header = Header {
        target: target.clone(),
        rate,
        interval: top.interval,
        ..Header::default()
    };
    let mut feed = Feed::new(header, dest.is_some());
    let mut view = View {
        thread: top.tid,
        ..View::default()
    };
    let started = Instant::now();
    let ending = Ending {
        stop: &stop,
        until: duration.map(|d| started + d),
        started,
    };
    // A terminal that refuses raw mode must not end a session already started (a launched
    // command released, trampolines on): plain tables then.
    let term = tty
        .then(|| {
            Terminal::enter()
                .map_err(|e| {
                    say!("perfpy: warning: cannot use the terminal ({e}): plain tables instead")
                })
                .ok()
        })
        .flatten();
    let reason = if let Some(mut term) = term {
        let mut last = None;
        let reason = live(
            &mut p, &top, &ending, &mut feed, &mut view, &mut term, &mut last,
        );
        drop(term);
        if let Some(table) = last {
            out!("{}", table.trim_end());
        }
        reason
    } else {
        say!(
            "perfpy: sampling {target} at {rate} Hz, a table every {}s",
            top.interval.as_secs_f64()
        );
        tables(&mut p, &top, &ending, &mut feed, &mut view)
    };
    say!(
        "perfpy: top ended ({reason}) after {:.1}s: {} samples, {} lost",
        started.elapsed().as_secs_f64(),
        feed.header.samples,
        feed.header.lost
    );
    if let (Some(dest), Some(whole)) = (dest, feed.whole) {
        let name = dest.display();
        let title = format!("perfpy top {target}");
        dest.write_with(|w| write(&whole.report, format, &title, w))?;
        say!("perfpy: wrote {name}");
    }
    Ok(())
}

/// When the view ends on its own: a signal, the duration.
struct Ending<'a> {
    stop: &'a AtomicBool,
    until: Option<Instant>,
    started: Instant,
}

impl Ending<'_> {
    /// The next deadline: `want`, or the duration's end if sooner.
    fn deadline(&self, want: Instant) -> Instant {
        self.until.map_or(want, |u| u.min(want))
    }

    fn duration_elapsed(&self) -> bool {
        self.until.is_some_and(|u| Instant::now() >= u)
    }
}

/// Ends the session (the stop flag, as a signal would) and takes its last interval.
fn finish(p: &mut Periodic, e: &Ending, feed: &mut Feed, current: bool) {
    e.stop.store(true, Ordering::Relaxed);
    let iv = p.next(Instant::now());
    feed.add(iv, current);
}

/// The refresh after `last`: one interval later or, when naming made us late (the first
/// interval names every library the targets run), one interval from now: no short catch-up
/// intervals of a few samples.
fn next_tick(last: Instant, interval: Duration) -> Instant {
    (last + interval).max(Instant::now() + interval / 2)
}

/// Picks the thread named by --thread once it has been seen.
fn pick_thread(view: &mut View, model: &Model, top: &TopOptions, picked: &mut bool) {
    if *picked {
        return;
    }
    let Some(want) = &top.thread else {
        *picked = true;
        return;
    };
    if let Some((tid, _)) = model.threads().find(|(_, n)| n == want) {
        view.thread = Some(tid);
        *picked = true;
    }
}

/// The terminal screen: redrawn every interval and on every key. Returns why it ended; `last`
/// gets the final table when the session ended on its own (printed once the terminal is back).
fn live(
    p: &mut Periodic,
    top: &TopOptions,
    e: &Ending,
    feed: &mut Feed,
    view: &mut View,
    term: &mut Terminal,
    last: &mut Option<String>,
) -> String {
    let mut paused = false;
    let mut picked = false;
    let mut next = Instant::now() + top.interval;
    let draw = |term: &mut Terminal, feed: &Feed, view: &View| {
        let (w, rows) = term.size();
        // A failed draw (terminal gone) ends nothing: the signal that follows does.
        let _ = term.draw(&screen::screen(&feed.header, &feed.model, view, w, rows));
    };
    draw(term, feed, view);
    loop {
        let iv = p.next(e.deadline(next.min(Instant::now() + SLICE)));
        let ended = iv.end;
        feed.add(iv, !paused);
        if ended.is_some() || e.duration_elapsed() {
            if ended.is_none() {
                finish(p, e, feed, !paused);
            }
            let reason = ended.unwrap_or("duration elapsed").to_string();
            feed.model.next_interval();
            feed.header.elapsed = e.started.elapsed();
            *last = Some(screen::plain(&feed.header, &feed.model, view, top.rows));
            return reason;
        }
        let (keys, mut redraw) = term.keys();
        for k in &keys {
            match screen::key(k, view, &feed.model) {
                Action::Quit => {
                    finish(p, e, feed, false);
                    return "quit".to_string();
                }
                Action::TogglePause => {
                    paused = !paused;
                    feed.header.paused = paused;
                    redraw = true;
                }
                Action::Redraw => redraw = true,
                Action::None => {}
            }
        }
        if Instant::now() >= next {
            next = next_tick(next, top.interval);
            pick_thread(view, &feed.model, top, &mut picked);
            if !paused {
                feed.header.elapsed = e.started.elapsed();
                feed.header.coverage = p.coverage();
                feed.model.next_interval();
                redraw = true;
            }
        }
        if redraw {
            draw(term, feed, view);
        }
    }
}

/// Plain tables on stdout, one per interval, until the session ends or stdout is closed.
fn tables(
    p: &mut Periodic,
    top: &TopOptions,
    e: &Ending,
    feed: &mut Feed,
    view: &mut View,
) -> String {
    let mut picked = false;
    let mut next = Instant::now() + top.interval;
    loop {
        let iv = p.next(e.deadline(next));
        next = next_tick(next, top.interval);
        let ended = iv.end;
        feed.add(iv, true);
        feed.model.next_interval();
        pick_thread(view, &feed.model, top, &mut picked);
        feed.header.elapsed = e.started.elapsed();
        feed.header.coverage = p.coverage();
        let table = screen::plain(&feed.header, &feed.model, view, top.rows);
        let mut out = std::io::stdout();
        if out
            .write_all(table.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            // `perfpy top … | head`: the reader is gone.
            finish(p, e, feed, false);
            return "stdout closed".to_string();
        }
        if let Some(why) = ended {
            return why.to_string();
        }
        if e.duration_elapsed() {
            finish(p, e, feed, false);
            return "duration elapsed".to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Sample;
    use crate::symbols::Resolved;

    fn report(keys: &[u64], stacks: &[(&[u32], u64)]) -> Report {
        let mut r = Whole::new().report;
        r.duration = Duration::from_secs(1);
        for k in keys {
            r.locations.push(FrameKey::Kernel(*k));
            r.resolved.push(Resolved {
                frames: vec![perfpy_symbolize::Frame {
                    function: format!("f{k}"),
                    file: None,
                    line: None,
                }],
                kind: Kind::Kernel,
            });
        }
        for (locs, count) in stacks {
            r.samples.push(Sample::for_tests(locs.to_vec(), *count));
        }
        r
    }

    #[test]
    fn whole_run_keeps_each_location_and_stack_once() {
        let mut w = Whole::new();
        // Interval 1: a ← b (3), b (1). Interval 2 numbers its locations otherwise: c, b, a.
        w.add(report(&[10, 20], &[(&[0, 1], 3), (&[1], 1)]));
        w.add(report(&[30, 20, 10], &[(&[2, 1], 2), (&[0, 1], 5)]));
        let r = &w.report;
        let keys: Vec<FrameKey> = r.locations.clone();
        assert_eq!(
            keys,
            [10, 20, 30].map(FrameKey::Kernel).to_vec(),
            "each key once"
        );
        assert_eq!(r.resolved[2].frames[0].function, "f30");
        let counts: Vec<(Vec<u32>, u64)> = r
            .samples
            .iter()
            .map(|s| (s.locs.clone(), s.count))
            .collect();
        assert_eq!(counts, [(vec![0, 1], 5), (vec![1], 1), (vec![2, 1], 5)]);
        assert_eq!(r.duration, Duration::from_secs(2));
    }
}
