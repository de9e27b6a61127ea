//! The image messages as a reflection pool, with each field's printing annotations.
//!
//! Fields carry CRIU's option extension (number 1018 on `google.protobuf.FieldOptions`): `hex`,
//! `ipadd`, `flags`, `dev`, `odev`, `dict` and `conv`. They are read once per field here, so that
//! decoding a large pagemap does not decode options for every entry.

use std::collections::HashMap;

use prost_reflect::{DescriptorPool, FieldDescriptor, MessageDescriptor, Value};

/// The extension number CRIU uses for its field options.
const OPTIONS_EXTENSION: u32 = 1018;

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("loading the image message descriptors")]
    Descriptors(#[source] prost_reflect::DescriptorError),
    #[error("no message {name} in the image schema")]
    UnknownMessage { name: String },
}

/// How a field is printed, from its annotation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Annotation {
    pub hex: bool,
    pub ipadd: bool,
    pub flags: Option<String>,
    pub dev: bool,
    pub odev: bool,
    pub dict: Option<String>,
    pub conv: Option<String>,
}

/// Message descriptors plus the annotations of every field, keyed by the field's full name.
pub struct Schema {
    pool: DescriptorPool,
    annotations: HashMap<String, Annotation>,
}

impl Schema {
    /// The schema of the image format this program was built with.
    pub fn images() -> Result<Self, SchemaError> {
        let pool = DescriptorPool::decode(images_format::DESCRIPTOR_SET)
            .map_err(SchemaError::Descriptors)?;
        Ok(Self::new(pool))
    }

    pub fn new(pool: DescriptorPool) -> Self {
        let extension = pool.all_extensions().find(|e| {
            e.number() == OPTIONS_EXTENSION
                && e.containing_message().full_name() == "google.protobuf.FieldOptions"
        });
        let mut annotations = HashMap::new();
        if let Some(extension) = extension {
            for message in pool.all_messages() {
                for field in message.fields() {
                    let options = field.options();
                    if !options.has_extension(&extension) {
                        continue;
                    }
                    let value = options.get_extension(&extension);
                    if let Some(opts) = value.as_message() {
                        annotations.insert(field.full_name().to_owned(), annotation_of(opts));
                    }
                }
            }
        }
        Self { pool, annotations }
    }

    pub fn message(&self, name: &str) -> Result<MessageDescriptor, SchemaError> {
        let full = if name.contains('.') {
            name.to_owned()
        } else {
            format!("criu.{name}")
        };
        self.pool
            .get_message_by_name(&full)
            .ok_or(SchemaError::UnknownMessage { name: full })
    }

    pub fn annotation(&self, field: &FieldDescriptor) -> Option<&Annotation> {
        self.annotations.get(field.full_name())
    }
}

fn annotation_of(opts: &prost_reflect::DynamicMessage) -> Annotation {
    let flag = |name: &str| {
        opts.get_field_by_name(name)
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
            && opts.has_field_by_name(name)
    };
    let text = |name: &str| {
        if !opts.has_field_by_name(name) {
            return None;
        }
        opts.get_field_by_name(name).and_then(|v| match v.as_ref() {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            _ => None,
        })
    };
    Annotation {
        hex: flag("hex"),
        ipadd: flag("ipadd"),
        flags: text("flags"),
        dev: flag("dev"),
        odev: flag("odev"),
        dict: text("dict"),
        conv: text("conv"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotation(schema: &Schema, message: &str, field: &str) -> Annotation {
        let descriptor = schema.message(message).expect("message");
        let field = descriptor.get_field_by_name(field).expect("field");
        schema.annotation(&field).cloned().unwrap_or_default()
    }

    #[test]
    fn image_schema_carries_the_printing_annotations() {
        let schema = Schema::images().expect("schema");
        assert!(annotation(&schema, "vma_entry", "start").hex);
        assert_eq!(
            annotation(&schema, "vma_entry", "prot").flags.as_deref(),
            Some("mmap.prot")
        );
        assert!(annotation(&schema, "inet_sk_entry", "src_addr").ipadd);
        assert_eq!(
            annotation(&schema, "task_core_entry", "task_state")
                .dict
                .as_deref(),
            Some("gen")
        );
        assert_eq!(
            annotation(&schema, "unix_sk_entry", "name").conv.as_deref(),
            Some("unix_name")
        );
        let rdev = annotation(&schema, "reg_file_entry", "mode");
        assert_eq!(rdev, Annotation::default());
    }
}
