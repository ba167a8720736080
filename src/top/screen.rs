//! What `perfpy top` shows: the lines of a screen (pure, tested below), the terminal they are
//! drawn on (raw mode and the alternate screen, restored however perfpy ends), the keys, and
//! the plain tables printed when stdout is not a terminal.

use std::io::Write;
use std::time::Duration;

use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::{cursor, queue, style, terminal};

use super::model::{Model, SortKey, Table, View};

/// The figures of the header, from the sampling session.
#[derive(Clone, Debug, Default)]
pub struct Header {
    /// "pid 1234 (python3)", "the command (pid 88)", "every process".
    pub target: String,
    pub rate: u64,
    pub elapsed: Duration,
    pub interval: Duration,
    pub samples: u64,
    pub lost: u64,
    /// "CPython 3.12.3" (several, comma-separated), or empty before any Python is seen.
    pub python: String,
    /// Where Python frames come from: "eBPF walker", "perf trampoline", "native only".
    pub frames_from: String,
    pub paused: bool,
    /// The share of the targets' CPU time the samples cover, where known.
    pub coverage: Option<f64>,
}

pub const FOOTER: &str =
    "o own  t total  n name  s sort by last/all  Tab thread  k native+kernel  space pause  q quit";

fn sort_name(v: &View) -> String {
    let key = match v.sort {
        SortKey::Own => "own",
        SortKey::Total => "total",
        SortKey::Name => "name",
    };
    if v.sort == SortKey::Name {
        key.to_string()
    } else if v.by_interval {
        format!("{key} (last interval)")
    } else {
        format!("{key} (since start)")
    }
}

fn thread_name(model: &Model, v: &View) -> String {
    match v.thread {
        None => format!("all ({})", model.threads().count()),
        Some(t) => match model.threads().find(|(tid, _)| *tid == t) {
            Some((_, n)) if !n.is_empty() => format!("{t} {n}"),
            _ => t.to_string(),
        },
    }
}

/// "  coverage 97%": the share of the targets' CPU time sampled, where known.
fn coverage(h: &Header) -> String {
    h.coverage
        .map(|c| format!("  coverage {:.0}%", 100.0 * c))
        .unwrap_or_default()
}

/// The column titles and one line per row, shares in percent.
fn table_lines(t: &Table, interval: Duration, rows: usize) -> Vec<String> {
    let mut v = vec![
        format!(
            "{:>14}  {:>14}",
            format!("last {}s", interval.as_secs_f64()),
            "since start"
        ),
        format!(
            "{:>6} {:>7}  {:>6} {:>7}  Function",
            "%Own", "%Total", "%Own", "%Total"
        ),
    ];
    for r in t.rows.iter().take(rows) {
        v.push(format!(
            "{:>6.1} {:>7.1}  {:>6.1} {:>7.1}  {}",
            t.share(r.own_now, true),
            t.share(r.total_now, true),
            t.share(r.own_all, false),
            t.share(r.total_all, false),
            r.name
        ));
    }
    v
}

/// The whole screen, `height` lines at most (the footer last), each cut at `width`.
pub fn screen(h: &Header, model: &Model, v: &View, width: usize, height: usize) -> Vec<String> {
    let t = model.table(v);
    let mut lines = vec![
        format!(
            "perfpy top: {}{}{}",
            h.target,
            if h.python.is_empty() {
                String::new()
            } else {
                format!("  {}", h.python)
            },
            if h.frames_from.is_empty() {
                String::new()
            } else {
                format!(", frames from the {}", h.frames_from)
            },
        ),
        format!(
            "{:.1}s at {} Hz  samples {} (last interval {})  lost {}{}  thread {}  sort {}{}",
            h.elapsed.as_secs_f64(),
            h.rate,
            h.samples,
            t.samples_now,
            h.lost,
            coverage(h),
            thread_name(model, v),
            sort_name(v),
            if h.paused { "  [paused]" } else { "" }
        ),
        String::new(),
    ];
    // Two lines of column titles and the footer.
    let rows = height.saturating_sub(lines.len() + 3);
    lines.extend(table_lines(&t, h.interval, rows));
    while lines.len() + 1 < height {
        lines.push(String::new());
    }
    lines.push(FOOTER.to_string());
    for l in &mut lines {
        if let Some((i, _)) = l.char_indices().nth(width) {
            l.truncate(i);
        }
    }
    lines
}

