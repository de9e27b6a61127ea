//! crit's JSON back to a protobuf message (what crit's `dict2pb` accepts).
//!
//! Integers may be JSON numbers or strings: `"0x.."` and other Python `int(x, 0)` literals,
//! flag names joined by `|`, `"major:minor"` for device fields and dict names. A repeated `ipadd`
//! field may hold one address string. Keys the schema does not know are ignored, as crit does;
//! a required field that is missing is an error, as protobuf's serializer makes it in crit.

use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value};
use serde_json::Value as Json;

use super::text;
use crate::flags;
use crate::schema::{Annotation, Schema};

#[derive(Debug, thiserror::Error)]
pub enum FromJsonError {
    #[error("{message}: expected a JSON object")]
    NotAnObject { message: String },
    #[error("{message}: required field {field} is missing")]
    MissingRequired { message: String, field: String },
    #[error("{field}: expected a list")]
    NotAList { field: String },
    #[error("{field}: cannot read {value} as {expected}")]
    BadValue {
        field: String,
        value: String,
        expected: &'static str,
    },
    #[error("{field}: {value} is out of range")]
    OutOfRange { field: String, value: String },
}

/// Builds a message of type `descriptor` from its JSON object.
pub fn json_to_message(
    schema: &Schema,
    descriptor: &MessageDescriptor,
    json: &Json,
) -> Result<DynamicMessage, FromJsonError> {
    let Json::Object(object) = json else {
        return Err(FromJsonError::NotAnObject {
            message: descriptor.full_name().to_owned(),
        });
    };
    let mut message = DynamicMessage::new(descriptor.clone());
    for field in descriptor.fields() {
        let Some(value) = object
            .get(field.name())
            .or_else(|| legacy_name(&field).and_then(|name| object.get(name)))
        else {
            if field.is_required() {
                return Err(FromJsonError::MissingRequired {
                    message: descriptor.full_name().to_owned(),
                    field: field.name().to_owned(),
                });
            }
            continue;
        };
        let annotation = schema.annotation(&field);
        let converted = if field.is_list() {
            list_value(schema, &field, annotation, value)?
        } else {
            single_value(schema, &field, annotation, value)?
        };
        message.set_field(&field, converted);
    }
    Ok(message)
}

/// The key older crit JSON uses for a field that was renamed since: crit 3.x calls the old
/// u32 page count of pagemap entries `nr_pages`, the name the u64 count has now. Such JSON
/// sets both fields from that one key, as our writers do.
fn legacy_name(field: &FieldDescriptor) -> Option<&'static str> {
    (field.full_name() == "criu.pagemap_entry.compat_nr_pages").then_some("nr_pages")
}

fn list_value(
    schema: &Schema,
    field: &FieldDescriptor,
    annotation: Option<&Annotation>,
    json: &Json,
) -> Result<Value, FromJsonError> {
    let Json::Array(items) = json else {
        return Err(FromJsonError::NotAList {
            field: field.full_name().to_owned(),
        });
    };
    if let (Some(Json::String(address)), true) =
        (items.first(), annotation.is_some_and(|a| a.ipadd))
    {
        let words = text::parse_ip(address).ok_or_else(|| bad(field, json, "an IP address"))?;
        return Ok(Value::List(words.into_iter().map(Value::U32).collect()));
    }
    items
        .iter()
        .map(|item| single_value(schema, field, annotation, item))
        .collect::<Result<Vec<_>, _>>()
        .map(Value::List)
}

