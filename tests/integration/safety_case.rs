//! The clinical safety file cannot drift from the code: every test that
//! `docs/clinical-safety/*.md` names as evidence for a control
//! (`tests/integration/<file>.rs::<fn>`, `src/<path>.rs::<fn>` or
//! `tests/python/<file>.py::<fn>`) must exist in that file as a test
//! function. A plain text search: nothing else is compiled or run.

use std::path::{Path, PathBuf};

/// One `path::name` reference found in a document.
#[derive(Debug)]
struct Reference {
    /// Where it was written, `file:line`.
    at: String,
    path: String,
    name: String,
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}::{}", self.at, self.path, self.name)
    }
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every `<path>.rs::<name>` and `<path>.py::<name>` in `text`.
fn references(doc: &str, text: &str) -> Vec<Reference> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        for (i, _) in line.match_indices("::") {
            let before = &line[..i];
            if !(before.ends_with(".rs") || before.ends_with(".py")) {
                continue;
            }
            let start = before
                .char_indices()
                .rev()
                .find(|&(_, c)| !is_path_char(c))
                .map_or(0, |(j, c)| j + c.len_utf8());
            let after = &line[i + 2..];
            let end = after.find(|c| !is_name_char(c)).unwrap_or(after.len());
            out.push(Reference {
                at: format!("{doc}:{}", n + 1),
                path: before[start..].to_owned(),
                name: after[..end].to_owned(),
            });
        }
    }
    out
}

/// Whether `source` (Rust) defines `name` as a test: `fn name(` with
/// `#[test]` or `#[tokio::test…]` among the attributes just above it
/// (`proptest!` cases carry `#[test]` too).
fn rust_test_exists(source: &str, name: &str) -> bool {
    let lines: Vec<&str> = source.lines().collect();
    let signature = format!("fn {name}(");
    lines.iter().enumerate().any(|(i, line)| {
        let l = line.trim_start();
        let l = l.strip_prefix("pub ").unwrap_or(l);
        let l = l.strip_prefix("async ").unwrap_or(l);
        l.starts_with(&signature)
            && lines[..i]
                .iter()
                .rev()
                .map(|a| a.trim())
                .take_while(|a| a.starts_with("#[") || a.starts_with("//"))
                .any(|a| a == "#[test]" || a.starts_with("#[tokio::test"))
    })
}

/// Whether `source` (Python) defines `name` as a pytest test.
fn python_test_exists(source: &str, name: &str) -> bool {
    let signature = format!("def {name}(");
    name.starts_with("test")
        && source.lines().any(|line| {
            let l = line.strip_prefix("async ").unwrap_or(line);
            l.starts_with(&signature)
        })
}

/// Why `r` does not hold under `root`, or `None` when it does.
fn problem(root: &Path, r: &Reference) -> Option<&'static str> {
    let python = r.path.ends_with(".py");
    let place_ok = if python {
        r.path.starts_with("tests/python/")
    } else {
        r.path.starts_with("tests/") || r.path.starts_with("src/")
    };
    if !place_ok || r.path.contains("..") {
        return Some("not a path under tests/, src/ or tests/python/");
    }
    if r.name.is_empty() {
        return Some("no test name after `::`");
    }
    let Ok(source) = std::fs::read_to_string(root.join(&r.path)) else {
        return Some("no such file");
    };
    let found = if python {
        python_test_exists(&source, &r.name)
    } else {
        rust_test_exists(&source, &r.name)
    };
    (!found).then_some("no test function of that name in the file")
}

fn safety_docs(root: &Path) -> Vec<PathBuf> {
    let dir = root.join("docs/clinical-safety");
    let mut docs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    docs
}

#[test]
fn every_test_the_safety_case_names_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let docs = safety_docs(root);
    assert!(
        docs.iter().any(|d| d.ends_with("hazard-log.md")),
        "{docs:?}"
    );
    let mut all = Vec::new();
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        let name = doc.strip_prefix(root).unwrap().display().to_string();
        all.extend(references(&name, &text));
    }
    // A parser that found nothing would pass anything.
    assert!(
        all.len() >= 50,
        "only {} test references found in {docs:?}",
        all.len()
    );
    let broken: Vec<String> = all
        .iter()
        .filter_map(|r| problem(root, r).map(|why| format!("{r} ({why})")))
        .collect();
    assert!(
        broken.is_empty(),
        "{} of {} references in docs/clinical-safety name no test:\n{}",
        broken.len(),
        all.len(),
        broken.join("\n")
    );
}

#[test]
fn the_checker_refuses_what_does_not_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = "\
        `tests/integration/safety_case.rs::the_checker_refuses_what_does_not_exist` holds;\n\
        `tests/no_such_file.rs::a_test`, `tests/integration/safety_case.rs::no_such_test`,\n\
        `tests/integration/safety_case.rs::rust_test_exists` (a helper, not a test),\n\
        `tests/python/test_grpc_client.py::test_submit_pull_ack_track` holds,\n\
        `tests/python/conftest.py::gateway` (a fixture), `../src/lib.rs::x`, `src/lib.rs::`";
    let refs = references("inline", text);
    let verdicts: Vec<(String, bool)> = refs
        .iter()
        .map(|r| (r.name.clone(), problem(root, r).is_none()))
        .collect();
    assert_eq!(
        verdicts,
        [
            ("the_checker_refuses_what_does_not_exist".into(), true),
            ("a_test".into(), false),
            ("no_such_test".into(), false),
            ("rust_test_exists".into(), false),
            ("test_submit_pull_ack_track".into(), true),
            ("gateway".into(), false),
            ("x".into(), false),
            (String::new(), false),
        ]
    );
}
