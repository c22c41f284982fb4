//! The C header repeats the scenario codes and names for C callers; this
//! holds it to the vocabulary in agent-common (and so to the agent's slots).
use agent_common::scenario::{Scenario, SCENARIO_NONE};

fn header() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/sci_marker.h"))
        .expect("reading include/sci_marker.h")
}

/// `#define NAME <n>u` lines of the header, with the comment after them.
fn defines(text: &str) -> Vec<(String, u32, String)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("#define ")?;
            let mut parts = rest.split_whitespace();
            let name = parts.next()?.to_string();
            let value = parts.next()?.strip_suffix('u')?.parse().ok()?;
            let comment = rest.split_once("/*").map_or("", |(_, c)| c).to_string();
            Some((name, value, comment))
        })
        .collect()
}

#[test]
fn header_codes_and_names_are_the_vocabulary() {
    let defines = defines(&header());
    let expected: Vec<(String, u32)> = std::iter::once(("SCI_NONE".to_string(), SCENARIO_NONE))
        .chain(
            Scenario::ALL
                .into_iter()
                .map(|s| (format!("SCI_{}", s.name().to_uppercase()), s.slot())),
        )
        .collect();
    let found: Vec<(String, u32)> = defines.iter().map(|(n, v, _)| (n.clone(), *v)).collect();
    assert_eq!(found, expected, "include/sci_marker.h scenario codes");
    for s in Scenario::ALL {
        let (_, _, comment) = defines
            .iter()
            .find(|(_, v, _)| *v == s.slot())
            .expect("every scenario has a define");
        assert!(
            comment.contains(s.name_zh()),
            "SCI_{} comment lacks {}",
            s.name().to_uppercase(),
            s.name_zh()
        );
    }
    let weights: Vec<String> = Scenario::ALL
        .into_iter()
        .map(|s| s.standard_weight_units().to_string())
        .collect();
    assert!(
        header().contains(&format!("(weights alpha: {})", weights.join(", "))),
        "include/sci_marker.h states the standard weights"
    );
}

#[test]
fn rust_constants_are_the_vocabulary() {
    assert_eq!(sci_marker::SCI_NONE, SCENARIO_NONE);
    for (code, s) in [
        sci_marker::SCI_CREDIT,
        sci_marker::SCI_DRAWDOWN,
        sci_marker::SCI_REPAYMENT,
        sci_marker::SCI_QUERY,
    ]
    .into_iter()
    .zip(Scenario::ALL)
    {
        assert_eq!(code, s.slot());
        assert_eq!(sci_marker::scenario_code(s.name()), Some(code));
        assert_eq!(sci_marker::scenario_code(s.name_zh()), Some(code));
    }
}
