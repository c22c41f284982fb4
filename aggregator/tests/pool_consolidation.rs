//! Consolidation per pool over a week (#27, standard 7.2), on a fleet of a
//! known shape stored in SQLite: pool "web" (4 hosts of 4 CPUs) runs 2
//! cores a host from 08:00 to 20:00 and 0.2 at night, each host drawing
//! 40 W + 10 W per busy core; pool "batch" (host z1) serves nothing at 1%
//! utilisation for 30 hours from Wednesday 00:00. By hand: at night web
//! needs ceil(0.8 / (4 x 0.6)) = 1 host and releases 3, by day none; idle
//! power is the 40 W intercept; 3 x 84 night hours x 40 W = 36.288 MJ a
//! week = 10.08 kWh x 500 g/kWh x PUE 1.2 = 6048 g. z1's run: 30 h x
//! 40.4 W = 4.3632 MJ, 727.2 g operational + 15 g embodied.
//! The same plan over the real HTTP API on loopback, and on the plans page
//! (HTML and Markdown), read back from the page's tables.
#![allow(clippy::unwrap_used)]
mod common;

use std::time::Duration;

use sci_aggregator::plan::pools::{plan_pools, PoolOptions};
use sci_aggregator::store::sqlite::SqliteStore;
use sci_aggregator::store::RollupLayout;
use sci_proto::v1;

const LAYOUT: RollupLayout = RollupLayout {
    step_s: 60,
    host_step_s: 3600,
};
/// Monday 2026-01-05T00:00:00Z.
const MONDAY: u64 = 1_767_225_600 + 4 * 86_400;
const NS: u64 = 1_000_000_000;

fn hour(
    host: &str,
    pool: &str,
    seq: u64,
    start_s: u64,
    busy_cores: f64,
    txns: u64,
) -> v1::WindowReport {
    let power_w = 40.0 + 10.0 * busy_cores;
    let energy_j = power_w * 3600.0;
    v1::WindowReport {
        host: host.into(),
        agent_instance: "a".into(),
        seq,
        datacenter: "dc-1".into(),
        start_unix_ns: start_s * NS,
        end_unix_ns: (start_s + 3600) * NS,
        cpus: 4,
        busy_cpu_ns: (busy_cores * 3600e9) as u64,
        idle_cpu_ns: ((4.0 - busy_cores) * 3600e9) as u64,
        host_energy_j: energy_j,
        idle_energy_j: 40.0 * 3600.0,
        host_carbon_g: energy_j / 3.6e6 * 500.0 * 1.2,
        host_embodied_g: 0.5,
        carbon_intensity_g_per_kwh: 500.0,
        pue: 1.2,
        intensity_source: "config".into(),
        energy_source: "model-linear".into(),
        supply: Some(v1::ResourceSupply {
            cpu_model: "EPYC".into(),
            cpu_vendor: "AuthenticAMD".into(),
            arch: "x86_64".into(),
            logical_cpus: 4,
            memory_bytes: 16 << 30,
            machine_kind: "bare_metal".into(),
            physical_host_cpus: 4,
            labels: [("pool".to_string(), pool.to_string())].into(),
        }),
        scenarios: if txns > 0 {
            vec![v1::ScenarioRecord {
                scenario: "credit".into(),
                transactions: txns,
                ..Default::default()
            }]
        } else {
            Vec::new()
        },
        ..Default::default()
    }
}

