//! A medicine's dosages (R4 `Dosage`) in the words the model holds: the
//! dose, route and how often of a MedicationStatement's `dosage`, and the
//! instruction of a MedicationRequest's `dosageInstruction`.
//!
//! # Several dosages
//!
//! `Dosage.sequence` orders them (R4): the same number is taken together
//! (concurrent: methadone 40 mg in the morning and 20 mg in the evening), a
//! higher one after (a reducing dose). Every dosage is carried, in order, in
//! the dose words: taken together joined by "and", in turn by ", then";
//! without a sequence on each, the words say the order is not stated. How
//! often is then the doses a day in all ("twice a day in all"), so that the
//! dosing interval the model reads from it ([`dosing_interval_ms`]) is the
//! shortest the regimen implies, never one dosage's alone; "up to" where the
//! count is a bound (a range, a dose less often than daily, a count read
//! from words, an order not stated). A flag (supervised, as needed) is set
//! only when it holds for every dosage; when they differ, each dosage's
//! words say which.

use serde_json::Number;

use super::index::Index;
use super::types::{Coding, Dosage, TimingRepeat};
use super::{EXT_DOSE, SYS_LOCAL};
use crate::clinical::model::{SNOMED, dosing_interval_ms};

/// What a MedicationStatement's dosages say, as the model holds it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Regimen {
    pub(super) dose: String,
    pub(super) route: String,
    pub(super) frequency: String,
    pub(super) supervised: bool,
    pub(super) as_needed: bool,
}

/// One dosage of a MedicationStatement, read.
struct One {
    dose: String,
    often: String,
    route: String,
    supervised: bool,
    as_needed: bool,
    /// Doses a day (at least one), and whether exactly that many.
    per_day: (u32, bool),
}

/// A MedicationStatement's `dosage` (at `at`, the path of the list) as the
/// model's dose, route, frequency and flags.
pub(super) fn regimen(index: &Index<'_>, dosages: &[Dosage<'_>], at: &str) -> Regimen {
    let mut read: Vec<One> = dosages
        .iter()
        .enumerate()
        .map(|(k, d)| one(index, d, &format!("{at}[{k}]")))
        .collect();
    if read.len() <= 1 {
        return read.pop().map_or_else(Regimen::default, |one| Regimen {
            dose: one.dose,
            route: one.route,
            frequency: one.often,
            supervised: one.supervised,
            as_needed: one.as_needed,
        });
    }
    let supervised = read.iter().all(|r| r.supervised);
    let as_needed = read.iter().all(|r| r.as_needed);
    let mut routes: Vec<&str> = Vec::new();
    for r in &read {
        if !r.route.is_empty() && !routes.contains(&r.route.as_str()) {
            routes.push(&r.route);
        }
    }
    let words: Vec<String> = read
        .iter()
        .map(|r| {
            let w = joined(&[&r.dose, &r.often], " ");
            let mut which: Vec<&str> = Vec::new();
            if r.supervised && !supervised {
                which.push("supervised");
            }
            if r.as_needed && !as_needed && !says_as_needed(&w) {
                which.push("as needed");
            }
            if routes.len() > 1 && !r.route.is_empty() {
                which.push(&r.route);
            }
            match which.is_empty() {
                true => w,
                false => format!("{w} ({})", which.join(", ")),
            }
        })
        .collect();
    let (phases, stated) = phases(dosages);
    Regimen {
        dose: in_order(&phases, stated, &words),
        route: routes.join(" and "),
        frequency: doses_a_day(dosages, &read, &phases, stated),
        supervised,
        as_needed,
    }
}

/// A MedicationRequest's `dosageInstruction` (at `at`, the path of the
/// list) in words; None when it says nothing.
pub(super) fn instructions(index: &Index<'_>, dosages: &[Dosage<'_>], at: &str) -> Option<String> {
    let words: Vec<String> = dosages
        .iter()
        .enumerate()
        .map(|(k, d)| instruction(index, d, &format!("{at}[{k}]")))
        .collect();
    let (phases, stated) = phases(dosages);
    let words = if words.len() == 1 {
        words.into_iter().next().unwrap_or_default()
    } else {
        in_order(&phases, stated, &words)
    };
    (!words.is_empty()).then_some(words)
}

