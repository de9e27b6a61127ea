//! Protobuf message to crit's JSON (what crit's `pb2dict` produces).
//!
//! Fields appear in field-number order and only when set (repeated ones when non-empty). Enums
//! print by name. With `pretty`, integer fields annotated `hex` print as `"0x.."` and pass that
//! on to every field of their sub-messages, `dev` fields as `"major:minor"`, `flags` fields as
//! names joined by `" | "`, `dict` fields by name, and repeated `ipadd` fields as one address.

use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, ReflectMessage, Value};
use serde_json::{Map, Value as Json};

use super::text;
use crate::flags;
use crate::schema::{Annotation, Schema};

#[derive(Debug, thiserror::Error)]
pub enum ToJsonError {
    #[error("{field}: value of an unexpected kind")]
    UnexpectedValue { field: String },
}

/// Converts one message to a JSON object as crit prints it.
pub fn message_to_json(
    schema: &Schema,
    message: &DynamicMessage,
    pretty: bool,
) -> Result<Map<String, Json>, ToJsonError> {
    Converter { schema, pretty }.message(message, false)
}

struct Converter<'a> {
    schema: &'a Schema,
    pretty: bool,
}

impl Converter<'_> {
    fn message(
        &self,
        message: &DynamicMessage,
        hex: bool,
    ) -> Result<Map<String, Json>, ToJsonError> {
        let mut fields: Vec<FieldDescriptor> = message.descriptor().fields().collect();
        fields.sort_by_key(FieldDescriptor::number);
        let mut out = Map::new();
        for field in fields {
            // a missing required field is printed as absent: crit's parser accepts it too
            if !message.has_field(&field) {
                continue;
            }
            let value = message.get_field(&field);
            let annotation = self.schema.annotation(&field);
            let json = match value.as_ref() {
                Value::List(items) => self.list(&field, annotation, items, hex)?,
                single => self.single(&field, annotation, single, hex)?,
            };
            out.insert(field.name().to_owned(), json);
        }
        Ok(out)
    }

    fn list(
        &self,
        field: &FieldDescriptor,
        annotation: Option<&Annotation>,
        items: &[Value],
        hex: bool,
    ) -> Result<Json, ToJsonError> {
        if self.pretty && annotation.is_some_and(|a| a.ipadd) {
            let words: Option<Vec<u32>> = items.iter().map(Value::as_u32).collect();
            if let Some(address) = words.as_deref().and_then(text::format_ip) {
                return Ok(Json::Array(vec![Json::String(address)]));
            }
        }
        items
            .iter()
            .map(|item| self.single(field, annotation, item, hex))
            .collect::<Result<Vec<_>, _>>()
            .map(Json::Array)
    }

    fn single(
        &self,
        field: &FieldDescriptor,
        annotation: Option<&Annotation>,
        value: &Value,
        inherited_hex: bool,
    ) -> Result<Json, ToJsonError> {
        let hex = inherited_hex || annotation.is_some_and(|a| a.hex);
        let int = match value {
            Value::Message(m) => return self.message(m, hex).map(Json::Object),
            Value::Bytes(b) => {
                let conv = annotation.and_then(|a| a.conv.as_deref());
                return Ok(Json::String(match conv {
                    Some("unix_name") => text::encode_quopri(b),
                    _ => text::encode_base64(b),
                }));
            }
            Value::EnumNumber(n) => {
                let name = match field.kind() {
                    Kind::Enum(e) => e.get_value(*n).map(|v| v.name().to_owned()),
                    _ => None,
                };
                return Ok(name.map_or_else(|| Json::from(*n), Json::String));
            }
            Value::Bool(b) => return Ok(Json::Bool(*b)),
            Value::String(s) => return Ok(Json::String(s.clone())),
            Value::F32(f) => return Ok(Json::from(f64::from(*f))),
            Value::F64(f) => return Ok(Json::from(*f)),
            Value::I32(v) => (i128::from(*v), Json::from(*v)),
            Value::I64(v) => (i128::from(*v), Json::from(*v)),
            Value::U32(v) => (i128::from(*v), Json::from(*v)),
            Value::U64(v) => (i128::from(*v), Json::from(*v)),
            Value::List(_) | Value::Map(_) => {
                return Err(ToJsonError::UnexpectedValue {
                    field: field.full_name().to_owned(),
                })
            }
        };
        let (int, plain) = int;
        if self.pretty {
            if let Some(text) = self.pretty_int(field, annotation, int, hex) {
                return Ok(Json::String(text));
            }
        }
        Ok(plain)
    }

    fn pretty_int(
        &self,
        field: &FieldDescriptor,
        annotation: Option<&Annotation>,
        value: i128,
        hex: bool,
    ) -> Option<String> {
        if hex {
            return Some(flags::python_hex(value));
        }
        let annotation = annotation?;
        if annotation.dev {
            // crit shifts Python's unbounded ints; a negative dev_t cannot come from the kernel
            return u64::try_from(value)
                .ok()
                .map(|v| flags::format_dev(v, annotation.odev));
        }
        if let Some(name) = &annotation.flags {
            return Some(match flags::flags_table(name) {
                Some(table) => flags::format_flags(value, table),
                None => flags::python_hex(value),
            });
        }
        if let Some(dict) = &annotation.dict {
            return flags::dict_name(dict, field.name(), value).map(str::to_owned);
        }
        None
    }
}
