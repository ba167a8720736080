//! `perfpy top`: the recording's sampling session (same events, same walker, same cost on the
//! targets as `record` at the same rate), read every interval into the view model of
//! `crate::top`, on a terminal screen or as plain tables.
//!
//! Naming is incremental: each interval names only the locations sampled for the first time
//! (one `symbols::resolve` over a profile of just those), and each stack is turned into frame
//! names once.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::collect::Collector;
use super::session::{End, Session};
use super::{name_frames, plan, sampled, write, Named, Options, Outcome, Plan};
use crate::profile::{Profile, SampleKey};
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

/// Names what the collector sampled, interval by interval.
#[derive(Default)]
struct Feed {
    /// Per collector location: its frames in the model (leaf first, inlined ones included).
    locs: Vec<Vec<u32>>,
    /// Per collector stack: its frames in the model, once named.
    stacks: Vec<Option<Vec<u32>>>,
    /// The collector's counts at the last interval's end.
    seen: HashMap<SampleKey, u64>,
}

fn class(k: Kind) -> Class {
    match k {
        Kind::Python | Kind::PythonEbpf => Class::Python,
        Kind::Kernel => Class::Kernel,
        Kind::Native { interpreter: true } => Class::Interpreter,
        Kind::Native { interpreter: false } | Kind::Other => Class::Native,
    }
}

impl Feed {
    /// Names the locations sampled for the first time since the last call.
    fn name_new(&mut self, c: &Collector, opts: &Options, model: &mut Model) {
        let known = self.locs.len();
        if c.profile.locations.len() == known {
            return;
        }
        let mut fresh = Profile::default();
        for k in &c.profile.locations[known..] {
            fresh.location(*k);
        }
        fresh.py_functions = c.profile.py_functions.clone();
        let procs = c.procs.iter().map(|p| (p.key, p)).collect();
        // The interpreter's frames are named too (from its symbol table: cheap): whether a
        // stack shows them is the view's choice.
        let mut named = crate::symbols::resolve(&fresh, &c.files, &procs, true);
        crate::report::set_lines(&mut named.resolved, &fresh, opts.lines);
        for r in &named.resolved {
            let ids = (0..r.frames.len())
                .map(|i| model.frame(crate::report::display_name(r, i), class(r.kind)))
                .collect();
            self.locs.push(ids);
        }
    }

    /// Adds what was sampled since the last call to the model: to a new interval, or (paused)
    /// only to the figures since the start.
    fn tick(&mut self, c: &Collector, opts: &Options, model: &mut Model, paused: bool) {
        self.name_new(c, opts, model);
        if !paused {
            model.next_interval();
        }
        let procs: HashMap<u32, &crate::process::Process> =
            c.procs.iter().map(|p| (p.key, p)).collect();
        self.stacks.resize(c.profile.stacks.len(), None);
        for (key, &count) in &c.profile.counts {
            let before = self.seen.insert(*key, count).unwrap_or(0);
            if count <= before {
                continue;
            }
            let frames = self.stacks[key.stack as usize].get_or_insert_with(|| {
                c.profile.stacks[key.stack as usize]
                    .iter()
                    .flat_map(|l| self.locs[*l as usize].iter().copied())
                    .collect()
            });
            if let Some(name) = procs.get(&key.proc).and_then(|p| p.threads.get(&key.tid)) {
                model.thread_name(key.tid, name);
            }
            model.add(
                Stack {
                    tid: key.tid,
                    frames: frames.clone(),
                },
                count - before,
                !paused,
            );
        }
    }
}

/// The header's figures, read from the session.
fn header(s: &Session, opts: &Options, top: &TopOptions, target: &str) -> Header {
    let mut versions: Vec<String> =
        s.c.procs
            .iter()
            .filter_map(|p| p.python_version.as_ref().map(|v| format!("CPython {v}")))
            .collect();
    versions.sort();
    versions.dedup();
    let frames_from = if s.c.py.is_some() {
        "eBPF walker"
    } else if opts.inject_python || s.capture.perf_env_set {
        "perf trampoline"
    } else {
        "native unwinder only"
    };
    Header {
        target: target.to_string(),
        rate: opts.rate,
        elapsed: s.start.elapsed(),
        interval: top.interval,
        samples: s.c.stats.samples,
        lost: s.c.stats.lost,
        python: versions.join(", "),
        frames_from: frames_from.to_string(),
        paused: false,
        ended: None,
    }
}