/// One instruction in words: its `text`, else the dose and how often as the
/// sender gave them in numbers ("5 mg twice a day"); "as needed" added when
/// it is (and the words do not say so already). Beside a text, the numbers
/// are listed, not carried (the text is what a clinician wrote).
fn instruction(index: &Index<'_>, d: &Dosage<'_>, at: &str) -> String {
    let mut words = if let Some(text) = d.text.as_deref() {
        if !d.dose_and_rate.is_empty() {
            index.note(
                format_args!("{at}.doseAndRate"),
                "not carried: the dose as numbers beside the instruction in words (text)",
            );
        }
        if d.timing.is_some() {
            index.note(
                format_args!("{at}.timing"),
                "not carried: the timing beside the instruction in words (text)",
            );
        }
        text.to_owned()
    } else {
        joined(&[&dose(index, d, at), &frequency(index, d, at)], " ")
    };
    if as_needed(index, d, at) && !says_as_needed(&words) {
        if !words.is_empty() {
            words.push_str(", ");
        }
        words.push_str("as needed");
    }
    words
}

/// One dosage of a MedicationStatement. Beside our dose extension the
/// `text` is the whole instruction made of the parts read here
/// ([`instruction_in_words`]), and the dose is the extension's. A text that
/// says otherwise (edited by a clinician in a system that kept the
/// extension) wins: it is carried as the dose, as any sender's text is,
/// and the extension is listed; a blank extension is none.
fn one(index: &Index<'_>, d: &Dosage<'_>, at: &str) -> One {
    let ours = d
        .extension
        .iter()
        .find(|e| e.url == EXT_DOSE)
        .and_then(|e| e.value_string.as_deref())
        .filter(|w| !w.trim().is_empty());
    let Some(words) = ours else {
        let dose = dose(index, d, at);
        let often = frequency(index, d, at);
        let per_day = per_day(d, &joined(&[&dose, &often], " "));
        return One {
            route: route(index, d, at),
            supervised: supervised(index, d, at),
            as_needed: as_needed(index, d, at),
            dose,
            often,
            per_day,
        };
    };
    let mut one = One {
        often: frequency(index, d, at),
        route: route(index, d, at),
        supervised: supervised(index, d, at),
        as_needed: as_needed(index, d, at),
        dose: words.to_owned(),
        per_day: (1, false),
    };
    let agrees = d
        .text
        .as_deref()
        .is_none_or(|t| t.trim() == one.instruction());
    if agrees {
        if !d.dose_and_rate.is_empty() {
            index.note(
                format_args!("{at}.doseAndRate"),
                "not carried: the dose as numbers beside the dose in words (extension)",
            );
        }
    } else {
        index.note(
            format_args!("{at}.extension"),
            "not carried: a dose beside an instruction in words (text) that says otherwise; the \
             words are carried as the dose",
        );
        one.dose = dose(index, d, at);
    }
    one.per_day = per_day(d, &joined(&[&one.dose, &one.often], " "));
    one
}

impl One {
    fn instruction(&self) -> String {
        instruction_in_words(
            &self.dose,
            &self.often,
            &self.route,
            self.supervised,
            self.as_needed,
        )
    }
}

/// A medicine's whole instruction in words, as R4 means `Dosage.text` (a
/// receiver may show nothing else): "60 mg once a day, oral, supervised
/// consumption". The writer puts it in `text` and the dose alone in our
/// extension; the reader checks a text beside that extension against it.
pub(super) fn instruction_in_words(
    dose: &str,
    frequency: &str,
    route: &str,
    supervised: bool,
    as_needed: bool,
) -> String {
    // A dose that already says how often ("60 mg once daily") says it once.
    let said = !frequency.trim().is_empty()
        && dose
            .to_lowercase()
            .contains(&frequency.trim().to_lowercase());
    let mut words = joined(&[dose, if said { "" } else { frequency }], " ");
    let mut add = |part: &str| {
        if !part.trim().is_empty() {
            if !words.is_empty() {
                words.push_str(", ");
            }
            words.push_str(part.trim());
        }
    };
    add(route);
    if supervised {
        add("supervised consumption");
    }
    if as_needed && !says_as_needed(dose) && !says_as_needed(frequency) {
        add("as needed");
    }
    words
}

