//! SVG flamegraph from the collapsed lines, by inferno.

use crate::report::Report;

pub fn write(r: &Report, title: &str, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let lines = super::collapsed::lines(r);
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = title.to_string();
    opts.count_name = "samples".into();
    if lines.is_empty() {
        // inferno refuses empty input; an empty profile is still a valid (empty) SVG.
        write!(
            out,
            "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"600\" height=\"40\"><text x=\"10\" y=\"24\">{title}: no samples</text></svg>\n"
        )?;
        return Ok(());
    }
    inferno::flamegraph::from_lines(&mut opts, lines.iter().map(|s| s.as_str()), out)?;
    Ok(())
}