#[test]
fn pools_release_hosts_by_the_hour_of_the_week_and_zombies_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_with(&dir.path().join("sci.db"), LAYOUT, Duration::from_secs(30))
        .unwrap();
    let zombie = MONDAY + 2 * 86_400..MONDAY + 2 * 86_400 + 30 * 3600;
    let mut windows = Vec::new();
    for h in 0..168u64 {
        let start = MONDAY + h * 3600;
        let day = (8..20).contains(&(h % 24));
        for w in ["w1", "w2", "w3", "w4"] {
            windows.push(hour(w, "web", h, start, if day { 2.0 } else { 0.2 }, 100));
        }
        if zombie.contains(&start) {
            windows.push(hour("z1", "batch", h, start, 0.04, 0));
        } else {
            windows.push(hour("z1", "batch", h, start, 1.0, 10));
        }
    }
    for chunk in windows.chunks(200) {
        sci_aggregator::store::Store::commit(&store, chunk).unwrap();
    }
    let options = PoolOptions::default();
    let plan = plan_pools(&store, MONDAY, MONDAY + 7 * 86_400, &options).unwrap();
    let web = plan.pools.iter().find(|p| p.pool == "web").unwrap();
    assert!((web.cores_per_host - 4.0).abs() < 1e-9);
    assert!(
        (web.idle_power_w - 40.0).abs() < 1e-6,
        "{}",
        web.idle_power_source
    );
    assert_eq!(web.hours.len(), 168);
    for h in &web.hours {
        let day = (8..20).contains(&(h.hour_of_week % 24));
        let (busy, needed, release) = if day { (8.0, 4, 0) } else { (0.8, 1, 3) };
        assert!((h.busy_cores - busy).abs() < 1e-9, "{h:?}");
        assert!((h.hosts - 4.0).abs() < 1e-9, "{h:?}");
        assert_eq!(
            (h.hosts_needed, h.hosts_to_release),
            (needed, release),
            "{h:?}"
        );
        let g = f64::from(release) * 40.0 * 3600.0 / 3.6e6 * 500.0 * 1.2;
        assert!((h.saving_g - g).abs() < 1e-6, "{h:?}");
    }
    assert_eq!((web.peak_hour_of_week, web.valley_hour_of_week), (8, 0));
    assert!((web.peak_to_valley.unwrap() - 10.0).abs() < 1e-9);
    assert!((web.released_host_hours_per_week - 252.0).abs() < 1e-9);
    assert!((web.saving_j_per_week - 36_288_000.0).abs() < 1e-3);
    assert!((web.saving_g_per_week - 6048.0).abs() < 1e-6);

    assert_eq!(plan.zombies.len(), 1, "{:?}", plan.zombies);
    let z = &plan.zombies[0];
    assert_eq!(z.host, "z1");
    assert_eq!(
        (z.from_unix_s, z.to_unix_s, z.hours),
        (zombie.start, zombie.end, 30)
    );
    assert!(!z.ongoing);
    assert!((z.utilisation - 0.01).abs() < 1e-9);
    assert!((z.energy_j - 4_363_200.0).abs() < 1e-3);
    assert!((z.carbon_g - (727.2 + 15.0)).abs() < 1e-6, "{}", z.carbon_g);
    // A shorter threshold finds the same run; a longer one none.
    let longer = PoolOptions {
        zombie_hours: 31,
        ..PoolOptions::default()
    };
    assert!(plan_pools(&store, MONDAY, MONDAY + 7 * 86_400, &longer)
        .unwrap()
        .zombies
        .is_empty());
    let bad = PoolOptions {
        target_utilisation: 1.5,
        ..PoolOptions::default()
    };
    let e = plan_pools(&store, MONDAY, MONDAY + 7 * 86_400, &bad).unwrap_err();
    assert!(e.to_string().contains("target_utilisation = 1.5"), "{e}");

    // Over HTTP: the JSON, then the page as HTML and Markdown shows the
    // same release counts, savings and zombie figures.
    let (_runtime, addr) = common::serve(store, Default::default());
    let http_get = |path: &str| sci_test_harness::http::http_get(addr.port(), path).unwrap();
    let range = format!("from={MONDAY}&to={}", MONDAY + 7 * 86_400);
    let (status, body) = http_get(&format!("/api/v1/plans/consolidation?{range}"));
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (status, html) = http_get(&format!("/dashboard/plan?{range}"));
    assert_eq!(status, 200, "{html}");
    let (status, md) = http_get(&format!("/dashboard/plan?{range}&format=md"));
    assert_eq!(status, 200, "{md}");
    use sci_aggregator::figures::{energy_j, mass_g};
    let num = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
    let pools = json["pools"].as_array().unwrap();
    assert_eq!(pools.len(), 2, "{json}");
    let web = pools.iter().find(|p| p["pool"] == "web").unwrap();
    assert!((num(web, "saving_g_per_week") - 6048.0).abs() < 1e-6);
    for page in [Page::html(&html), Page::markdown(&md)] {
        for pool in pools {
            let title = format!(
                "{} / {}",
                pool["datacenter"].as_str().unwrap(),
                pool["pool"].as_str().unwrap()
            );
            let section = page.section(&title);
            let saving = format!(
                "Predicted saving {} a week",
                mass_g(num(pool, "saving_g_per_week"))
            );
            assert!(
                section.text.contains(&saving),
                "{saving} not in {}",
                section.text
            );
            let hours = pool["hours"].as_array().unwrap();
            assert_eq!(
                section.rows.len(),
                hours.len(),
                "{title}: {:?}",
                section.rows
            );
            for (row, h) in section.rows.iter().zip(hours) {
                let how = h["hour_of_week"].as_u64().unwrap();
                assert!(row[0].ends_with(&format!("(hour {how})")), "{row:?}");
                assert_eq!(row[3], h["hosts_needed"].to_string(), "{title} {row:?}");
                assert_eq!(row[4], h["hosts_to_release"].to_string(), "{title} {row:?}");
                assert_eq!(row[5], mass_g(num(h, "saving_g")), "{title} {row:?}");
            }
        }
        // The night hours of web release 3 hosts, 72 g each (by hand).
        let web_rows = page.section("dc-1 / web").rows;
        assert_eq!(web_rows[0][4], "3");
        assert_eq!(web_rows[0][5], "72.00 g");
        assert!(page
            .section("dc-1 / web")
            .text
            .contains("Predicted saving 6.048 kg a week"));
        let zombies = page.section("Zombie hosts");
        let z = &json["zombies"][0];
        assert_eq!(zombies.rows.len(), 1, "{:?}", zombies.rows);
        let row = &zombies.rows[0];
        assert_eq!(row[0], "dc-1 / z1");
        assert_eq!(row[3], z["hours"].to_string());
        assert_eq!(row[5], energy_j(num(z, "energy_j")));
        assert_eq!(row[7], mass_g(num(z, "carbon_g")));
        assert_eq!(
            (row[3].as_str(), row[5].as_str(), row[7].as_str()),
            ("30", "4.363 MJ", "742.2 g")
        );
    }
}