/// Runs `perfpy top`: the live view until `q`, Ctrl-C, a signal, the duration or the targets'
/// end; then, with -o, the profile of the whole run written as `record` writes it.
pub fn run(opts: Options, top: TopOptions, stop: Arc<AtomicBool>) -> Result<Outcome> {
    if opts.otlp.is_some() {
        bail!("--otlp-endpoint is for perfpy record");
    }
    let Plan {
        tgids,
        target_name,
        dest,
        otlp: _,
        to_inject,
    } = plan(&opts, false)?;
    let tty = std::io::stdout().is_terminal();
    let mut s = Session::start(&opts, tgids, &to_inject, &stop)?;
    s.status_line = false;
    let target = sampled(&opts, &s);
    let mut view = View {
        thread: top.tid,
        ..View::default()
    };
    let end = if tty {
        let mut term = Terminal::enter()?;
        let mut last = None;
        let end = live(
            &mut s, &opts, &top, &stop, &target, &mut view, &mut term, &mut last,
        );
        drop(term);
        if let Some(table) = last {
            out!("{}", table.trim_end());
        }
        end
    } else {
        say!(
            "perfpy: sampling {target} at {} Hz, a table every {}s",
            opts.rate,
            top.interval.as_secs_f64()
        );
        tables(&mut s, &opts, &top, &stop, &target, &mut view)
    };
    let fin = s.finish(&opts, end);
    say!(
        "perfpy: top ended ({}) after {:.1}s: {} samples, {} lost",
        end.reason,
        fin.duration.as_secs_f64(),
        s.c.stats.samples,
        s.c.stats.lost
    );
    match dest {
        Some(dest) => {
            let Named { report, .. } = name_frames(
                &s.c,
                &opts,
                &mut s.injection.deactivator,
                s.capture.period_ns,
                s.start_wall,
                fin.duration,
            );
            let name = dest.display();
            dest.write_with(|w| write(&report, opts.format, &target_name, w))?;
            say!("perfpy: wrote {name}");
        }
        None => s.injection.deactivator.finish(),
    }
    Ok(Outcome {
        child_status: fin.child_status,
    })
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

/// The terminal screen: redrawn every interval and on every key. Returns why it ended.
fn live(
    s: &mut Session,
    opts: &Options,
    top: &TopOptions,
    stop: &AtomicBool,
    target: &str,
    view: &mut View,
    term: &mut Terminal,
    last: &mut Option<String>,
) -> End {
    let mut feed = Feed::default();
    let mut model = Model::default();
    let mut paused = false;
    let mut picked = false;
    let mut next = Instant::now() + top.interval;
    let mut h = header(s, opts, top, target);
    let draw = |term: &mut Terminal, h: &Header, model: &Model, view: &View| {
        let (w, rows) = term.size();
        // A failed draw (terminal gone) ends nothing: the signal that follows does.
        let _ = term.draw(&screen::screen(h, model, view, w, rows));
    };
    draw(term, &h, &model, view);
    let end = loop {
        let slice = next.min(Instant::now() + Duration::from_millis(50));
        if let Some(end) = s.collect_until(opts, stop, Some(slice)) {
            break end;
        }
        let (keys, mut redraw) = term.keys();
        for k in &keys {
            match screen::key(k, view, &model) {
                Action::Quit => {
                    return End {
                        reason: "quit",
                        child_status: None,
                    }
                }
                Action::TogglePause => {
                    paused = !paused;
                    h.paused = paused;
                    redraw = true;
                }
                Action::Redraw => redraw = true,
                Action::None => {}
            }
        }
        if Instant::now() >= next {
            next += top.interval;
            feed.tick(&s.c, opts, &mut model, paused);
            pick_thread(view, &model, top, &mut picked);
            if !paused {
                h = header(s, opts, top, target);
                redraw = true;
            }
        }
        if redraw {
            draw(term, &h, &model, view);
        }
    };
    // The targets ended (or the duration): their last figures are printed once the terminal
    // is restored (`run`).
    feed.tick(&s.c, opts, &mut model, false);
    *last = Some(screen::plain(
        &header(s, opts, top, target),
        &model,
        view,
        top.rows,
    ));
    end
}

/// Plain tables on stdout, one per interval, until the recording ends or stdout is closed.
fn tables(
    s: &mut Session,
    opts: &Options,
    top: &TopOptions,
    stop: &AtomicBool,
    target: &str,
    view: &mut View,
) -> End {
    let mut feed = Feed::default();
    let mut model = Model::default();
    let mut picked = false;
    let mut next = Instant::now() + top.interval;
    loop {
        let end = s.collect_until(opts, stop, Some(next));
        next += top.interval;
        feed.tick(&s.c, opts, &mut model, false);
        pick_thread(view, &model, top, &mut picked);
        let table = screen::plain(&header(s, opts, top, target), &model, view, top.rows);
        let mut out = std::io::stdout();
        if out
            .write_all(table.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            // `perfpy top … | head`: the reader is gone.
            return End {
                reason: "stdout closed",
                child_status: None,
            };
        }
        if let Some(end) = end {
            return end;
        }
    }
}