fn single_value(
    schema: &Schema,
    field: &FieldDescriptor,
    annotation: Option<&Annotation>,
    json: &Json,
) -> Result<Value, FromJsonError> {
    match field.kind() {
        Kind::Message(descriptor) => json_to_message(schema, &descriptor, json).map(Value::Message),
        Kind::Bytes => {
            let Json::String(s) = json else {
                return Err(bad(field, json, "encoded bytes"));
            };
            let bytes = match annotation.and_then(|a| a.conv.as_deref()) {
                Some("unix_name") => text::decode_quopri(s.as_bytes()),
                _ => text::decode_base64(s).ok_or_else(|| bad(field, json, "base64"))?,
            };
            Ok(Value::Bytes(bytes.into()))
        }
        Kind::Enum(descriptor) => {
            let value = match json {
                Json::String(name) => descriptor.get_value_by_name(name),
                Json::Number(n) => n
                    .as_i64()
                    .and_then(|n| i32::try_from(n).ok())
                    .and_then(|n| descriptor.get_value(n)),
                _ => None,
            };
            value
                .map(|v| Value::EnumNumber(v.number()))
                .ok_or_else(|| bad(field, json, "an enum value name"))
        }
        Kind::Bool => match json {
            Json::Bool(b) => Ok(Value::Bool(*b)),
            Json::Number(n) => Ok(Value::Bool(n.as_f64().is_some_and(|f| f != 0.0))),
            _ => Err(bad(field, json, "a boolean")),
        },
        Kind::String => match json {
            Json::String(s) => Ok(Value::String(s.clone())),
            _ => Err(bad(field, json, "a string")),
        },
        Kind::Float | Kind::Double => {
            let f = json.as_f64().ok_or_else(|| bad(field, json, "a number"))?;
            Ok(if matches!(field.kind(), Kind::Float) {
                // protobuf's float field holds an f32 by definition
                #[allow(clippy::cast_possible_truncation)]
                Value::F32(f as f32)
            } else {
                Value::F64(f)
            })
        }
        kind => {
            let int = integer(field, annotation, json)?;
            fit_integer(field, &kind, int, json)
        }
    }
}

fn integer(
    field: &FieldDescriptor,
    annotation: Option<&Annotation>,
    json: &Json,
) -> Result<i128, FromJsonError> {
    match json {
        Json::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .ok_or_else(|| bad(field, json, "an integer")),
        Json::Bool(b) => Ok(i128::from(*b)),
        Json::String(s) => {
            let parsed = match annotation {
                Some(a) if a.dev => flags::parse_dev(s, a.odev)
                    .map(i128::from)
                    .or_else(|| flags::parse_int_literal(s)),
                Some(Annotation {
                    flags: Some(name), ..
                }) if flags::flags_table(name).is_some() => {
                    flags::flags_table(name).and_then(|table| flags::parse_flags(s, table))
                }
                Some(Annotation {
                    dict: Some(dict), ..
                }) => flags::dict_value(dict, field.name(), s)
                    .map(i128::from)
                    .or_else(|| flags::parse_int_literal(s)),
                _ => flags::parse_int_literal(s),
            };
            parsed.ok_or_else(|| bad(field, json, "an integer"))
        }
        _ => Err(bad(field, json, "an integer")),
    }
}

fn fit_integer(
    field: &FieldDescriptor,
    kind: &Kind,
    value: i128,
    json: &Json,
) -> Result<Value, FromJsonError> {
    let out_of_range = || FromJsonError::OutOfRange {
        field: field.full_name().to_owned(),
        value: json.to_string(),
    };
    Ok(match kind {
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32(i32::try_from(value).map_err(|_| out_of_range())?)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64(i64::try_from(value).map_err(|_| out_of_range())?)
        }
        Kind::Uint32 | Kind::Fixed32 => {
            Value::U32(u32::try_from(value).map_err(|_| out_of_range())?)
        }
        Kind::Uint64 | Kind::Fixed64 => {
            Value::U64(u64::try_from(value).map_err(|_| out_of_range())?)
        }
        _ => return Err(bad(field, json, "an integer")),
    })
}

fn bad(field: &FieldDescriptor, json: &Json, expected: &'static str) -> FromJsonError {
    FromJsonError::BadValue {
        field: field.full_name().to_owned(),
        value: json.to_string(),
        expected,
    }
}