/// A section of the plans page: the text from a heading to the next one,
/// and its table rows (cells as text; header and separator rows left out).
struct Section {
    text: String,
    rows: Vec<Vec<String>>,
}

struct Page {
    /// (heading, text up to the next heading) in order.
    sections: Vec<(String, String)>,
    html: bool,
}

impl Page {
    fn html(text: &str) -> Page {
        Page::split(text, ["<h3>", "</h3>", "<h2>"], true)
    }

    fn markdown(text: &str) -> Page {
        Page::split(text, ["\n### ", "\n", "\n## "], false)
    }

    /// Sections from a heading's `open` to its `close`, up to the next
    /// `next` (a higher heading) or the next section.
    fn split(text: &str, [open, close, next]: [&str; 3], html: bool) -> Page {
        let sections = text
            .split(open)
            .skip(1)
            .map(|s| {
                let (head, rest) = s.split_once(close).unwrap();
                let rest = rest.split(next).next().unwrap();
                (head.to_string(), rest.to_string())
            })
            .collect();
        Page { sections, html }
    }

    fn section(&self, title: &str) -> Section {
        let text = self
            .sections
            .iter()
            .find(|(h, _)| h == title)
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| {
                panic!(
                    "no section {title:?} in {:?}",
                    self.sections.iter().map(|s| &s.0).collect::<Vec<_>>()
                )
            });
        let rows = if self.html {
            text.split("<tr>")
                .skip(1)
                .filter(|r| r.contains("<td>"))
                .map(|r| {
                    r.split("<td>")
                        .skip(1)
                        .map(|c| c.split("</td>").next().unwrap().to_string())
                        .collect()
                })
                .collect()
        } else {
            text.lines()
                .filter(|l| {
                    l.starts_with("| ")
                        && !l.starts_with("| hour of week")
                        && !l.starts_with("| host |")
                })
                .map(|l| {
                    l.trim_matches('|')
                        .split(" | ")
                        .map(|c| c.trim().to_string())
                        .collect()
                })
                .collect()
        };
        Section { text, rows }
    }
}
