//! Reports of a run: one line per test for people, JSON lines and JUnit XML for CI systems.

use std::fmt::Write as _;

use serde_json::json;

use crate::runner::{Coverage, Outcome, TestResult};
use crate::suite::Tier;

/// The suite's version and the spec version it tests.
pub fn banner(implementation: &str) -> String {
    format!(
        "missive-conformance {} · Missive spec version {} ({}) · implementation: {implementation}",
        env!("CARGO_PKG_VERSION"),
        missive_spec::PROTOCOL_VERSION,
        missive_spec::requirements::DOCUMENTS.map(|(name, _)| name).join(", ")
    )
}

/// One line per test (and an indented reason under a failure).
pub fn line(r: &TestResult) -> String {
    let word = match r.outcome {
        Outcome::Pass => "PASS",
        Outcome::Fail(_) => "FAIL",
        Outcome::Skip(_) => "SKIP",
    };
    let mut s = format!("{word}  {:<36} {:<12} {:>6.1}s  [{}]", r.name, r.tier.name(), r.seconds, r.ids.join(" "));
    match &r.outcome {
        Outcome::Pass => {}
        Outcome::Skip(why) => {
            let _ = write!(s, "\n      {why}");
        }
        Outcome::Fail(why) => {
            for l in why.lines() {
                let _ = write!(s, "\n      {l}");
            }
        }
    }
    s
}

/// Counts per tier.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

pub fn counts(results: &[TestResult], tier: Option<Tier>) -> Counts {
    let mut c = Counts::default();
    for r in results.iter().filter(|r| tier.is_none_or(|t| r.tier == t)) {
        match r.outcome {
            Outcome::Pass => c.passed += 1,
            Outcome::Fail(_) => c.failed += 1,
            Outcome::Skip(_) => c.skipped += 1,
        }
    }
    c
}

/// Coverage of the requirements named by tests that passed.
pub fn coverage(results: &[TestResult]) -> Coverage {
    Coverage::of(results.iter().filter(|r| r.outcome == Outcome::Pass).flat_map(|r| r.ids.iter().copied()))
}

/// The closing summary for people.
pub fn summary(results: &[TestResult]) -> String {
    let mut s = String::new();
    for tier in [Tier::Required, Tier::Recommended] {
        let c = counts(results, Some(tier));
        let _ = writeln!(s, "{:<12} {} passed, {} failed, {} skipped", format!("{}:", tier.name()), c.passed, c.failed, c.skipped);
    }
    let cov = coverage(results);
    let _ = write!(
        s,
        "spec coverage: {} of {} server requirements checked by passing tests ({:.1}%); {} client duties are out of a server suite's reach",
        cov.tested.len(),
        cov.total(),
        cov.percent(),
        cov.client_duties
    );
    let (r, c) = (counts(results, Some(Tier::Required)), counts(results, Some(Tier::Recommended)));
    let _ = write!(
        s,
        "\nconformance: required {}/{} passed, recommended {}/{} passed, {} failed, {} skipped, spec coverage {:.1}%",
        r.passed,
        r.passed + r.failed + r.skipped,
        c.passed,
        c.passed + c.failed + c.skipped,
        r.failed + c.failed,
        r.skipped + c.skipped,
        cov.percent()
    );
    s
}

/// JSON lines: one object per test, then one summary object.
pub fn json_lines(implementation: &str, results: &[TestResult]) -> String {
    let mut out = String::new();
    for r in results {
        let v = json!({
            "test": r.name,
            "tier": r.tier.name(),
            "spec_ids": r.ids,
            "result": r.outcome.word(),
            "reason": r.outcome.reason(),
            "seconds": (r.seconds * 1000.0).round() / 1000.0,
        });
        out.push_str(&v.to_string());
        out.push('\n');
    }
    let cov = coverage(results);
    let tier = |t| {
        let c = counts(results, Some(t));
        json!({"passed": c.passed, "failed": c.failed, "skipped": c.skipped})
    };
    let v = json!({
        "summary": {
            "suite_version": env!("CARGO_PKG_VERSION"),
            "spec_version": missive_spec::PROTOCOL_VERSION,
            "implementation": implementation,
            "required": tier(Tier::Required),
            "recommended": tier(Tier::Recommended),
            "coverage": {
                "tested": cov.tested.len(),
                "total": cov.total(),
                "percent": (cov.percent() * 10.0).round() / 10.0,
                "untested": cov.untested,
            },
        }
    });
    out.push_str(&v.to_string());
    out.push('\n');
    out
}

fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

/// JUnit XML, one test case per test, classed by tier and area.
pub fn junit(implementation: &str, results: &[TestResult]) -> String {
    let all = counts(results, None);
    let time: f64 = results.iter().map(|r| r.seconds).sum();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let name = xml_escape(&format!("missive-conformance {} ({implementation})", env!("CARGO_PKG_VERSION")));
    let _ = writeln!(
        x,
        "<testsuites name=\"{name}\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{time:.3}\">",
        results.len(),
        all.failed,
        all.skipped
    );
    let _ = writeln!(
        x,
        "  <testsuite name=\"{name}\" tests=\"{}\" failures=\"{}\" errors=\"0\" skipped=\"{}\" time=\"{time:.3}\">",
        results.len(),
        all.failed,
        all.skipped
    );
    for r in results {
        let area = r.name.split('.').next().unwrap_or("suite");
        let _ = write!(
            x,
            "    <testcase classname=\"{}.{}\" name=\"{}\" time=\"{:.3}\">\n      <properties><property name=\"spec_ids\" value=\"{}\"/></properties>\n",
            r.tier.name(),
            area,
            xml_escape(r.name),
            r.seconds,
            r.ids.join(" ")
        );
        match &r.outcome {
            Outcome::Pass => {}
            Outcome::Skip(why) => {
                let _ = writeln!(x, "      <skipped message=\"{}\"/>", xml_escape(why));
            }
            Outcome::Fail(why) => {
                let first = why.lines().next().unwrap_or_default();
                let _ = writeln!(x, "      <failure message=\"{}\">{}</failure>", xml_escape(first), xml_escape(why));
            }
        }
        x.push_str("    </testcase>\n");
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results() -> Vec<TestResult> {
        vec![
            TestResult { name: "c2s.info", ids: &["C2S-INFO-1"], tier: Tier::Required, outcome: Outcome::Pass, seconds: 0.25 },
            TestResult {
                name: "fed.recv.accept",
                ids: &["FED-RECV-11"],
                tier: Tier::Required,
                outcome: Outcome::Fail("results [\"bad\"] <not> accepted & more".into()),
                seconds: 1.0,
            },
            TestResult { name: "fed.send.backoff", ids: &["FED-SEND-5"], tier: Tier::Recommended, outcome: Outcome::Skip("no".into()), seconds: 0.0 },
        ]
    }

    #[test]
    fn junit_escapes_and_counts() {
        let x = junit("x", &results());
        assert!(x.contains("tests=\"3\" failures=\"1\" skipped=\"1\""));
        assert!(x.contains("&lt;not&gt; accepted &amp; more"));
        assert!(x.contains("<skipped message=\"no\"/>"));
    }

    #[test]
    fn json_lines_end_with_a_summary_and_coverage_counts_only_passes() {
        let j = json_lines("x", &results());
        let lines: Vec<serde_json::Value> = j.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[1]["result"], "fail");
        assert_eq!(lines[3]["summary"]["required"]["failed"], 1);
        assert_eq!(lines[3]["summary"]["coverage"]["tested"], 1);
    }
}
