//! Selects tests, runs them against an implementation, and collects their outcomes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use crate::implementation::ImplFile;
use crate::suite::{self, Ctx, Test, Tier, TEST_TIMEOUT};

/// Which tiers to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TierChoice {
    Required,
    Recommended,
    All,
}

impl TierChoice {
    pub fn parse(s: &str) -> Option<TierChoice> {
        match s {
            "required" => Some(TierChoice::Required),
            "recommended" => Some(TierChoice::Recommended),
            "all" => Some(TierChoice::All),
            _ => None,
        }
    }

    fn admits(self, t: Tier) -> bool {
        match self {
            TierChoice::All => true,
            TierChoice::Required => t == Tier::Required,
            TierChoice::Recommended => t == Tier::Recommended,
        }
    }
}

/// What happened to one test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

impl Outcome {
    pub fn word(&self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail(_) => "fail",
            Outcome::Skip(_) => "skip",
        }
    }
    pub fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Pass => None,
            Outcome::Fail(r) | Outcome::Skip(r) => Some(r),
        }
    }
}

/// One test's result, as reported.
#[derive(Clone, Debug)]
pub struct TestResult {
    pub name: &'static str,
    pub ids: &'static [&'static str],
    pub tier: Tier,
    pub outcome: Outcome,
    pub seconds: f64,
}

/// Whether `name` matches a filter: a substring, or a pattern with `*` wildcards.
pub fn matches(filter: &str, name: &str) -> bool {
    if !filter.contains('*') {
        return name.contains(filter);
    }
    let parts: Vec<&str> = filter.split('*').collect();
    let mut rest = name;
    for (i, p) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(p) else { return false };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(p);
        } else {
            let Some(at) = rest.find(p) else { return false };
            rest = &rest[at + p.len()..];
        }
    }
    rest.is_empty()
}

/// The tests a run selects, in suite order: those of the tier that match any filter (all,
/// when there is none).
pub fn select(filters: &[String], tier: TierChoice) -> Vec<Test> {
    suite::all()
        .into_iter()
        .filter(|t| tier.admits(t.tier) && (filters.is_empty() || filters.iter().any(|f| matches(f, t.name))))
        .collect()
}

/// Why `imp` does not run `t`, if it does not.
fn skip_reason(imp: &ImplFile, t: &Test) -> Option<String> {
    if let Some(why) = imp.skip.get(t.name) {
        return Some(format!("skipped by the implementation: {why}"));
    }
    let missing: Vec<&str> = t.needs.iter().filter(|f| !imp.claims(**f)).map(|f| f.name()).collect();
    (!missing.is_empty()).then(|| format!("needs {}, which the implementation does not claim", missing.join(", ")))
}

/// Runs `tests` against `imp`, `jobs` at a time, calling `report` as each finishes.
pub async fn run(imp: Arc<ImplFile>, tests: Vec<Test>, jobs: usize, mut report: impl FnMut(&TestResult)) -> Vec<TestResult> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let total = tests.len();
    // Workers take tests in suite order.
    let queue = Arc::new(std::sync::Mutex::new(tests.into_iter().enumerate().collect::<std::collections::VecDeque<_>>()));
    for _ in 0..jobs.max(1) {
        let (imp, queue, tx) = (imp.clone(), queue.clone(), tx.clone());
        tokio::spawn(async move {
            loop {
                let Some((i, t)) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else { return };
                let start = Instant::now();
                let outcome = match skip_reason(&imp, &t) {
                    Some(why) => Outcome::Skip(why),
                    None => run_one(imp.clone(), &t).await,
                };
                let r = TestResult { name: t.name, ids: t.ids, tier: t.tier, outcome, seconds: start.elapsed().as_secs_f64() };
                let _ = tx.send((i, r));
            }
        });
    }
    drop(tx);
    let mut out: Vec<Option<TestResult>> = (0..total).map(|_| None).collect();
    while let Some((i, r)) = rx.recv().await {
        report(&r);
        out[i] = Some(r);
    }
    out.into_iter().flatten().collect()
}

async fn run_one(imp: Arc<ImplFile>, t: &Test) -> Outcome {
    let ctx = match Ctx::new(imp) {
        Ok(c) => c,
        Err(e) => return Outcome::Fail(format!("cannot create a working directory: {e}")),
    };
    let fut = (t.run)(ctx);
    // Its own task, so that a panic is one failed test.
    let handle = tokio::spawn(async move { tokio::time::timeout(TEST_TIMEOUT, fut).await });
    match handle.await {
        Ok(Ok(Ok(()))) => Outcome::Pass,
        Ok(Ok(Err(e))) => Outcome::Fail(format!("{e:#}")),
        Ok(Err(_)) => Outcome::Fail(format!("did not finish within {TEST_TIMEOUT:?}")),
        Err(e) => Outcome::Fail(format!("panicked: {e}")),
    }
}

/// Spec coverage of a set of tests: the server requirements they name, of all.
#[derive(Clone, Debug)]
pub struct Coverage {
    pub tested: BTreeSet<String>,
    pub untested: Vec<String>,
    /// Requirements on clients, which a server suite cannot observe.
    pub client_duties: usize,
}

impl Coverage {
    pub fn of<'a>(ids: impl IntoIterator<Item = &'a str>) -> Coverage {
        let named: BTreeSet<&str> = ids.into_iter().collect();
        let reqs = missive_spec::requirements::all();
        let server: Vec<_> = reqs.iter().filter(|r| !r.is_client_duty()).collect();
        let tested = server.iter().filter(|r| named.contains(r.id.as_str())).map(|r| r.id.clone()).collect();
        let untested = server.iter().filter(|r| !named.contains(r.id.as_str())).map(|r| r.id.clone()).collect();
        Coverage { tested, untested, client_duties: reqs.len() - server.len() }
    }

    pub fn total(&self) -> usize {
        self.tested.len() + self.untested.len()
    }

    pub fn percent(&self) -> f64 {
        if self.total() == 0 {
            return 0.0;
        }
        100.0 * self.tested.len() as f64 / self.total() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_substrings_and_wildcards() {
        assert!(matches("send", "c2s.send.basic"));
        assert!(matches("fed.*", "fed.recv.accept"));
        assert!(matches("*.recv.*", "fed.recv.accept"));
        assert!(matches("c2s.*.basic", "c2s.send.basic"));
        assert!(!matches("fed.*", "c2s.send.basic"));
        assert!(!matches("c2s.*.basic", "c2s.send.basics"));
    }

    #[test]
    fn every_test_names_real_requirements_and_a_unique_name() {
        let ids: BTreeSet<String> = missive_spec::requirements::all().into_iter().map(|r| r.id).collect();
        let mut names = BTreeSet::new();
        for t in suite::all() {
            assert!(names.insert(t.name), "test name {} twice", t.name);
            assert!(!t.ids.is_empty(), "{} names no requirement", t.name);
            for id in t.ids {
                assert!(ids.contains(*id), "{} names {id}, which the spec does not define", t.name);
            }
        }
    }

    #[test]
    fn coverage_counts_server_requirements_only() {
        let c = Coverage::of(["C2S-SEND-3", "CLI-TLS-1"]);
        assert_eq!(c.tested.len(), 1);
        assert!(c.untested.iter().all(|id| !id.starts_with("CLI-")));
        assert!(c.client_duties >= 5);
    }
}
