//! Library operations as the learner model proposes them: parsing its replies, merging the
//! proposals of one batch, and turning the result into store changes.
//!
//! Models are asked for one `ADD: text` / `UPDATE E3: text` / `DELETE E5` / `NONE` line per
//! decision, because small models keep to a line format far better than to JSON; a JSON array
//! in the reference implementation's format (`{"operation", "id", "content"}`) is accepted too,
//! so that prompts written for stronger models work unchanged. Everything a model writes is
//! checked before it reaches the library: ids must exist, texts must be non-empty and short,
//! and a proposal that fails is dropped with a reason that goes into the run directory.

use std::collections::{BTreeMap, HashSet};
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::experience::{Change, Experience, Provenance, Source};

/// What a proposal does to the library; `None` is the model saying nothing should change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Add,
    Update,
    Delete,
    None,
}

/// One proposed change to the library.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub op: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl Proposal {
    /// A proposal to add `text` as a new experience.
    #[cfg(test)]
    pub fn add(text: &str) -> Self {
        Proposal {
            op: Kind::Add,
            id: None,
            text: Some(text.to_owned()),
        }
    }

    /// The line form used in prompts.
    pub fn line(&self) -> String {
        match (self.op, &self.id, &self.text) {
            (Kind::Add, _, Some(t)) => format!("ADD: {t}"),
            (Kind::Update, Some(id), Some(t)) => format!("UPDATE {id}: {t}"),
            (Kind::Delete, Some(id), _) => format!("DELETE {id}"),
            _ => "NONE".into(),
        }
    }
}

static THINK: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?s)<think>.*?</think>").unwrap());
static FENCE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?s)```(?:json)?\s*(\[.*?\])\s*```").unwrap());
static LINE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)^[\s\-*>#\d.)]*\**(add|update|modify|delete|remove|none)\**\b\s*(?:\[?\s*(?:id\s*[:=]?\s*)?([EG]\d+)\s*\]?)?\s*\**\s*(?:[:.\-]\s*(.*))?$",
    )
    .unwrap()
});
static TAGGED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?is)<lessons>\s*(.*?)\s*(?:</lessons>|$)").unwrap());

/// Removes reasoning blocks that some models put before their answer.
pub fn strip_thinking(text: &str) -> String {
    THINK.replace_all(text, "").trim().to_owned()
}

/// The lessons of a group-advantage reply: the text between `<lessons>` tags (an unclosed tag
/// runs to the end, since small models often stop before closing it), or else the reply's
/// lines shaped like a lesson. A reply with neither does not parse.
pub fn parse_lessons(reply: &str) -> Result<String, String> {
    let reply = strip_thinking(reply);
    let lessons = match TAGGED.captures(&reply) {
        Some(c) => c[1].trim().to_owned(),
        // Without the tag, the lines shaped like a lesson ("Name: advice") are the lessons.
        None => reply
            .lines()
            .map(|l| {
                l.trim()
                    .trim_start_matches(['-', '*', ' '])
                    .trim_start_matches(|c: char| c.is_ascii_digit() || c == '.' || c == ')')
                    .trim()
            })
            .filter(|l| {
                l.split_once(':').is_some_and(|(name, advice)| {
                    let words = name.split_whitespace().count();
                    (1..=6).contains(&words) && advice.split_whitespace().count() >= 4
                })
            })
            .collect::<Vec<_>>()
            .join("\n"),
    };
    if lessons.is_empty() && !reply.to_ascii_lowercase().contains("<lessons>") {
        return Err("the reply has no <lessons> section and no line shaped like a lesson".into());
    }
    if lessons.is_empty() {
        return Err("the <lessons> section is empty".into());
    }
    Ok(lessons)
}

/// Reads a model's reply into proposals. `Err` means nothing in it could be read as an
/// operation (the caller retries); proposals that are read but incomplete are kept here and
/// rejected by [`check`], so the reason is recorded.
pub fn parse(reply: &str) -> Result<Vec<Proposal>, String> {
    let reply = strip_thinking(reply);
    if let Some(json) = json_array(&reply) {
        return parse_json(&json);
    }
    let mut out = Vec::new();
    for line in reply.lines() {
        let Some(c) = LINE.captures(line) else {
            continue;
        };
        let op = match c[1].to_ascii_lowercase().as_str() {
            "add" => Kind::Add,
            "update" | "modify" => Kind::Update,
            "delete" | "remove" => Kind::Delete,
            _ => Kind::None,
        };
        let id = c.get(2).map(|m| normalise_id(m.as_str()));
        let text = clean_text(c.get(3).map_or("", |m| m.as_str()));
        out.push(Proposal { op, id, text });
    }
    if out.is_empty() {
        return Err("no ADD/UPDATE/DELETE/NONE line or JSON operation list in the reply".into());
    }
    Ok(out)
}

