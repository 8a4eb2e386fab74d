//! AuthZEN's JSON, read field by field so that every malformed request is a 400 naming
//! the field (missing, or of the wrong type), and every field we do not know is ignored.
//!
//! An entity is `{"type", "id", "properties"}`, an action `{"name", "properties"}`. In a
//! batch, an item's entity replaces the top-level one whole, except that a `type` or
//! `id` the item leaves out falls back to the top-level one (the certification
//! scenario's entity-level replacement).

use serde_json::{Map, Value};

/// A request the caller must fix: 400, with this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bad(pub String);

impl Bad {
    fn at(field: &str, what: &str) -> Self {
        Bad(format!("{field}: {what}"))
    }
}

/// A JSON object.
pub type Object = Map<String, Value>;

/// The request body as a JSON object.
pub fn body(bytes: &[u8]) -> Result<Object, Bad> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Bad("the request body is empty: send a JSON object".into()));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(Bad("the request body must be a JSON object".into())),
        Err(err) => Err(Bad(format!("the request body is not valid JSON: {err}"))),
    }
}

/// A subject or resource.
#[derive(Debug, Clone, Copy)]
pub struct Entity<'a> {
    /// Its `type`.
    pub kind: &'a str,
    /// Its `id`, when given.
    pub id: Option<&'a str>,
    /// Its `properties`, when given.
    pub properties: Option<&'a Object>,
}

impl<'a> Entity<'a> {
    /// Its id, which this request needs.
    pub fn required_id(&self, field: &str) -> Result<&'a str, Bad> {
        self.id.ok_or_else(|| Bad::at(&format!("{field}.id"), "missing"))
    }

    /// The string property `name`, when given (another type is a 400).
    pub fn property(&self, field: &str, name: &str) -> Result<Option<&'a str>, Bad> {
        optional_string(self.properties, &format!("{field}.properties.{name}"), name)
    }
}

/// `object[name]` as an object, when present.
pub fn optional_object<'a>(object: &'a Object, name: &str) -> Result<Option<&'a Object>, Bad> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(inner)) => Ok(Some(inner)),
        Some(_) => Err(Bad::at(name, "must be a JSON object")),
    }
}

/// `object[name]` as a string, when present; `field` names it in an error.
pub fn optional_string<'a>(
    object: Option<&'a Object>,
    field: &str,
    name: &str,
) -> Result<Option<&'a str>, Bad> {
    match object.and_then(|object| object.get(name)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(Bad::at(field, "must be a string")),
    }
}

fn string<'a>(object: &'a Object, field: &str, name: &str) -> Result<Option<&'a str>, Bad> {
    match optional_string(Some(object), &format!("{field}.{name}"), name)? {
        Some("") => Err(Bad::at(&format!("{field}.{name}"), "must not be empty")),
        other => Ok(other),
    }
}

/// The entity `field` (`subject` or `resource`) of `item`, falling back to `default`
/// (the top level of a batch) when the item has none, and for a `type` or `id` it
/// leaves out.
pub fn entity<'a>(
    item: &'a Object,
    default: Option<&'a Object>,
    field: &str,
) -> Result<Entity<'a>, Bad> {
    let own = match item.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::Object(object)) => Some(object),
        Some(_) => return Err(Bad::at(field, "must be a JSON object")),
    };
    let fallback = match default.and_then(|default| default.get(field)) {
        Some(Value::Object(object)) => Some(object),
        _ => None,
    };
    let Some(object) = own.or(fallback) else { return Err(Bad::at(field, "missing")) };
    let pick = |name| -> Result<Option<&'a str>, Bad> {
        match string(object, field, name)? {
            Some(value) => Ok(Some(value)),
            None => fallback.map_or(Ok(None), |fallback| string(fallback, field, name)),
        }
    };
    let kind = pick("type")?.ok_or_else(|| Bad::at(&format!("{field}.type"), "missing"))?;
    let properties = match object.get("properties") {
        None | Some(Value::Null) => None,
        Some(Value::Object(properties)) => Some(properties),
        Some(_) => return Err(Bad::at(&format!("{field}.properties"), "must be a JSON object")),
    };
    Ok(Entity { kind, id: pick("id")?, properties })
}

