//! Write-side schemas: what a domain declares it writes, checked before the
//! public append lets anything into the log.
//!
//! A [`Catalog`] maps a category to its declared event types, each with a
//! JSON Schema compiled once. The public append (HTTP, `sluice publish`)
//! refuses, before anything reaches NATS:
//! - events on categories the platform owns ([`RESERVED_PREFIXES`]: saga
//!   commands, saga logs, voids), whoever declared what;
//! - unknown types on declared categories;
//! - data that breaks its type's schema, with the JSON pointer of every
//!   violation.
//!
//! Undeclared categories stay free-form. Internal writers (aggregates,
//! sagas, workers) append through [`EventStore`](crate::EventStore)
//! directly and are not checked here: their events are typed by
//! construction, and the store's hot path stays free of validation costs.
//!
//! Schemas may use one extension keyword, `"x-sluice-integer": true`: the
//! number must be written as an integer literal (`5`, not `5.0` or `5e0`).
//! JSON Schema's `"type": "integer"` accepts `5.0`, which a decoder reading a
//! 64-bit integer refuses; money in minor units wants the strict form.

use std::collections::BTreeMap;
use std::sync::Arc;

use jsonschema::{Keyword, ValidationError, Validator};
use serde::Serialize;
use serde_json::Value;

use crate::envelope::NewEvent;
use crate::error::Error;
use crate::ids::StreamId;

/// Category prefixes the platform appends to itself; the public append
/// refuses them (and NATS permissions deny them to non-platform users):
/// `cmd-` (saga commands, `events.cmd-<category>.<id>`), `saga-` (saga logs,
/// `events.saga-<name>.<id>`) and `sluice-` (the platform's own records,
/// such as voids on `events.sluice-void.<position>`).
pub const RESERVED_PREFIXES: &[&str] = &["cmd-", "saga-", "sluice-"];

/// The extension keyword for integers written without fraction or exponent.
const INTEGER_KEYWORD: &str = "x-sluice-integer";

/// One way an event's data breaks its schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// JSON Pointer (RFC 6901) into the data: `""` is the whole data,
    /// `/amount` its `amount` member.
    pub pointer: String,
    /// What is wrong there.
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.pointer.is_empty() {
            write!(f, "(data): {}", self.message)
        } else {
            write!(f, "{}: {}", self.pointer, self.message)
        }
    }
}

/// Declared categories and their event types with compiled schemas, plus
/// the reserved categories. Cheap to clone (schemas are shared).
#[derive(Clone, Default)]
pub struct Catalog {
    categories: BTreeMap<String, BTreeMap<String, Arc<Validator>>>,
    reserved: Vec<String>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let types: BTreeMap<&str, Vec<&str>> = self
            .categories
            .iter()
            .map(|(c, t)| (c.as_str(), t.keys().map(String::as_str).collect()))
            .collect();
        f.debug_struct("Catalog")
            .field("categories", &types)
            .field("reserved", &self.reserved)
            .finish()
    }
}

impl Catalog {
    /// An empty catalog: nothing declared, nothing reserved.
    pub fn new() -> Self {
        Self::default()
    }

    /// The platform's catalog: nothing declared, [`RESERVED_PREFIXES`]
    /// reserved. Domains add their declarations to it.
    pub fn platform() -> Self {
        let mut c = Self::new();
        for p in RESERVED_PREFIXES {
            c = c.reserve_prefix(p);
        }
        c
    }

    /// Reserves every category starting with `prefix` for internal writers.
    pub fn reserve_prefix(mut self, prefix: &str) -> Self {
        if !self.reserved.iter().any(|r| r == prefix) {
            self.reserved.push(prefix.to_owned());
        }
        self
    }

    /// Declares `event_type` on `category` with the JSON Schema `schema`
    /// (JSON text, e.g. from `include_str!`), compiled now. Declaring a
    /// category makes it closed: only declared types are accepted on it.
    pub fn declare(
        mut self,
        category: &str,
        event_type: &str,
        schema: &str,
    ) -> Result<Self, Error> {
        crate::ids::validate_token("category", category)?;
        let invalid = |reason: String| Error::InvalidSchema {
            event_type: event_type.to_owned(),
            reason,
        };
        let schema: Value =
            serde_json::from_str(schema).map_err(|e| invalid(format!("not JSON: {e}")))?;
        let validator = jsonschema::options()
            .with_keyword(INTEGER_KEYWORD, |_, _, _| Ok(Box::new(IntegerLiteral)))
            .build(&schema)
            .map_err(|e| invalid(e.to_string()))?;
        let types = self.categories.entry(category.to_owned()).or_default();
        if types
            .insert(event_type.to_owned(), Arc::new(validator))
            .is_some()
        {
            return Err(invalid(format!("declared twice on category {category}")));
        }
        Ok(self)
    }

    /// Adds another catalog's declarations and reservations (e.g. a
    /// module's to the platform's). A type declared by both is an error.
    pub fn merge(mut self, other: Catalog) -> Result<Self, Error> {
        for (category, types) in other.categories {
            let mine = self.categories.entry(category.clone()).or_default();
            for (t, v) in types {
                if mine.insert(t.clone(), v).is_some() {
                    return Err(Error::InvalidSchema {
                        event_type: t,
                        reason: format!("declared twice on category {category}"),
                    });
                }
            }
        }
        for p in other.reserved {
            self = self.reserve_prefix(&p);
        }
        Ok(self)
    }