fn json_array(reply: &str) -> Option<String> {
    if let Some(c) = FENCE.captures_iter(reply).last() {
        return Some(c[1].to_owned());
    }
    let t = reply.trim();
    (t.starts_with('[') && t.ends_with(']')).then(|| t.to_owned())
}

fn parse_json(json: &str) -> Result<Vec<Proposal>, String> {
    let items: Vec<serde_json::Value> = serde_json::from_str(json)
        .map_err(|e| format!("the JSON operation list is invalid: {e}"))?;
    let field = |v: &serde_json::Value, keys: &[&str]| {
        keys.iter()
            .find_map(|k| v.get(k).and_then(|x| x.as_str()).map(str::to_owned))
    };
    let mut out = Vec::new();
    for v in &items {
        let Some(op) = field(v, &["operation", "op", "option"]) else {
            continue;
        };
        let op = match op.to_ascii_lowercase().as_str() {
            "add" => Kind::Add,
            "update" | "modify" => Kind::Update,
            "delete" | "remove" => Kind::Delete,
            _ => Kind::None,
        };
        out.push(Proposal {
            op,
            id: field(v, &["id", "modified_from"]).map(|s| normalise_id(&s)),
            text: clean_text(&field(v, &["content", "experience", "text"]).unwrap_or_default()),
        });
    }
    if out.is_empty() {
        return Err("the JSON list holds no objects with an 'operation'".into());
    }
    Ok(out)
}

fn normalise_id(id: &str) -> String {
    id.trim().trim_matches(['[', ']']).to_ascii_uppercase()
}

fn clean_text(t: &str) -> Option<String> {
    let t = t.trim().trim_matches(['"', '*', '`']).trim();
    (!t.is_empty()).then(|| t.to_owned())
}

/// The longest lesson name the learner's grammars admit, in characters.
const NAME_CHARS: usize = 40;

/// The grammar terminals of one lesson, `Name: advice` on one line, sized so that a whole
/// lesson fits the store's `max_chars`; and the line ending after which a reply may stop (a
/// blank line too, since tokenizers merge newlines).
fn lesson_terminals(max_chars: usize) -> String {
    let advice = max_chars.saturating_sub(NAME_CHARS + 2).clamp(20, 600);
    format!(
        "NAME: /[A-Za-z][A-Za-z0-9 '\\-]{{0,{}}}/\nADVICE: /[^\\n]{{8,{advice}}}/\n\
         END: /\\n[\\n ]{{0,8}}/\n",
        NAME_CHARS - 1
    )
}

/// A group comparison's reply form as a grammar (llguidance's Lark): between `<lessons>` tags,
/// one to `max_lessons` lines of `Name: advice`. Every reply held to it is read by
/// [`parse_lessons`].
pub fn lessons_grammar(max_lessons: usize, max_chars: usize) -> String {
    format!(
        "start: \"<lessons>\\n\" lesson{{1,{}}} \"</lessons>\" END?\n\
         lesson: NAME \": \" ADVICE \"\\n\"\n{}",
        max_lessons.max(1),
        lesson_terminals(max_chars)
    )
}

/// The operations' reply form as a grammar: one to `max_ops` lines, each `ADD: Name: advice`,
/// `UPDATE <id>: Name: advice`, `DELETE <id>` or `NONE`, where an id is one of `ids` (the
/// library's, so that no operation names a lesson that is not there). Every reply held to it
/// is read by [`parse`], and every line it admits passes [`check`] but for a copied example.
pub fn operations_grammar<'a>(
    ids: impl IntoIterator<Item = &'a str>,
    max_ops: usize,
    max_chars: usize,
) -> String {
    let ids: Vec<String> = ids
        .into_iter()
        .map(|id| serde_json::to_string(id).expect("a string serialises"))
        .collect();
    let more = match max_ops.max(1) - 1 {
        0 => String::new(),
        n => format!(" (END line){{0,{n}}}"),
    };
    let mut g = format!("start: line{more} END?\n");
    if ids.is_empty() {
        g.push_str("line: add | \"NONE\"\n");
    } else {
        g.push_str(&format!(
            "line: add | update | delete | \"NONE\"\n\
             update: \"UPDATE \" id \": \" NAME \": \" ADVICE\n\
             delete: \"DELETE \" id\n\
             id: {}\n",
            ids.join(" | ")
        ));
    }
    g.push_str("add: \"ADD: \" NAME \": \" ADVICE\n");
    g.push_str(&lesson_terminals(max_chars));
    g
}

