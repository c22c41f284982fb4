//! The differential flame graph's drawing. inferno lays the frames out (at
//! the candidate's or the baseline's energy per transaction) and brings its
//! zoom and search script; the fills are then set here, frame by frame, from
//! the frame's OWN change: its self samples per transaction (samples of the
//! stack that ends at it, divided by the range's completed transactions),
//! candidate minus baseline. Red for more, blue for less, white for none;
//! the intensity is the change over the largest change of any frame.
//!
//! Why self samples and not the energy inferno would colour by: a stack's
//! energy is its samples' share of the host's energy, idle share included,
//! which moves with whatever else runs on the host (#24: a function whose
//! samples per transaction fell 39% was tinted red because the host's
//! energy per sample rose). Samples are the code's own work; the width still
//! shows energy per transaction, the review's subject. Each frame's tooltip
//! gives both figures.
//!
//! inferno writes no frame identity into the SVG, so its layout is replayed
//! (same sorted lines, same prefix-sharing walk) to know which stack prefix
//! each `<rect>` (depth from its `y`, start `fg:x`, width `fg:w`) draws.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::profiles::ProfileExportError;

/// One folded stack: its width in the drawn graph (integer units) and its
/// self samples per transaction in each range.
#[derive(Debug, Clone, PartialEq)]
pub struct FlameStack {
    pub stack: String,
    pub width: u64,
    pub baseline_self_per_transaction: f64,
    pub candidate_self_per_transaction: f64,
}

/// The fill of a frame whose own change is `change` when the largest change
/// of any frame is `max_abs` (the scale of Gregg's differential graphs).
pub fn own_change_fill(change: f64, max_abs: f64) -> (u8, u8, u8) {
    if change == 0.0 || max_abs <= 0.0 {
        return (250, 250, 250);
    }
    let share = (change.abs() / max_abs).min(1.0);
    let c = (100.0 + 150.0 * (1.0 - share)).round() as u8;
    if change > 0.0 {
        (255, c, c)
    } else {
        (c, c, 255)
    }
}

/// A drawn frame: its depth (0 = all), first unit and width in units.
type FrameKey = (usize, u64, u64);

/// The frames inferno draws from `lines` (sorted `stack width`), each with
/// the stack prefix it stands for (`""` for the root).
fn replay_layout(lines: &[(String, u64)]) -> HashMap<FrameKey, String> {
    let mut frames = HashMap::new();
    let mut open: Vec<(&str, u64)> = Vec::new();
    let mut time = 0u64;
    let close = |open: &mut Vec<(&str, u64)>,
                 keep: usize,
                 time: u64,
                 frames: &mut HashMap<FrameKey, String>| {
        while open.len() > keep {
            let depth = open.len() - 1;
            let path = open[1..].iter().map(|f| f.0).collect::<Vec<_>>().join(";");
            let (_, start) = open.pop().unwrap_or(("", time));
            if time > start {
                frames.insert((depth, start, time - start), path);
            }
        }
    };
    for (stack, width) in lines {
        let this: Vec<&str> = std::iter::once("").chain(stack.split(';')).collect();
        let shared = open
            .iter()
            .zip(&this)
            .take_while(|(o, t)| o.0 == **t)
            .count();
        close(&mut open, shared, time, &mut frames);
        for f in &this[shared..] {
            open.push((f, time));
        }
        time += width;
    }
    close(&mut open, 0, time, &mut frames);
    frames
}

fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let rest = &tag[at..];
    Some(&rest[..rest.find('"')?])
}