/// The action's `name` in `item`, falling back to `default`'s action.
pub fn action<'a>(item: &'a Object, default: Option<&'a Object>) -> Result<&'a str, Bad> {
    let object = match item.get("action") {
        None | Some(Value::Null) => match default.and_then(|default| default.get("action")) {
            Some(Value::Object(object)) => object,
            _ => return Err(Bad::at("action", "missing")),
        },
        Some(Value::Object(object)) => object,
        Some(_) => return Err(Bad::at("action", "must be a JSON object")),
    };
    string(object, "action", "name")?.ok_or_else(|| Bad::at("action.name", "missing"))
}

/// The `context` of `item`, else `default`'s (replaced whole, never merged).
pub fn context<'a>(
    item: &'a Object,
    default: Option<&'a Object>,
) -> Result<Option<&'a Object>, Bad> {
    match optional_object(item, "context")? {
        Some(context) => Ok(Some(context)),
        None => default.map_or(Ok(None), |default| optional_object(default, "context")),
    }
}

/// Whether a `content-type` value is JSON (`application/json`, any parameters).
pub fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|value| {
        value
            .split(';')
            .next()
            .is_some_and(|kind| kind.trim().eq_ignore_ascii_case("application/json"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(text: &str) -> Object {
        body(text.as_bytes()).expect("an object")
    }

    #[test]
    fn every_malformed_entity_names_its_field() {
        let cases = [
            (r#"{}"#, "subject: missing"),
            (r#"{"subject": "alice"}"#, "subject: must be a JSON object"),
            (r#"{"subject": {"id": "alice"}}"#, "subject.type: missing"),
            (r#"{"subject": {"type": 7, "id": "alice"}}"#, "subject.type: must be a string"),
            (r#"{"subject": {"type": "", "id": "alice"}}"#, "subject.type: must not be empty"),
            (
                r#"{"subject": {"type": "user", "properties": 3}}"#,
                "subject.properties: must be a JSON object",
            ),
        ];
        for (text, want) in cases {
            let got = entity(&object(text), None, "subject").map(|_| ()).unwrap_err();
            assert_eq!(got.0, want, "{text}");
        }
        let no_id = object(r#"{"subject": {"type": "user"}}"#);
        let subject = entity(&no_id, None, "subject").expect("type alone parses");
        assert_eq!(subject.required_id("subject").unwrap_err().0, "subject.id: missing");
        assert_eq!(
            action(&object(r#"{"action": {}}"#), None).unwrap_err().0,
            "action.name: missing"
        );
        assert_eq!(
            action(&object(r#"{"action": {"name": 123}}"#), None).unwrap_err().0,
            "action.name: must be a string"
        );
    }

    #[test]
    fn an_item_replaces_the_default_entity_but_borrows_its_missing_type_and_id() {
        let default = object(r#"{"resource": {"type": "record", "properties": {"a": "b"}}}"#);
        let item = object(r#"{"resource": {"id": "record-1"}}"#);
        let merged = entity(&item, Some(&default), "resource").expect("merged");
        assert_eq!((merged.kind, merged.id), ("record", Some("record-1")));
        assert!(merged.properties.is_none(), "properties are replaced whole, not merged");
        let bare = object(r#"{}"#);
        let inherited = entity(&bare, Some(&default), "resource").expect("inherited");
        assert!(inherited.properties.is_some());
    }

    #[test]
    fn bodies_and_content_types() {
        assert!(body(b"").is_err());
        assert!(body(b"  ").is_err());
        assert!(body(b"{").is_err());
        assert!(body(b"[]").is_err());
        assert!(is_json(Some("application/json")));
        assert!(is_json(Some("Application/JSON; charset=utf-8")));
        assert!(!is_json(Some("text/plain")));
        assert!(!is_json(None));
    }
}