/// Placeholder texts from the prompts' format examples, which small models copy verbatim.
/// Lower case: the comparison is case-blind, since a copy often comes with its first letter
/// raised ("Add: One sentence of advice.").
const FORMAT_EXAMPLES: [&str; 3] = [
    "one sentence of advice",
    "the improved sentence",
    "short name:",
];

fn copies_format_example(text: &str) -> bool {
    let text = text.to_lowercase();
    FORMAT_EXAMPLES.iter().any(|e| text.contains(e))
}

/// A proposal that was dropped, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rejected {
    pub proposal: Proposal,
    pub reason: String,
}

/// Keeps the proposals that can be applied to a library holding `existing`; the rest are
/// returned with reasons. An update of an unknown id becomes an add (its text is still a
/// lesson); a delete of an unknown id is dropped; NONE carries nothing and is dropped silently.
pub fn check(
    proposals: Vec<Proposal>,
    existing: &[Experience],
    max_chars: usize,
) -> (Vec<Proposal>, Vec<Rejected>) {
    let ids: HashSet<&str> = existing.iter().map(|e| e.id.as_str()).collect();
    let mut ok = Vec::new();
    let mut rejected = Vec::new();
    for mut p in proposals {
        let reject = |p: Proposal, reason: &str| Rejected {
            proposal: p,
            reason: reason.to_owned(),
        };
        match p.op {
            Kind::None => {}
            Kind::Add | Kind::Update if p.text.is_none() => {
                rejected.push(reject(p, "no text"));
            }
            Kind::Add | Kind::Update
                if p.text
                    .as_ref()
                    .is_some_and(|t| t.chars().count() > max_chars) =>
            {
                rejected.push(reject(p, "text too long"));
            }
            Kind::Add | Kind::Update
                if p.text.as_ref().is_some_and(|t| copies_format_example(t)) =>
            {
                rejected.push(reject(p, "copied the format example"));
            }
            Kind::Add => {
                p.id = None;
                ok.push(p);
            }
            Kind::Update => {
                if !p.id.as_deref().is_some_and(|id| ids.contains(id)) {
                    p.op = Kind::Add;
                    p.id = None;
                }
                ok.push(p);
            }
            Kind::Delete => match p.id.as_deref() {
                Some(id) if ids.contains(id) => {
                    p.text = None;
                    ok.push(p);
                }
                Some(_) => rejected.push(reject(p, "delete of an id the library does not have")),
                None => rejected.push(reject(p, "delete without an id")),
            },
        }
    }
    (ok, rejected)
}

/// Merges checked proposals by rule, for when the consolidation call fails and to enforce the
/// rules on its output: a delete beats any update of the same id; several updates of one id
/// keep the last; adds that say nearly the same as each other or as an existing experience
/// are dropped.
pub fn merge(proposals: Vec<Proposal>, existing: &[Experience]) -> Vec<Proposal> {
    let deleted: HashSet<String> = proposals
        .iter()
        .filter(|p| p.op == Kind::Delete)
        .filter_map(|p| p.id.clone())
        .collect();
    let mut updates: BTreeMap<String, Proposal> = BTreeMap::new();
    let mut adds: Vec<Proposal> = Vec::new();
    let mut known: Vec<String> = existing.iter().map(|e| e.text.clone()).collect();
    for p in proposals {
        match p.op {
            Kind::Update => {
                let id = p.id.clone().unwrap_or_default();
                if !deleted.contains(&id) {
                    updates.insert(id, p);
                }
            }
            Kind::Add => {
                let text = p.text.clone().unwrap_or_default();
                if known.iter().all(|k| similarity(k, &text) < 0.6) {
                    known.push(text);
                    adds.push(p);
                }
            }
            _ => {}
        }
    }
    let mut deletes: Vec<String> = deleted.into_iter().collect();
    deletes.sort();
    deletes
        .into_iter()
        .map(|id| Proposal {
            op: Kind::Delete,
            id: Some(id),
            text: None,
        })
        .chain(updates.into_values())
        .chain(adds)
        .collect()
}