    /// The declared categories with their event types, in name order.
    pub fn declared(&self) -> Vec<(&str, Vec<&str>)> {
        self.categories
            .iter()
            .map(|(c, t)| (c.as_str(), t.keys().map(String::as_str).collect()))
            .collect()
    }

    /// The reserved prefix `category` falls under, if any.
    pub fn reserved_prefix(&self, category: &str) -> Option<&str> {
        self.reserved
            .iter()
            .find(|p| category.starts_with(p.as_str()))
            .map(String::as_str)
    }

    /// Checks one event for the public append on `stream`: reserved
    /// category, unknown type, schema. `index` is its place in the append
    /// (reported in the error).
    pub fn check(&self, stream: &StreamId, index: usize, event: &NewEvent) -> Result<(), Error> {
        let category = stream.category();
        if let Some(prefix) = self.reserved_prefix(category) {
            return Err(Error::ReservedCategory {
                category: category.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        let Some(types) = self.categories.get(category) else {
            return Ok(());
        };
        let Some(validator) = types.get(&event.event_type) else {
            return Err(Error::UnknownEventType {
                category: category.to_owned(),
                event_type: event.event_type.chars().take(140).collect(),
                known: types.keys().cloned().collect(),
            });
        };
        let data: Value =
            serde_json::from_slice(&event.data).map_err(|e| Error::InvalidJson(e.to_string()))?;
        let violations: Vec<Violation> = validator
            .iter_errors(&data)
            .map(|e| Violation {
                pointer: e.instance_path().as_str().to_owned(),
                message: e.to_string(),
            })
            .collect();
        if violations.is_empty() {
            Ok(())
        } else {
            Err(Error::SchemaViolation {
                stream: stream.to_string(),
                event_type: event.event_type.clone(),
                index,
                violations,
            })
        }
    }

    /// Checks every event of an append (the first refusal wins).
    pub fn check_all(&self, stream: &StreamId, events: &[NewEvent]) -> Result<(), Error> {
        events
            .iter()
            .enumerate()
            .try_for_each(|(i, e)| self.check(stream, i, e))
    }
}

/// `"x-sluice-integer": true`: a number written without fraction or
/// exponent, so it reads back as a 64-bit integer.
struct IntegerLiteral;

impl<'i> Keyword<'i> for IntegerLiteral {
    fn validate(&self, instance: &'i Value) -> Result<(), ValidationError<'i>> {
        if self.is_valid(instance) {
            Ok(())
        } else {
            Err(ValidationError::custom(format!(
                "{instance} is not an integer literal within 64 bits (write 5, not 5.0 or 5e0)"
            )))
        }
    }

    fn is_valid(&self, instance: &'i Value) -> bool {
        match instance {
            Value::Number(n) => n.is_i64() || n.is_u64(),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AMOUNT: &str = r#"{"type":"object","required":["amount"],"additionalProperties":false,
        "properties":{"amount":{"type":"integer","minimum":1,"x-sluice-integer":true}}}"#;

    fn catalog() -> Catalog {
        Catalog::platform()
            .declare("account", "t.deposited.v1", AMOUNT)
            .unwrap()
    }

    fn check(category: &str, t: &str, data: &str) -> Result<(), Error> {
        let stream = StreamId::new(category, "a-1").unwrap();
        catalog().check(&stream, 0, &NewEvent::new(t, data.as_bytes().to_vec()))
    }

    #[test]
    fn valid_data_passes_and_violations_carry_pointers() {
        check("account", "t.deposited.v1", r#"{"amount":5}"#).unwrap();
        for (data, pointer, want) in [
            (r#"{"amount":-5}"#, "/amount", "minimum"),
            (r#"{"amount":5.0}"#, "/amount", "integer literal"),
            (r#"{"amount":"5"}"#, "/amount", "not of type"),
            (r#"{}"#, "", "required"),
            (r#"{"amount":5,"x":1}"#, "", "x"),
        ] {
            match check("account", "t.deposited.v1", data) {
                Err(Error::SchemaViolation { violations, .. }) => {
                    assert_eq!(violations[0].pointer, pointer, "{data}: {violations:?}");
                    assert!(
                        violations[0].message.contains(want),
                        "{data}: {violations:?}"
                    );
                }
                other => panic!("{data}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_types_reserved_and_free_categories() {
        let err = check("account", "x.v1", "{}").unwrap_err();
        assert!(
            matches!(&err, Error::UnknownEventType { known, .. } if known == &["t.deposited.v1"]),
            "{err:?}"
        );
        for category in ["cmd-account", "saga-transfer", "sluice-void"] {
            let err = check(category, "x.v1", "{}").unwrap_err();
            assert!(matches!(err, Error::ReservedCategory { .. }), "{err:?}");
            assert!(err.is_invalid_input());
        }
        // Undeclared categories stay free-form.
        check("thing", "anything.v1", r#"[1,2]"#).unwrap();
    }

    #[test]
    fn bad_schemas_and_double_declarations_are_refused() {
        let e = Catalog::new().declare("a", "t.v1", "{nope").unwrap_err();
        assert!(matches!(e, Error::InvalidSchema { .. }), "{e:?}");
        let e = Catalog::new()
            .declare("a", "t.v1", r#"{"type": 7}"#)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidSchema { .. }), "{e:?}");
        let e = catalog().merge(catalog()).unwrap_err();
        assert!(e.to_string().contains("declared twice"), "{e}");
    }
}
