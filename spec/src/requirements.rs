//! The spec's requirement ids: every normative statement in `spec/*.md` carries a stable
//! id in brackets, `[C2S-SEND-3]`, so that tests and reports can name what they check.
//!
//! An id is `SCOPE-TOPIC-N`. Scope `CORE` covers encodings and identifiers, `C2S` a
//! server's client protocol, `FED` federation, and `CLI` duties of clients — which a
//! server conformance suite cannot observe and reports apart.

/// The spec documents, embedded so that tools can list requirements without the source tree.
pub const DOCUMENTS: [(&str, &str); 3] = [
    ("core.md", include_str!("../core.md")),
    ("federation.md", include_str!("../federation.md")),
    ("e2ee.md", include_str!("../e2ee.md")),
];

/// How strong a requirement is, from the RFC 2119 key word in its sentence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// MUST, MUST NOT, or a plain normative statement ("is answered `too_many`").
    Must,
    /// SHOULD, SHOULD NOT.
    Should,
}

/// One requirement: its id, where it is, and the text that states it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub id: String,
    pub document: &'static str,
    /// The section it sits in, as cited: `§6.4` or `F6.2`.
    pub section: String,
    pub level: Level,
    /// The sentence or clause before the id, on one line.
    pub text: String,
}

impl Requirement {
    /// Whether the requirement binds clients rather than servers.
    pub fn is_client_duty(&self) -> bool {
        self.id.starts_with("CLI-")
    }
}

/// Whether `s` has the shape of a requirement id: `SCOPE-TOPIC-N`, the topic upper-case
/// letters and digits starting with a letter (`E2EE`).
pub fn is_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 3
        && ["CORE", "C2S", "FED", "CLI"].contains(&parts[0])
        && parts[1].bytes().next().is_some_and(|b| b.is_ascii_uppercase())
        && parts[1].bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        && !parts[2].is_empty()
        && parts[2].bytes().all(|b| b.is_ascii_digit())
        && !parts[2].starts_with('0')
}

/// The ids in `text` with their byte offsets (start of `[`, end after `]`).
fn ids_in(text: &str) -> Vec<(usize, usize, &str)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(open) = text[from..].find('[').map(|i| i + from) {
        let Some(close) = text[open..].find(']').map(|i| i + open) else { break };
        let inner = &text[open + 1..close];
        if is_id(inner) {
            out.push((open, close + 1, inner));
            from = close + 1;
        } else {
            from = open + 1;
        }
    }
    out
}

/// The start of the block (paragraph, list item or table row) holding offset `at`.
fn block_start(text: &str, at: usize) -> usize {
    let head = &text[..at];
    ["\n\n", "\n- ", "\n|"]
        .iter()
        .filter_map(|sep| head.rfind(sep).map(|i| i + 1))
        .max()
        .unwrap_or(0)
}

/// The section cited for offset `at` of `document`: the last heading (`## 6. Requests`)
/// or numbered paragraph (`6.4. **send**`, `F5.2. **Sender obligations.**`,
/// `E3.1. **keys_upload**`) before it.
fn section_at(document: &str, text: &str, at: usize) -> String {
    let prefix = match document {
        "federation.md" => "F",
        "e2ee.md" => "E",
        _ => "",
    };
    let mut section = String::new();
    for line in text[..at].lines() {
        let (line, heading) = match line.strip_prefix("## ") {
            Some(rest) => (rest, true),
            None => (line, false),
        };
        let Some(rest) = line.strip_prefix(prefix) else { continue };
        let number: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
        let dotted = number.trim_end_matches('.');
        let numbered = number.ends_with('.') && !dotted.is_empty() && rest[number.len()..].starts_with(' ');
        if numbered && (heading || dotted.contains('.')) {
            section = if prefix.is_empty() { format!("§{dotted}") } else { format!("{prefix}{dotted}") };
        }
    }
    section
}

/// Every requirement of every document, in document order.
pub fn all() -> Vec<Requirement> {
    let mut out = Vec::new();
    for (document, text) in DOCUMENTS {
        let mut prev_end = 0;
        for (start, end, id) in ids_in(text) {
            let from = block_start(text, start).max(prev_end);
            let clause = text[from..start].split_whitespace().collect::<Vec<_>>().join(" ");
            let clause = clause.trim_start_matches(['|', ' ']).trim_end_matches([' ', '—', ';']).to_owned();
            let level = if clause.contains("SHOULD") && !clause.contains("MUST") { Level::Should } else { Level::Must };
            out.push(Requirement {
                id: id.to_owned(),
                document,
                section: section_at(document, text, start),
                level,
                text: clause,
            });
            prev_end = end;
        }
    }
    out
}