/// Word-set Jaccard similarity, case-insensitive.
pub fn similarity(a: &str, b: &str) -> f64 {
    let words = |s: &str| -> HashSet<String> {
        s.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    let (a, b) = (words(a), words(b));
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    a.intersection(&b).count() as f64 / a.union(&b).count() as f64
}

/// The store changes for merged proposals, each new experience tagged with where it came from.
pub fn to_changes(
    proposals: &[Proposal],
    run: &str,
    step: u64,
    tags: &[String],
    sources: &[String],
) -> Vec<Change> {
    proposals
        .iter()
        .filter_map(|p| match p.op {
            Kind::Add => Some(Change::Add {
                text: p.text.clone()?,
                tags: tags.to_vec(),
                source: Source::Learned,
                provenance: Provenance {
                    run: Some(run.to_owned()),
                    step: Some(step),
                    note: None,
                    sources: sources.to_vec(),
                },
            }),
            Kind::Update => Some(Change::Update {
                id: p.id.clone()?,
                text: p.text.clone(),
                tags: None,
            }),
            Kind::Delete => Some(Change::Delete { id: p.id.clone()? }),
            Kind::None => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp(id: &str, text: &str) -> Experience {
        let now = chrono::Utc::now();
        Experience {
            id: id.into(),
            text: text.into(),
            tags: vec![],
            source: Source::Manual,
            provenance: Provenance::default(),
            created: now,
            updated: now,
        }
    }

    #[test]
    fn line_format_with_the_noise_models_add() {
        let reply = "Here are my decisions:\n\
            1. ADD: Check units: convert every quantity to one unit before adding.\n\
            - **UPDATE [E3]**: Read twice: reread the question before the final answer.\n\
            DELETE E5\n\
            NONE\n\
            modify G2 - Keep totals: write the running total after each step.\n";
        let p = parse(reply).unwrap();
        assert_eq!(p.len(), 5);
        assert_eq!(
            p[0],
            Proposal::add("Check units: convert every quantity to one unit before adding.")
        );
        assert_eq!(p[1].op, Kind::Update);
        assert_eq!(p[1].id.as_deref(), Some("E3"));
        assert_eq!(
            p[1].text.as_deref(),
            Some("Read twice: reread the question before the final answer.")
        );
        assert_eq!((p[2].op, p[2].id.as_deref()), (Kind::Delete, Some("E5")));
        assert_eq!(p[3].op, Kind::None);
        assert_eq!((p[4].op, p[4].id.as_deref()), (Kind::Update, Some("G2")));
    }

    #[test]
    fn reference_json_format() {
        let reply = "Reasoning...\n```json\n[{\"operation\": \"ADD\", \"id\": null, \"content\": \"A: b.\"},\
            {\"operation\": \"DELETE\", \"id\": \"E1\", \"content\": null},\
            {\"option\": \"modify\", \"experience\": \"C: d.\", \"modified_from\": \"E2\"}]\n```";
        let p = parse(reply).unwrap();
        assert_eq!(p[0], Proposal::add("A: b."));
        assert_eq!((p[1].op, p[1].id.as_deref()), (Kind::Delete, Some("E1")));
        assert_eq!(
            (p[2].op, p[2].id.as_deref(), p[2].text.as_deref()),
            (Kind::Update, Some("E2"), Some("C: d."))
        );
    }

    #[test]
    fn malformed_replies_do_not_parse() {
        assert!(parse("I think the assistant did well overall.").is_err());
        assert!(parse("").is_err());
        assert!(parse("```json\n[{\"operation\": \"ADD\", \"content\": ]\n```").is_err());
        assert!(parse("<think>ADD: hidden</think>nothing here").is_err());
        assert!(parse_lessons("no tags at all").is_err());
        assert_eq!(
            parse_lessons(
                "Here you go:\n1. Check units: convert all quantities before adding.\nok: no"
            )
            .unwrap(),
            "Check units: convert all quantities before adding."
        );
        assert!(parse_lessons("<lessons>  </lessons>").is_err());
        assert_eq!(
            parse_lessons("blah <lessons>\nA: b.\nC: d.").unwrap(),
            "A: b.\nC: d."
        );
    }

    #[test]
    fn checking_drops_what_cannot_apply() {
        let lib = [exp("E1", "Units: convert first.")];
        let (ok, rejected) = check(
            parse("ADD: Short name: one sentence of advice.\nAdd: One sentence of advice.\nADD:\nUPDATE E9: Orphan: becomes an add.\nDELETE E7\nDELETE E1\nNONE\nUPDATE E1: Units: convert before adding.").unwrap(),
            &lib,
            2000,
        );
        assert_eq!(rejected.len(), 4, "{rejected:?}");
        assert_eq!(rejected[0].reason, "copied the format example");
        assert_eq!(rejected[1].reason, "copied the format example");
        assert_eq!(rejected[2].reason, "no text");
        assert!(rejected[3].reason.contains("does not have"));
        assert_eq!(ok[0], Proposal::add("Orphan: becomes an add."));
        assert_eq!((ok[1].op, ok[1].id.as_deref()), (Kind::Delete, Some("E1")));
        assert_eq!(ok[2].op, Kind::Update);
    }

    #[test]
    fn merging_follows_the_rules() {
        let lib = [
            exp("E1", "Units: convert every quantity first."),
            exp("E2", "Totals: keep a running total."),
        ];
        let merged = merge(
            vec![
                Proposal {
                    op: Kind::Update,
                    id: Some("E1".into()),
                    text: Some("Units: first.".into()),
                },
                Proposal {
                    op: Kind::Delete,
                    id: Some("E1".into()),
                    text: None,
                },
                Proposal {
                    op: Kind::Update,
                    id: Some("E2".into()),
                    text: Some("Totals: v1.".into()),
                },
                Proposal {
                    op: Kind::Update,
                    id: Some("E2".into()),
                    text: Some("Totals: v2.".into()),
                },
                Proposal::add("Reread: check the question again before answering."),
                Proposal::add("Reread: check the question again before you answer."),
                Proposal::add("Units: convert every quantity first."),
            ],
            &lib,
        );
        let lines: Vec<String> = merged.iter().map(Proposal::line).collect();
        assert_eq!(
            lines,
            [
                "DELETE E1",
                "UPDATE E2: Totals: v2.",
                "ADD: Reread: check the question again before answering."
            ]
        );
        let changes = to_changes(&merged, "run-1", 3, &[], &[]);
        assert!(matches!(&changes[0], Change::Delete { id } if id == "E1"));
        assert!(
            matches!(&changes[2], Change::Add { provenance, source: Source::Learned, .. } if provenance.step == Some(3))
        );
    }

    #[test]
    fn a_comparison_under_its_grammar_is_a_bounded_list_of_lessons() {
        use crate::backend::grammar_check::accepts;
        let g = lessons_grammar(2, 200);
        let reply = "<lessons>\nCheck signs: Work out each part before combining them.\n</lessons>";
        assert!(accepts(&g, reply));
        assert_eq!(
            parse_lessons(reply).unwrap(),
            "Check signs: Work out each part before combining them."
        );
        let two = "<lessons>\nA: first piece of advice.\nB: second piece of advice.\n</lessons>\n";
        assert!(accepts(&g, two));
        let three = "<lessons>\nA: first piece of advice.\nB: second piece of advice.\nC: a third piece of advice.\n</lessons>";
        assert!(!accepts(&g, three), "more lessons than max_lessons");
        assert!(!accepts(&g, "<lessons>\n</lessons>"), "no lesson");
        assert!(!accepts(&g, "Here are the lessons: ..."), "prose");
        assert!(!accepts(
            &g,
            &format!("<lessons>\nA: {}\n</lessons>", "x".repeat(200))
        ));
    }

    #[test]
    fn operations_under_their_grammar_name_only_existing_ids_and_all_check() {
        use crate::backend::grammar_check::accepts;
        let g = operations_grammar(["E1", "E3"], 3, 200);
        let reply = "ADD: Read twice: Read the question again before answering.\n\
                     UPDATE E3: Units: Keep the units of every number.\nDELETE E1\n";
        assert!(accepts(&g, reply));
        let existing = [exp("E1", "Old: one."), exp("E3", "Older: two.")];
        let (ok, rejected) = check(parse(reply).unwrap(), &existing, 200);
        assert_eq!((ok.len(), rejected.len()), (3, 0));
        assert!(accepts(&g, "NONE"));
        assert!(!accepts(&g, "DELETE E2"), "an id the library does not have");
        assert!(
            !accepts(&g, "ADD: no name given here at all"),
            "a lesson without a name"
        );
        assert!(
            !accepts(&g, "NONE\nNONE\nNONE\nNONE"),
            "more lines than max_ops"
        );
        assert!(!accepts(&g, "I would add a lesson."), "prose");
        // An empty library admits only additions.
        let empty = operations_grammar([], 1, 200);
        assert!(accepts(
            &empty,
            "ADD: Units: Keep the units of every number."
        ));
        assert!(!accepts(&empty, "UPDATE E1: Units: Keep the units."));
    }
}