/// The plain table printed per interval without a terminal.
pub fn plain(h: &Header, model: &Model, v: &View, rows: usize) -> String {
    let t = model.table(v);
    let mut s = format!(
        "perfpy top: {}  {:.1}s  samples {} (last interval {})  lost {}{}{}{}\n",
        h.target,
        h.elapsed.as_secs_f64(),
        h.samples,
        t.samples_now,
        h.lost,
        coverage(h),
        if h.python.is_empty() {
            String::new()
        } else {
            format!("  {}", h.python)
        },
        match v.thread {
            Some(_) => format!("  thread {}", thread_name(model, v)),
            None => String::new(),
        }
    );
    for l in table_lines(&t, h.interval, rows) {
        s.push_str(&l);
        s.push('\n');
    }
    s.push('\n');
    s
}

/// What a key asks.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Quit,
    /// The view changed: draw again.
    Redraw,
    TogglePause,
    None,
}

/// Applies a key to the view.
pub fn key(k: &KeyEvent, view: &mut View, model: &Model) -> Action {
    if k.kind == KeyEventKind::Release {
        return Action::None;
    }
    let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
    match k.code {
        KeyCode::Char('c') if ctrl => Action::Quit,
        KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
        KeyCode::Char(' ') => Action::TogglePause,
        KeyCode::Char('o') => set(view, |v| v.sort = SortKey::Own),
        KeyCode::Char('t') => set(view, |v| v.sort = SortKey::Total),
        KeyCode::Char('n') => set(view, |v| v.sort = SortKey::Name),
        KeyCode::Char('s') => set(view, |v| v.by_interval = !v.by_interval),
        KeyCode::Char('k') => set(view, |v| v.python_only = !v.python_only),
        KeyCode::Tab => {
            view.thread = model.next_thread(view.thread);
            Action::Redraw
        }
        _ => Action::None,
    }
}

fn set(view: &mut View, f: impl FnOnce(&mut View)) -> Action {
    f(view);
    Action::Redraw
}

/// The terminal in raw mode on the alternate screen, cursor hidden, for as long as it lives:
/// dropping it (a normal end, an error, a panic unwinding) restores the terminal, and a panic
/// hook restores it too before the panic message is printed.
pub struct Terminal {
    out: std::io::Stdout,
}