/// Problems with the ids of `text`: a block that states a MUST or SHOULD without an id,
/// Used by the spec's own tests.
pub fn lint(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    // Blocks: paragraphs split at blank lines, then at list items and table rows.
    for para in text.split("\n\n") {
        if para.trim_start().starts_with("```") {
            continue;
        }
        let mut blocks = vec![String::new()];
        for line in para.lines() {
            if (line.starts_with("- ") || line.starts_with('|')) && !blocks.last().is_some_and(String::is_empty) {
                blocks.push(String::new());
            }
            let b = blocks.last_mut().expect("one block at least");
            b.push_str(line);
            b.push('\n');
        }
        for b in blocks {
            let keyword = ["MUST", "SHOULD"].iter().any(|k| b.contains(k));
            let is_definition = b.contains("key words MUST");
            if keyword && !is_definition && ids_in(&b).is_empty() {
                problems.push(format!("no requirement id in: {}", b.trim()));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_keyword_block_has_an_id_and_ids_are_unique() {
        for (name, text) in DOCUMENTS {
            let problems = lint(text);
            assert!(problems.is_empty(), "{name}:\n{}", problems.join("\n"));
        }
        let reqs = all();
        let mut ids: Vec<&str> = reqs.iter().map(|r| r.id.as_str()).collect();
        ids.sort_unstable();
        let n = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), n, "a requirement id appears twice");
        assert!(n > 80, "only {n} requirements found");
    }

    #[test]
    fn requirements_know_their_section_and_level() {
        let reqs = all();
        let find = |id: &str| reqs.iter().find(|r| r.id == id).unwrap_or_else(|| panic!("{id} missing"));
        let send = find("C2S-SEND-3");
        assert_eq!(send.section, "§6.4");
        assert_eq!(send.level, Level::Must);
        assert!(send.text.contains("MUST be answered with the message of the"), "{}", send.text);
        let cache = find("FED-DISC-5");
        assert_eq!(cache.section, "F2.4");
        assert_eq!(cache.level, Level::Should);
        assert_eq!(find("FED-RECV-3").section, "F6.2");
        assert!(find("CLI-TLS-2").is_client_duty());
        assert_eq!(find("CORE-ORDER-1").section, "§4.6");
        assert_eq!(find("CORE-CBOR-2").section, "§1.1");
        assert_eq!(find("C2S-LOGIN-4").section, "§6.2");
        assert_eq!(find("C2S-TYPE-2").section, "§13");
        assert_eq!(find("FED-BACKFILL-3").section, "F7");
        assert_eq!(find("CORE-ID-3").section, "§2.1");
        assert_eq!((find("FED-DISC-7").section.as_str(), find("FED-DISC-7").level), ("F2.2", Level::Must));
        assert_eq!((find("FED-DISC-8").section.as_str(), find("FED-DISC-8").level), ("F2.5", Level::Must));
        assert_eq!((find("FED-DISC-13").section.as_str(), find("FED-DISC-13").level), ("F2.6", Level::Should));
        assert_eq!(find("C2S-FRAME-2").section, "§5.2");
        assert!(find("C2S-FRAME-9").text.contains("is answered `invalid_request`"), "{}", find("C2S-FRAME-9").text);
        assert_eq!(find("C2S-PRES-6").section, "§12");
        assert!(find("CLI-TLS-3").is_client_duty() && !find("C2S-TLS-1").is_client_duty());
        assert_eq!((find("C2S-E2EE-8").section.as_str(), find("C2S-E2EE-8").level), ("E3.3", Level::Must));
        assert_eq!((find("CLI-E2EE-8").section.as_str(), find("CLI-E2EE-8").level), ("E5.3", Level::Should));
        assert_eq!(find("FED-KEYS-5").section, "E5.2");
        assert_eq!(find("FED-KEYS-5").document, "e2ee.md");
    }

    #[test]
    fn a_block_with_a_keyword_but_no_id_is_reported() {
        assert_eq!(lint("A server MUST do it.\n\nAnother MUST do it. [C2S-X-1]\n").len(), 1);
        assert!(lint("- one SHOULD [FED-A-1]\n- two\n").is_empty());
        assert!(!is_id("C2S-SEND-03") && !is_id("XYZ-A-1") && is_id("FED-RECV-14"));
        assert!(is_id("C2S-E2EE-3") && !is_id("C2S-2E-1") && !is_id("C2S-e2ee-1"));
    }
}