/// inferno's SVG of `stacks` (at their widths), each frame filled by its
/// own change and titled with both figures. Stacks of no width are not
/// drawn but count in the colour scale, so that both graphs share it.
pub fn svg(
    mut options: inferno::flamegraph::Options<'_>,
    stacks: &[FlameStack],
    subject: &str,
) -> Result<String, ProfileExportError> {
    let mut lines: Vec<(String, u64)> = stacks
        .iter()
        .filter(|s| s.width > 0)
        .map(|s| (s.stack.clone(), s.width))
        .collect();
    // inferno sorts its lines as text: the replay must walk the same order.
    lines.sort_by(|a, b| format!("{} {}", a.0, a.1).cmp(&format!("{} {}", b.0, b.1)));
    let text: Vec<String> = lines.iter().map(|(s, w)| format!("{s} {w}")).collect();
    let mut out = Vec::new();
    inferno::flamegraph::from_lines(&mut options, text.iter().map(String::as_str), &mut out)
        .map_err(|source| ProfileExportError::FlameGraph {
            subject: subject.to_string(),
            source,
        })?;
    let drawn = String::from_utf8_lossy(&out).into_owned();

    let own: BTreeMap<&str, (f64, f64)> = stacks
        .iter()
        .map(|s| {
            (
                s.stack.as_str(),
                (
                    s.baseline_self_per_transaction,
                    s.candidate_self_per_transaction,
                ),
            )
        })
        .collect();
    let max_abs = own.values().map(|(b, c)| (c - b).abs()).fold(0.0, f64::max);
    let layout = replay_layout(&lines);
    // Depth from y: each depth has one y, the root (depth 0) the largest.
    let mut ys = BTreeSet::new();
    for tag in drawn.split("<rect ").skip(1) {
        if let (Some(y), Some(_)) = (attribute(tag, "y"), attribute(tag, "fg:x")) {
            if let Ok(y) = y.parse::<i64>() {
                ys.insert(y);
            }
        }
    }
    let depth_of: HashMap<i64, usize> = ys.iter().rev().enumerate().map(|(d, y)| (*y, d)).collect();

    let mut svg = String::with_capacity(drawn.len() + drawn.len() / 8);
    let mut rest = drawn.as_str();
    while let Some(at) = rest.find("<title>") {
        let (head, tail) = rest.split_at(at);
        svg.push_str(head);
        let Some(title_end) = tail.find("</title>") else {
            break;
        };
        let title = &tail["<title>".len()..title_end];
        let after = &tail[title_end + "</title>".len()..];
        let rect_end = after.find("/>").map(|e| e + 2);
        let frame = rect_end.and_then(|e| {
            let rect = after[..e - 2].strip_prefix("<rect ")?;
            let y = attribute(rect, "y")?.parse::<i64>().ok()?;
            let x = attribute(rect, "fg:x")?.parse::<u64>().ok()?;
            let w = attribute(rect, "fg:w")?.parse::<u64>().ok()?;
            let path = layout.get(&(*depth_of.get(&y)?, x, w))?;
            Some((rect, path, e))
        });
        let Some((rect, path, rect_end)) = frame else {
            svg.push_str(&tail[..title_end]);
            rest = &tail[title_end..];
            continue;
        };
        let (base, cand) = own.get(path.as_str()).copied().unwrap_or((0.0, 0.0));
        let (r, g, b) = own_change_fill(cand - base, max_abs);
        let name = title.rfind(" (").map_or(title, |p| &title[..p]);
        let width = title
            .rfind(" (")
            .and_then(|p| title[p + 2..].split(';').next())
            .map(|w| w.trim_end_matches(')'))
            .unwrap_or("");
        let change = if base > 0.0 {
            crate::figures::signed_percent((cand - base) / base)
        } else if cand > 0.0 {
            "new".to_string()
        } else {
            "none".to_string()
        };
        svg.push_str(&format!(
            "<title>{name} ({width}; own samples per transaction {} → {}, {change})</title>",
            crate::figures::sig4(base),
            crate::figures::sig4(cand)
        ));
        let fill = attribute(rect, "fill").unwrap_or("");
        svg.push_str(&format!(
            "<rect {}/>",
            rect.replacen(
                &format!("fill=\"{fill}\""),
                &format!("fill=\"rgb({r},{g},{b})\""),
                1
            )
        ));
        rest = &after[rect_end..];
    }
    svg.push_str(rest);
    Ok(svg)
}
