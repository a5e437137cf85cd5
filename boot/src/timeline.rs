//! Renders the live snapshot's timeline (`memsnap.progress` trace records:
//! pages copied so far, by cause, against time since the instant) as an SVG
//! picture, so the three copy paths can be seen at work.

use std::fmt::Write;

use snapshot::interface::trace::Record;

/// One progress sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Microseconds since the snapshot instant.
    pub t_us: u64,
    /// Pages copied eagerly so far.
    pub eager: u64,
    /// Pages copied on write faults so far.
    pub fault: u64,
    /// Pages copied in the background so far.
    pub background: u64,
}

/// The samples among `records`, in order.
pub fn samples(records: &[Record<'_>]) -> Vec<Sample> {
    records
        .iter()
        .filter(|r| r.event == "memsnap.progress")
        .filter_map(|r| {
            Some(Sample {
                t_us: r.u64("t_us")?,
                eager: r.u64("eager")?,
                fault: r.u64("fault")?,
                background: r.u64("background")?,
            })
        })
        .collect()
}

/// A stacked layer: legend, colour, and the top of the layer for a sample.
type Layer = (&'static str, &'static str, fn(&Sample) -> u64);

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// An SVG of cumulative pages by cause, stacked, against time.
pub fn svg(samples: &[Sample], title: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="24" font-size="15">{}</text>"#,
        escape(title)
    );
    let t_max = samples.iter().map(|s| s.t_us).max().unwrap_or(1).max(1) as f64;
    let p_max = samples
        .iter()
        .map(|s| s.eager + s.fault + s.background)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |t: u64| LEFT + t as f64 / t_max * plot_w;
    let y = |p: u64| TOP + plot_h - p as f64 / p_max * plot_h;
    // Axes and ticks.
    let _ = writeln!(
        out,
        r#"<path d="M{LEFT},{TOP} V{} H{}" stroke="black" fill="none"/>"#,
        TOP + plot_h,
        LEFT + plot_w
    );
    for i in 0..=4 {
        let t = (t_max * f64::from(i) / 4.0) as u64;
        let p = (p_max * f64::from(i) / 4.0) as u64;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{:.0} ms</text>"#,
            x(t),
            TOP + plot_h + 18.0,
            t as f64 / 1000.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{p}</text>"#,
            LEFT - 6.0,
            y(p) + 4.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time since the snapshot instant</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 10.0
    );
    let _ = writeln!(
        out,
        r#"<text transform="translate(16,{:.1}) rotate(-90)" text-anchor="middle">pages copied</text>"#,
        TOP + plot_h / 2.0
    );
    // Stacked areas: eager at the bottom, then fault, then background.
    let layers: [Layer; 3] = [
        ("eager (at the instant)", "#4c72b0", |s| s.eager),
        ("on write fault", "#dd8452", |s| s.eager + s.fault),
        ("background copier", "#55a868", |s| {
            s.eager + s.fault + s.background
        }),
    ];
    let mut below: Vec<u64> = vec![0; samples.len()];
    for (i, (name, colour, top)) in layers.iter().enumerate() {
        if samples.is_empty() {
            break;
        }
        let mut d = String::new();
        for (k, s) in samples.iter().enumerate() {
            let _ = write!(
                d,
                "{}{:.1},{:.1} ",
                if k == 0 { "M" } else { "L" },
                x(s.t_us),
                y(top(s))
            );
        }
        for (s, b) in samples.iter().zip(&below).rev() {
            let _ = write!(d, "L{:.1},{:.1} ", x(s.t_us), y(*b));
        }
        let _ = writeln!(
            out,
            r#"<path d="{d}Z" fill="{colour}" fill-opacity="0.85" stroke="{colour}"/>"#
        );
        let ly = TOP + 20.0 + i as f64 * 22.0;
        let lx = LEFT + plot_w + 16.0;
        let _ = writeln!(
            out,
            r#"<rect x="{lx}" y="{:.1}" width="14" height="14" fill="{colour}"/>"#,
            ly - 11.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{ly:.1}">{name}</text>"#,
            lx + 20.0
        );
        below = samples.iter().map(top).collect();
    }
    out.push_str("</svg>\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::interface::trace::parse_line;

    #[test]
    fn reads_samples_and_draws_three_layers() {
        let lines = [
            "TRACE 1 memsnap.progress t_us=0 eager=10 fault=0 background=0",
            "TRACE 2 other x=1",
            "TRACE 3 memsnap.progress t_us=2000 eager=10 fault=5 background=100",
        ];
        let records: Vec<_> = lines
            .iter()
            .filter_map(|l| parse_line(l).unwrap())
            .collect();
        let s = samples(&records);
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[1],
            Sample {
                t_us: 2000,
                eager: 10,
                fault: 5,
                background: 100
            }
        );
        let picture = svg(&s, "a <test>");
        assert!(picture.starts_with("<svg"));
        assert_eq!(
            picture.matches("<path d=\"M").count(),
            4,
            "axes and three layers"
        );
        assert!(picture.contains("a &lt;test&gt;"));
    }

    #[test]
    fn no_samples_still_make_a_picture() {
        assert!(svg(&[], "empty").ends_with("</svg>\n"));
    }
}
