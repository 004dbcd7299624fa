//! Clinical content: identifiers that can only be built valid, the canonical
//! [`ClinicalSummary`] (PRSB headings), FHIR R4 and HL7 v2 in and out, the
//! views each recipient may see, and clinical validation. Also the domain
//! facts every layer shares: the journey events and organisation kinds
//! (`event`) and the one field-violation type (`violation`).
//!
//! Pure domain: imports no tonic, prost or sled, and nothing of this crate
//! outside `clinical` (see `docs/layering.md`).
//!
//! # Adding a field to the summary
//!
//! A field is carried only when every format reads and writes it, or says
//! why it cannot. In order:
//!
//! 1. **Model**: the field in `model.rs`, with a doc comment; `Option`/`Vec`
//!    fields get `#[serde(default)]` so payloads already in the store still
//!    read. A rule about its value goes in `validate.rs`, with a path.
//! 2. **Native proto**: the field in `proto/throughcare/summary.proto` (a new
//!    number, never a reused one), then both directions in
//!    `grpc/summary.rs` (`*_from` destructures without `..`, so the build
//!    fails until this is done; `*_to` writes it).
//! 3. **FHIR write** (`fhir/write.rs`, the `add_*` of its heading; a new
//!    element may need a struct in `fhir/types.rs` and a project-local
//!    system or extension URL in `fhir/mod.rs`) and **FHIR read**
//!    (`fhir/document.rs`, the `read_*` of the same resource).
//! 4. **FHIR not read** (`fhir/unread.rs`): add the element's path to its
//!    resource's schema, or every document will list it as not read.
//! 5. **HL7 v2 write** (`hl7v2/write.rs`: a PID/PV1/AL1/DG1 field, or an
//!    `obx.add` in the `push_*` of its heading) and **HL7 v2 read**
//!    (`hl7v2/read.rs`: the segment's `read_*`, or the item's arm in
//!    `Items::read_group`); a segment field also goes in the table of
//!    `hl7v2/unread.rs`. What a format cannot carry goes in
//!    `Rendered::not_carried` with the model path and the reason.
//! 6. **Views** (`views.rs`): `apply` builds each view field by field, so
//!    the build fails until you decide what the admission notice and the
//!    probation view keep of it; what they leave out is listed in
//!    `excluded`. A clinical field reaching probation is a decision.
//! 7. **Docs**: the mapping row in `docs/clinical-formats.md`.
//! 8. **Fixtures and tests**: the field in some of
//!    `tests/fixtures/patients/*.json` (the round trips through FHIR, HL7
//!    and the native form compare whole summaries), in the generator of
//!    `tests/integration/clinical_generated.rs`, and through the
//!    independent judges (`tests/python/test_clinical_interop.py`,
//!    `test_generated_corpus.py`: fhir.resources and hl7apy, run by
//!    `tests/run`).
//! 9. **Hazard log**: if the field is clinical (a wrong or missing value
//!    could harm the patient), a row or cause in
//!    `docs/clinical-safety/hazard-log.md` citing the tests above as
//!    `tests/integration/<file>.rs::<fn>` (checked by `safety_case.rs`).

pub mod carried;
mod event;
pub mod fhir;
pub mod hl7v2;
mod identifiers;
pub mod model;
pub mod synthetic;
pub mod translate;
pub mod treatment;
mod validate;
pub mod views;
mod violation;

pub use event::{JourneyEvent, OrgKind};
pub use identifiers::{Crn, IdentifierError, NhsNumber, OdsCode, PrisonNumber};
pub use model::ClinicalSummary;
pub use validate::{MAX_ITEMS, MAX_SUMMARY_JSON, over_long_lists, validate, validate_serialised};
pub use views::View;
pub use violation::{ValidationErrors, Violation};

/// Limits on what a parser accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest document, bytes.
    pub max_document_bytes: usize,
    /// Deepest JSON nesting.
    pub max_json_depth: usize,
    /// Most HL7 segments.
    pub max_hl7_segments: usize,
    /// Most fields in one segment, and repetitions in one field.
    pub max_hl7_repetitions: usize,
    /// Most entries in a FHIR Bundle (each nested message Bundle too).
    pub max_fhir_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_document_bytes: 4 * 1024 * 1024,
            max_json_depth: 32,
            max_hl7_segments: 2_000,
            max_hl7_repetitions: 100,
            max_fhir_entries: 2_000,
        }
    }
}

/// A document rendered for a recipient, with what its format could not carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The document.
    pub bytes: Vec<u8>,
    /// What was left out and why (paths in the model; never patient data).
    pub not_carried: Vec<String>,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every path into another module of this crate (`crate` then `::`
    /// then the module) and every use of a wire or storage crate, in the
    /// `.rs` files under `dir`. The needles are built here, so this file
    /// does not match itself.
    fn imports(dir: &Path, found: &mut Vec<(String, String)>) {
        let ours = ["crate", "::"].concat();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                imports(&path, found);
            } else if path.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (i, _) in text.match_indices(&ours) {
                    let module: String = text[i + ours.len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    found.push((path.display().to_string(), module));
                }
                for wire in ["tonic", "prost", "sled"] {
                    if text.contains(&format!("{wire}::")) {
                        found.push((path.display().to_string(), wire.into()));
                    }
                }
            }
        }
    }

    /// `docs/layering.md`: the domain imports nothing of ours outside
    /// itself; routing imports only the domain and `uk_time`.
    #[test]
    fn the_domain_imports_nothing_outside_itself() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        for (dir, allowed) in [
            ("clinical", &["clinical"][..]),
            ("journey", &["clinical", "journey", "uk_time"][..]),
        ] {
            let mut found = Vec::new();
            imports(&src.join(dir), &mut found);
            assert!(found.len() > 5, "{dir}: the walk found too little");
            let strays: Vec<_> = found
                .iter()
                .filter(|(_, module)| !allowed.contains(&module.as_str()))
                .collect();
            assert!(strays.is_empty(), "{dir} imports {strays:?}");
        }
    }
}