impl Terminal {
    pub fn enter() -> std::io::Result<Terminal> {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            prev(info);
        }));
        terminal::enable_raw_mode()?;
        let mut out = std::io::stdout();
        if let Err(e) =
            queue!(out, terminal::EnterAlternateScreen, cursor::Hide).and_then(|_| out.flush())
        {
            restore();
            return Err(e);
        }
        Ok(Terminal { out })
    }

    /// The terminal's size (columns, rows).
    pub fn size(&self) -> (usize, usize) {
        terminal::size()
            .map(|(w, h)| (w as usize, h as usize))
            .unwrap_or((80, 24))
    }

    pub fn draw(&mut self, lines: &[String]) -> std::io::Result<()> {
        queue!(self.out, cursor::MoveTo(0, 0))?;
        for (i, l) in lines.iter().enumerate() {
            queue!(
                self.out,
                cursor::MoveTo(0, i as u16),
                style::Print(l),
                terminal::Clear(terminal::ClearType::UntilNewLine)
            )?;
        }
        queue!(
            self.out,
            terminal::Clear(terminal::ClearType::FromCursorDown)
        )?;
        self.out.flush()
    }

    /// The keys pressed since the last call (none waited for), and whether the terminal was
    /// resized.
    pub fn keys(&mut self) -> (Vec<KeyEvent>, bool) {
        let mut keys = Vec::new();
        let mut resized = false;
        while event::poll(Duration::ZERO).unwrap_or(false) {
            match event::read() {
                Ok(Event::Key(k)) => keys.push(k),
                Ok(Event::Resize(..)) => resized = true,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        (keys, resized)
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        restore();
    }
}

/// Cursor shown, alternate screen left, raw mode off: what the shell expects back. Safe to call
/// more than once.
fn restore() {
    let mut out = std::io::stdout();
    let _ = queue!(out, cursor::Show, terminal::LeaveAlternateScreen);
    let _ = out.flush();
    let _ = terminal::disable_raw_mode();
}

#[cfg(test)]
mod tests {
    use super::super::model::{Class, Stack};
    use super::*;

    fn model() -> Model {
        let mut m = Model::default();
        let main = m.frame("main (a.py:1)".into(), Class::Python);
        let hot = m.frame("hot (a.py:5)".into(), Class::Python);
        let cold = m.frame("cold (a.py:9)".into(), Class::Python);
        m.add(
            Stack {
                tid: 7,
                frames: vec![hot, main],
            },
            3,
            true,
        );
        m.add(
            Stack {
                tid: 7,
                frames: vec![cold, main],
            },
            1,
            true,
        );
        m.next_interval();
        m
    }

    fn header() -> Header {
        Header {
            target: "pid 7".into(),
            rate: 100,
            interval: Duration::from_secs(1),
            samples: 4,
            coverage: Some(0.97),
            ..Header::default()
        }
    }

    #[test]
    fn screen_has_header_rows_and_footer() {
        let m = model();
        let s = screen(&header(), &m, &View::default(), 200, 12);
        assert_eq!(s.len(), 12);
        assert!(s[0].starts_with("perfpy top: pid 7"), "{s:?}");
        assert!(s[1].contains("sort own (last interval)"), "{s:?}");
        assert!(s[1].contains("lost 0  coverage 97%"), "{s:?}");
        assert_eq!(
            s[5].split_whitespace().collect::<Vec<_>>(),
            ["75.0", "75.0", "75.0", "75.0", "hot", "(a.py:5)"]
        );
        assert_eq!(s[11], FOOTER);
    }

    #[test]
    fn lines_are_cut_at_the_width_and_rows_at_the_height() {
        let m = model();
        let s = screen(&header(), &m, &View::default(), 20, 7);
        assert!(s.iter().all(|l| l.chars().count() <= 20));
        assert_eq!(s.len(), 7);
        // Header (3), titles (2), one row, footer.
        assert!(s[5].starts_with("  75.0    75.0"), "{s:?}");
    }

    #[test]
    fn keys_change_the_view() {
        let m = model();
        let mut v = View::default();
        let k = |c| KeyEvent::new(c, KeyModifiers::NONE);
        assert_eq!(key(&k(KeyCode::Char('t')), &mut v, &m), Action::Redraw);
        assert_eq!(v.sort, SortKey::Total);
        key(&k(KeyCode::Char('n')), &mut v, &m);
        assert_eq!(v.sort, SortKey::Name);
        key(&k(KeyCode::Tab), &mut v, &m);
        assert_eq!(v.thread, Some(7));
        key(&k(KeyCode::Tab), &mut v, &m);
        assert_eq!(v.thread, None);
        key(&k(KeyCode::Char('k')), &mut v, &m);
        assert!(!v.python_only);
        assert_eq!(key(&k(KeyCode::Char(' ')), &mut v, &m), Action::TogglePause);
        assert_eq!(key(&k(KeyCode::Char('q')), &mut v, &m), Action::Quit);
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(key(&ctrl_c, &mut v, &m), Action::Quit);
    }

    #[test]
    fn plain_table() {
        let m = model();
        let p = plain(&header(), &m, &View::default(), 10);
        let lines: Vec<&str> = p.lines().collect();
        assert!(lines[0].starts_with("perfpy top: pid 7"));
        assert!(lines[3].ends_with("hot (a.py:5)"), "{p}");
        assert!(lines[4].ends_with("cold (a.py:9)"), "{p}");
        assert!(lines[5].ends_with("main (a.py:1)"), "{p}");
        assert!(p.ends_with("\n\n"));
    }
}