/// The dosages in the order they apply: groups taken together, in
/// sequence order, and whether the order is stated (every dosage has a
/// `sequence`; one dosage needs none).
fn phases(dosages: &[Dosage<'_>]) -> (Vec<Vec<usize>>, bool) {
    let sequences: Option<Vec<i64>> = dosages.iter().map(|d| d.sequence).collect();
    let Some(sequences) = sequences.filter(|_| dosages.len() > 1) else {
        return (vec![(0..dosages.len()).collect()], dosages.len() <= 1);
    };
    let mut order: Vec<usize> = (0..dosages.len()).collect();
    order.sort_by_key(|k| sequences[*k]);
    let mut phases: Vec<Vec<usize>> = Vec::new();
    for k in order {
        match phases.last_mut() {
            Some(p) if sequences[p[0]] == sequences[k] => p.push(k),
            _ => phases.push(vec![k]),
        }
    }
    (phases, true)
}

/// Each dosage's words, in order: taken together joined by "and", in turn
/// by ", then"; when the order is not stated, listed and said so.
fn in_order(phases: &[Vec<usize>], stated: bool, words: &[String]) -> String {
    let phase = |p: &Vec<usize>, between: &str| {
        let each: Vec<&str> = p.iter().map(|k| words[*k].as_str()).collect();
        joined(&each, between)
    };
    if !stated {
        let all = phases.iter().map(|p| phase(p, "; ")).collect::<Vec<_>>();
        return format!(
            "{} (the document does not say whether these are taken together or one after \
             another)",
            joined(&all.iter().map(String::as_str).collect::<Vec<_>>(), "; ")
        );
    }
    let each: Vec<String> = phases.iter().map(|p| phase(p, " and ")).collect();
    joined(
        &each.iter().map(String::as_str).collect::<Vec<_>>(),
        ", then ",
    )
}

/// How often, for several dosages: the doses a day in all of each group
/// taken together ("twice a day in all"), groups in turn joined by
/// ", then". Dosages taken together at the same timing count once (two
/// tablets of different strengths, both in the morning).
fn doses_a_day(
    dosages: &[Dosage<'_>],
    read: &[One],
    phases: &[Vec<usize>],
    stated: bool,
) -> String {
    let mut out: Vec<String> = Vec::new();
    for p in phases {
        let (mut total, mut exact) = (0u32, stated);
        for (n, &k) in p.iter().enumerate() {
            let timing = dosages[k].timing.as_ref();
            if timing.is_some() && p[..n].iter().any(|&j| dosages[j].timing.as_ref() == timing) {
                continue;
            }
            total = total.saturating_add(read[k].per_day.0);
            exact &= read[k].per_day.1;
        }
        let times = match total {
            1 => "once".to_owned(),
            2 => "twice".to_owned(),
            n => format!("{n} times"),
        };
        let words = format!("{}{times} a day in all", if exact { "" } else { "up to " });
        if out.last() != Some(&words) {
            out.push(words);
        }
    }
    out.join(", then ")
}

/// How many doses a day one dosage gives, at most (at least one), and
/// whether exactly that: from `timing.repeat`'s numbers (the higher
/// frequency, the shorter period), else its events of the day and times,
/// else the model's reading of the dosage's words (`words`).
fn per_day(d: &Dosage<'_>, words: &str) -> (u32, bool) {
    let repeat = d
        .timing
        .as_ref()
        .filter(|t| t.code.is_none())
        .and_then(|t| t.repeat.as_ref());
    if let Some(r) = repeat {
        if let Some(o) = Often::of(r) {
            let times = f64::from(o.times_max.unwrap_or(o.times));
            let a_day = 24.0 * times / (o.period_value() * o.unit.hours);
            let ranged = o.times_max.is_some() || o.period_max.is_some();
            let exact = !ranged && a_day >= 1.0 && a_day.fract() == 0.0;
            // At most once a second, a count beyond any regimen.
            return (a_day.clamp(1.0, 86_400.0).ceil() as u32, exact);
        }
        let events: usize = r.when.iter().map(|w| event(w).map_or(1, |e| e.1)).sum();
        let events = events + r.time_of_day.len();
        if events > 0 {
            return (u32::try_from(events).unwrap_or(u32::MAX), true);
        }
    }
    let hours = (dosing_interval_ms(words) / 3_600_000).clamp(1, 24);
    let a_day = (24 + hours - 1) / hours;
    (u32::try_from(a_day).unwrap_or(1), false)
}

/// `parts` that hold words, joined by `between`.
fn joined(parts: &[&str], between: &str) -> String {
    parts
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(between)
}

/// Whether words already say a dose is taken as needed.
fn says_as_needed(words: &str) -> bool {
    let w = words.to_ascii_lowercase();
    [
        "as needed",
        "as required",
        "when required",
        "when needed",
        "if required",
    ]
    .iter()
    .any(|p| w.contains(p))
        || w.split(|c: char| !c.is_ascii_alphanumeric())
            .any(|t| t == "prn")
}

/// The route in words: its text, else its first coding's display; a coded
/// route with neither is listed.
fn route(index: &Index<'_>, d: &Dosage<'_>, at: &str) -> String {
    let Some(r) = d.route.as_ref() else {
        return String::new();
    };
    let text = r
        .text
        .as_ref()
        .or_else(|| r.coding.first().and_then(|c| c.display.as_ref()));
    if text.is_none() && !r.coding.is_empty() {
        index.note(
            format_args!("{at}.route"),
            "not carried: a coded route without text or display",
        );
    }
    text.map(|t| t.to_string()).unwrap_or_default()
}

/// How often, in words: the timing's text, else its coding's display, else
/// its code (a coded-only timing, `QD`, is valid FHIR and must not arrive
/// as no frequency at all), else its `repeat` in words.
pub(super) fn frequency(index: &Index<'_>, d: &Dosage<'_>, at: &str) -> String {
    let Some(timing) = d.timing.as_ref() else {
        return String::new();
    };
    let Some(cc) = timing.code.as_ref() else {
        return timing
            .repeat
            .as_ref()
            .map(|r| repeat_in_words(index, r, at))
            .unwrap_or_default();
    };
    if timing.repeat.is_some() {
        index.note(
            format_args!("{at}.timing.repeat"),
            "not carried: how often as numbers beside the timing's code",
        );
    }
    if let Some(text) = &cc.text {
        return text.to_string();
    }
    // The coding the unread walker counts as read: SNOMED CT first, else
    // the first with a system and a code.
    let usable = |c: &&Coding<'_>| c.system.is_some() && c.code.is_some();
    let Some(c) = cc
        .coding
        .iter()
        .find(|c| usable(c) && c.system.as_deref() == Some(SNOMED))
        .or_else(|| cc.coding.iter().find(usable))
        .or(cc.coding.first())
    else {
        return String::new();
    };
    match (&c.display, &c.code) {
        (Some(display), _) => display.to_string(),
        (None, Some(code)) => {
            index.note(
                format_args!("{at}.timing.code"),
                "carried as its code alone: a coded timing without text or display",
            );
            code.to_string()
        }
        (None, None) => String::new(),
    }
}

/// A UCUM unit of time `periodUnit` may hold.
#[derive(Clone, Copy)]
struct Unit {
    word: &'static str,
    hours: f64,
}

impl Unit {
    fn of(code: &str) -> Option<Self> {
        let (word, hours) = match code {
            "s" => ("second", 1.0 / 3600.0),
            "min" => ("minute", 1.0 / 60.0),
            "h" => ("hour", 1.0),
            "d" => ("day", 24.0),
            "wk" => ("week", 168.0),
            // UCUM's mean month and year.
            "mo" => ("month", 730.5),
            "a" => ("year", 8766.0),
            _ => return None,
        };
        Some(Self { word, hours })
    }
}

const HOUR: Unit = Unit {
    word: "hour",
    hours: 1.0,
};

/// A repeat's numbers, when they say how often: `frequency` (up to
/// `frequencyMax`) times every `period` (up to `periodMax`) `periodUnit`.
/// A maximum not above its minimum says no range, and is left out.
struct Often<'r> {
    times: u32,
    times_max: Option<u32>,
    period: &'r Number,
    period_max: Option<&'r Number>,
    unit: Unit,
}

impl<'r> Often<'r> {
    fn of(r: &'r TimingRepeat<'_>) -> Option<Self> {
        let positive = |n: &&Number| n.as_f64().is_some_and(|v| v > 0.0 && v.is_finite());
        let times = r.frequency.filter(|f| *f > 0)?;
        let period = r.period.as_ref().filter(positive)?;
        let unit = Unit::of(r.period_unit.as_deref()?)?;
        Some(Self {
            times,
            times_max: r.frequency_max.filter(|m| *m > times),
            period,
            period_max: r
                .period_max
                .as_ref()
                .filter(|m| m.as_f64() > period.as_f64()),
            unit,
        })
    }

    fn period_value(&self) -> f64 {
        self.period.as_f64().unwrap_or(1.0)
    }

    /// "twice a day", "once every 2 weeks", "1 to 4 times a day", "once
    /// every 4 to 6 hours". A fraction of a day or longer that is a whole
    /// number of hours is said in hours ("every 12 hours", not "every 0.5
    /// days"): the model reads hours, and a reader does too.
    fn in_words(&self) -> String {
        let times = match (self.times, self.times_max) {
            (f, Some(m)) => format!("{f} to {m} times"),
            (1, None) => "once".to_owned(),
            (2, None) => "twice".to_owned(),
            (n, None) => format!("{n} times"),
        };
        let mut unit = self.unit;
        let mut first = self.period_value();
        let mut period = self.period.to_string();
        let mut period_max = self.period_max.map(Number::to_string);
        let values: Vec<f64> = [Some(self.period), self.period_max]
            .into_iter()
            .flatten()
            .filter_map(Number::as_f64)
            .collect();
        if unit.hours >= 24.0 && values.iter().any(|v| v.fract() != 0.0) {
            let hours: Vec<f64> = values.iter().map(|v| v * unit.hours).collect();
            if hours.iter().all(|h| h.fract() == 0.0 && *h >= 1.0) {
                first = hours[0];
                period = format!("{:.0}", hours[0]);
                period_max = hours.get(1).map(|h| format!("{h:.0}"));
                unit = HOUR;
            }
        }
        let word = unit.word;
        match period_max {
            Some(max) => format!("{times} every {period} to {max} {word}s"),
            None if first == 1.0 => {
                let article = if word == "hour" { "an" } else { "a" };
                format!("{times} {article} {word}")
            }
            None => format!("{times} every {period} {word}s"),
        }
    }
}

/// A timing's `repeat` in words: its numbers ([`Often::in_words`]), then
/// the events of the day and times of day it names ("once a day in the
/// morning", "at 08:00 and at 20:00"). Numbers that do not say how often
/// (no UCUM unit, a zero) are listed, not guessed at.
fn repeat_in_words(index: &Index<'_>, r: &TimingRepeat<'_>, at: &str) -> String {
    let often = Often::of(r);
    let any_numbers = r.frequency.is_some()
        || r.frequency_max.is_some()
        || r.period.is_some()
        || r.period_max.is_some()
        || r.period_unit.is_some();
    match &often {
        None if any_numbers => index.note(
            format_args!("{at}.timing.repeat"),
            "not carried: how often needs frequency, period and a UCUM periodUnit (s, min, h, \
             d, wk, mo, a)",
        ),
        None => {}
        Some(o) => {
            if r.frequency_max.is_some() && o.times_max.is_none() {
                index.note(
                    format_args!("{at}.timing.repeat.frequencyMax"),
                    "not carried: not above frequency, so no range",
                );
            }
            if r.period_max.is_some() && o.period_max.is_none() {
                index.note(
                    format_args!("{at}.timing.repeat.periodMax"),
                    "not carried: not above period, so no range",
                );
            }
        }
    }
    let mut events: Vec<String> = Vec::new();
    for (j, w) in r.when.iter().enumerate() {
        match event(w) {
            Some((words, _)) => events.push(words.to_owned()),
            None => index.note(
                format_args!("{at}.timing.repeat.when[{j}]"),
                "not carried: not an event of the day R4 defines (event-timing)",
            ),
        }
    }
    for (j, t) in r.time_of_day.iter().enumerate() {
        match clock(t) {
            Some(t) => events.push(format!("at {t}")),
            None => index.note(
                format_args!("{at}.timing.repeat.timeOfDay[{j}]"),
                "not carried: not a time of day (hh:mm:ss)",
            ),
        }
    }
    let numbers = often.map(|o| o.in_words()).unwrap_or_default();
    let events = events.join(" and ");
    joined(&[&numbers, &events], " ")
}

/// An R4 event of the day (`Timing.repeat.when`, event-timing) in words,
/// with how many times a day it comes (a meal three).
fn event(code: &str) -> Option<(&'static str, usize)> {
    Some(match code {
        "MORN" => ("in the morning", 1),
        "MORN.early" => ("early in the morning", 1),
        "MORN.late" => ("late in the morning", 1),
        "NOON" => ("at noon", 1),
        "AFT" => ("in the afternoon", 1),
        "AFT.early" => ("early in the afternoon", 1),
        "AFT.late" => ("late in the afternoon", 1),
        "EVE" => ("in the evening", 1),
        "EVE.early" => ("early in the evening", 1),
        "EVE.late" => ("late in the evening", 1),
        "NIGHT" => ("at night", 1),
        "PHS" => ("after sleep", 1),
        "HS" => ("at bedtime", 1),
        "WAKE" => ("on waking", 1),
        "C" => ("with meals", 3),
        "CM" => ("with breakfast", 1),
        "CD" => ("with lunch", 1),
        "CV" => ("with the evening meal", 1),
        "AC" => ("before meals", 3),
        "ACM" => ("before breakfast", 1),
        "ACD" => ("before lunch", 1),
        "ACV" => ("before the evening meal", 1),
        "PC" => ("after meals", 3),
        "PCM" => ("after breakfast", 1),
        "PCD" => ("after lunch", 1),
        "PCV" => ("after the evening meal", 1),
        _ => return None,
    })
}

/// A FHIR `time` (`hh:mm:ss`, optional fraction) as a reader says it:
/// `08:00`, or `08:30:15` when the seconds count.
fn clock(t: &str) -> Option<String> {
    let (hms, fraction) = t.split_once('.').unwrap_or((t, ""));
    let b = hms.as_bytes();
    let two = |i: usize, max: u8| {
        let (h, l) = (*b.get(i)?, *b.get(i + 1)?);
        (h.is_ascii_digit() && l.is_ascii_digit() && (h - b'0') * 10 + (l - b'0') <= max)
            .then_some(())
    };
    let shaped = b.len() == 8
        && b[2] == b':'
        && b[5] == b':'
        && two(0, 23).is_some()
        && two(3, 59).is_some()
        && two(6, 60).is_some()
        && fraction.bytes().all(|c| c.is_ascii_digit())
        && !(t.contains('.') && fraction.is_empty());
    if !shaped {
        return None;
    }
    Some(if &hms[6..] == "00" && fraction.is_empty() {
        hms[..5].to_owned()
    } else {
        t.to_owned()
    })
}

/// The dose in words: the dosage's `text`, else its first
/// `doseAndRate.doseQuantity` as value and unit ("60 mg"). Beside a text,
/// the quantity is listed, not carried (the text is what a clinician wrote).
pub(super) fn dose(index: &Index<'_>, d: &Dosage<'_>, at: &str) -> String {
    let quantity = d
        .dose_and_rate
        .first()
        .and_then(|r| r.dose_quantity.as_ref());
    if let Some(text) = d.text.as_deref() {
        if quantity.is_some() {
            index.note(
                format_args!("{at}.doseAndRate[0].doseQuantity"),
                "not carried: the dose as a quantity beside the dose in words (text)",
            );
        }
        return text.to_owned();
    }
    let Some(q) = quantity else {
        return String::new();
    };
    let at_q = format_args!("{at}.doseAndRate[0].doseQuantity");
    if q.comparator.is_some() {
        // "<10 mg" is not 10 mg: a dose that is a bound is not carried as one.
        index.note(
            at_q,
            "not carried: a dose with a comparator (a bound, not a dose)",
        );
        return String::new();
    }
    match (&q.value, unit_of(q)) {
        (Some(v), Some(u)) => format!("{v} {u}"),
        (Some(v), None) => {
            index.note(
                at_q,
                "the unit is not carried: no unit text, and no UCUM code",
            );
            v.to_string()
        }
        (None, _) => {
            index.note(at_q, "not carried: a dose quantity without a value");
            String::new()
        }
    }
}

/// A quantity's unit in words: its `unit`, or a UCUM code (readable as a
/// unit). A code from another system (SNOMED CT's "tablet" as a number) is
/// no unit to print.
pub(super) fn unit_of<'q>(q: &'q super::types::Quantity<'_>) -> Option<&'q str> {
    let ucum = q.system.as_deref() == Some("http://unitsofmeasure.org");
    q.unit
        .as_deref()
        .or(q.code.as_deref().filter(|_| ucum))
        .filter(|u| !u.trim().is_empty())
}

/// Whether the medicine is taken as needed (PRN): `asNeededBoolean`, or
/// `asNeededCodeableConcept` (needed for a reason, whose words are listed:
/// the model carries that it is as needed, not why).
fn as_needed(index: &Index<'_>, d: &Dosage<'_>, at: &str) -> bool {
    if d.as_needed_codeable_concept.is_some() {
        index.note(
            format_args!("{at}.asNeededCodeableConcept"),
            "carried as 'as needed'; the reason it is needed for is not carried",
        );
        return true;
    }
    d.as_needed_boolean == Some(true)
}

/// Whether the dose is taken under supervision (the gateway's own
/// `supervised` instruction). Every other additional instruction is listed:
/// the model has no place for it, and it must not vanish unsaid.
fn supervised(index: &Index<'_>, d: &Dosage<'_>, at: &str) -> bool {
    let mut supervised = false;
    for (k, c) in d.additional_instruction.iter().enumerate() {
        if c.code_in(SYS_LOCAL).and_then(|c| c.code.as_deref()) == Some("supervised") {
            supervised = true;
        } else {
            index.note(
                format_args!("{at}.additionalInstruction[{k}]"),
                "not carried: an additional instruction the model has no place for (only \
                 supervised consumption, in the gateway's own code, is read)",
            );
        }
    }
    supervised
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::test_doc::{entry_of, read_after};
    use crate::clinical::ClinicalSummary;
    use crate::clinical::model::dosing_interval_ms;

    const HOUR_MS: i64 = 3_600_000;

    /// The summary read with the MedicationStatement's dosages set to `dosage`.
    fn with_dosages(dosage: Value) -> ClinicalSummary {
        read_after(|doc| {
            let (_, m) = entry_of(doc, "MedicationStatement");
            m["dosage"] = dosage;
        })
        .expect("read")
    }

    /// The summary read with the MedicationRequest's instructions set to `dosage`.
    fn with_instructions(dosage: Value) -> ClinicalSummary {
        read_after(|doc| {
            let (_, r) = entry_of(doc, "MedicationRequest");
            r["dosageInstruction"] = dosage;
        })
        .expect("read")
    }

    /// A take-out prescription taken as needed says so in its instruction,
    /// as a MedicationStatement's does in its flag: a PRN diazepam read as
    /// "5 mg 3 times a day" would be given on a schedule.
    #[test]
    fn a_prescription_taken_as_needed_is_carried_as_needed() {
        let quantity = json!([{"doseQuantity": {"value": 5, "unit": "mg"}}]);
        let three_a_day = json!({"repeat": {"frequency": 3, "period": 1, "periodUnit": "d"}});
        for (instruction, words) in [
            (
                json!({"doseAndRate": quantity, "timing": three_a_day, "asNeededBoolean": true}),
                "5 mg 3 times a day, as needed",
            ),
            (
                json!({"text": "5 mg three times a day", "asNeededBoolean": true}),
                "5 mg three times a day, as needed",
            ),
            (
                json!({"text": "5 mg when required", "asNeededBoolean": true}),
                "5 mg when required",
            ),
            (
                json!({"doseAndRate": quantity, "asNeededCodeableConcept": {"text": "for anxiety"}}),
                "5 mg, as needed",
            ),
            (
                json!({"doseAndRate": quantity, "timing": three_a_day, "asNeededBoolean": false}),
                "5 mg 3 times a day",
            ),
        ] {
            let s = with_instructions(json!([instruction]));
            assert_eq!(
                s.prescriptions[0].dosage.as_deref(),
                Some(words),
                "{instruction}"
            );
            assert!(
                !s.not_read.iter().any(|n| n.contains("asNeededBoolean")),
                "{:?}",
                s.not_read
            );
        }
        let s = with_instructions(json!([{"asNeededCodeableConcept": {"text": "for anxiety"}}]));
        assert_eq!(s.prescriptions[0].dosage.as_deref(), Some("as needed"));
        assert!(
            s.not_read
                .iter()
                .any(|n| n.contains("dosageInstruction[0].asNeededCodeableConcept: carried as")),
            "{:?}",
            s.not_read
        );
    }

    /// Two dosages of one sequence are taken together (R4 Dosage.sequence):
    /// both are carried, and how often is the doses a day in all, so a split
    /// methadone dose is due 12 hours after the last, not 24.
    #[test]
    fn concurrent_dosages_are_all_carried_and_due_at_the_shortest_interval() {
        let dosage = |seq: Option<i64>, text: &str, repeat: Value| {
            let mut d = json!({"text": text, "timing": {"repeat": repeat}});
            if let Some(seq) = seq {
                d["sequence"] = json!(seq);
            }
            d
        };
        let daily =
            |when: &str| json!({"frequency": 1, "period": 1, "periodUnit": "d", "when": [when]});
        let s = with_dosages(json!([
            dosage(Some(1), "40 mg", daily("MORN")),
            dosage(Some(1), "20 mg", daily("EVE")),
        ]));
        let m = &s.medications[0];
        assert_eq!(
            m.dose,
            "40 mg once a day in the morning and 20 mg once a day in the evening"
        );
        assert_eq!(m.frequency, "twice a day in all");
        assert_eq!(dosing_interval_ms(&m.frequency), 12 * HOUR_MS);
        assert!(s.not_read.is_empty(), "{:?}", s.not_read);
        // Times of day, and the same read from the prescription.
        let at = |t: &str| json!({"timeOfDay": [t]});
        let s = with_dosages(json!([
            dosage(Some(1), "40 mg", at("08:00:00")),
            dosage(Some(1), "20 mg", at("20:00:00")),
        ]));
        assert_eq!(s.medications[0].dose, "40 mg at 08:00 and 20 mg at 20:00");
        assert_eq!(s.medications[0].frequency, "twice a day in all");
        let s = with_instructions(json!([
            dosage(Some(1), "1 spray", daily("MORN")),
            dosage(Some(1), "2 sprays", daily("EVE")),
        ]));
        assert_eq!(
            s.prescriptions[0].dosage.as_deref(),
            Some("1 spray and 2 sprays")
        );
        // Taken together at the same time counts once.
        let s = with_dosages(json!([
            dosage(Some(1), "8 mg", daily("MORN")),
            dosage(Some(1), "2 mg", daily("MORN")),
        ]));
        assert_eq!(s.medications[0].frequency, "once a day in all");
        // In turn (a reducing dose): in sequence order, whatever the order
        // written; the busiest phase decides the interval.
        let s = with_dosages(json!([
            dosage(Some(2), "30 mg", daily("MORN")),
            dosage(
                Some(1),
                "20 mg",
                json!({"frequency": 2, "period": 1, "periodUnit": "d"})
            ),
        ]));
        let m = &s.medications[0];
        assert_eq!(
            m.dose,
            "20 mg twice a day, then 30 mg once a day in the morning"
        );
        assert_eq!(m.frequency, "twice a day in all, then once a day in all");
        assert_eq!(dosing_interval_ms(&m.frequency), 12 * HOUR_MS);
        // No sequence: all carried, the order said to be unstated, and the
        // count a bound.
        let s = with_dosages(json!([
            dosage(None, "40 mg", daily("MORN")),
            dosage(None, "20 mg", daily("EVE")),
        ]));
        let m = &s.medications[0];
        assert!(
            m.dose.starts_with(
                "40 mg once a day in the morning; 20 mg once a day in the evening (the document \
                 does not say"
            ),
            "{}",
            m.dose
        );
        assert_eq!(m.frequency, "up to twice a day in all");
        assert_eq!(dosing_interval_ms(&m.frequency), 12 * HOUR_MS);
    }

    /// A flag holds only when it holds for every dosage; when they differ,
    /// the words say which dose it is.
    #[test]
    fn a_flag_of_one_concurrent_dosage_is_carried_in_its_words() {
        let supervised = json!([{"coding": [{
            "system": super::SYS_LOCAL, "code": "supervised"
        }]}]);
        let s = with_dosages(json!([
            {"sequence": 1, "text": "40 mg", "additionalInstruction": supervised,
             "route": {"text": "oral"}, "timing": {"repeat": {"when": ["MORN"]}}},
            {"sequence": 1, "text": "20 mg", "asNeededBoolean": true,
             "route": {"text": "oral"}, "timing": {"repeat": {"when": ["EVE"]}}},
        ]));
        let m = &s.medications[0];
        assert_eq!(
            m.dose,
            "40 mg in the morning (supervised) and 20 mg in the evening (as needed)"
        );
        assert!(!m.supervised && !m.as_needed);
        assert_eq!(m.route, "oral");
        assert_eq!(m.frequency, "twice a day in all");
        // So does a route: each dose says its own when they differ.
        let s = with_dosages(json!([
            {"sequence": 1, "text": "8 mg", "route": {"text": "sublingual"}},
            {"sequence": 1, "text": "10 mg", "route": {"text": "oral"}},
        ]));
        let m = &s.medications[0];
        assert_eq!(m.dose, "8 mg (sublingual) and 10 mg (oral)");
        assert_eq!(m.route, "sublingual and oral");
    }

    /// A range is carried as one ("1 to 4 times a day", "every 4 to 6
    /// hours"), and its dosing interval is its shortest; a fraction of a day
    /// is said in hours.
    #[test]
    fn ranges_are_carried_in_words_and_due_at_their_shortest() {
        for (repeat, words, hours) in [
            (
                json!({"frequency": 1, "frequencyMax": 4, "period": 1, "periodUnit": "d"}),
                "1 to 4 times a day",
                6,
            ),
            (
                json!({"frequency": 1, "period": 4, "periodMax": 6, "periodUnit": "h"}),
                "once every 4 to 6 hours",
                4,
            ),
            (
                json!({"frequency": 1, "period": 0.5, "periodUnit": "d"}),
                "once every 12 hours",
                12,
            ),
            (
                json!({"frequency": 6, "period": 1, "periodUnit": "d"}),
                "6 times a day",
                4,
            ),
            (
                json!({"frequency": 2, "period": 1, "periodUnit": "d", "when": ["MORN", "EVE"]}),
                "twice a day in the morning and in the evening",
                12,
            ),
        ] {
            let s = with_dosages(json!([{"text": "10 mg", "timing": {"repeat": repeat}}]));
            let m = &s.medications[0];
            assert_eq!(m.frequency, words, "{repeat}");
            assert_eq!(
                dosing_interval_ms(&m.frequency),
                hours * HOUR_MS,
                "{repeat}"
            );
            assert!(s.not_read.is_empty(), "{repeat}: {:?}", s.not_read);
        }
        // A maximum not above its minimum is no range: listed, not carried.
        let s = with_dosages(json!([{"text": "10 mg", "timing": {"repeat":
            {"frequency": 2, "frequencyMax": 1, "period": 1, "periodUnit": "d"}}}]));
        assert_eq!(s.medications[0].frequency, "twice a day");
        assert!(
            s.not_read.iter().any(|n| n.ends_with(
                "timing.repeat.frequencyMax: not carried: not above frequency, so no range"
            )),
            "{:?}",
            s.not_read
        );
    }
}
