//! Hand-written schema pieces that the derive cannot express, kept structural so the CRDs
//! install on Kubernetes 1.20 (no CEL rules anywhere).

use schemars::{Schema, SchemaGenerator, json_schema};

/// `metav1.Condition` list, keyed by `type` so server-side apply merges one condition at a
/// time and two writers can each own their own conditions.
pub(crate) fn conditions(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Conditions of the object, one per type.",
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status", "lastTransitionTime", "reason", "message"],
            "properties": {
                "type": {
                    "description": "Type of the condition, e.g. Ready.",
                    "type": "string",
                    "maxLength": 316
                },
                "status": {
                    "description": "True, False or Unknown.",
                    "type": "string",
                    "enum": ["True", "False", "Unknown"]
                },
                "observedGeneration": {
                    "description": "The metadata.generation the condition was set for.",
                    "type": "integer",
                    "format": "int64",
                    "minimum": 0
                },
                "lastTransitionTime": {
                    "description": "When the status last changed.",
                    "type": "string",
                    "format": "date-time"
                },
                "reason": {
                    "description": "A CamelCase reason for the last transition.",
                    "type": "string",
                    "maxLength": 1024
                },
                "message": {
                    "description": "What happened, in words.",
                    "type": "string",
                    "maxLength": 32768
                }
            }
        }
    })
}

/// A JSON object whose content the API server keeps as it is.
pub(crate) fn free_form_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Free-form JSON object from the caller.",
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// A map of resource name to quantity (`cpu: 500m`, `memory: 1Gi`), without the long upstream
/// Quantity essay in every place it is used.
pub(crate) fn resource_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "additionalProperties": {
            "description": "A quantity, e.g. 500m, 2, 768Mi or 1Gi.",
            "x-kubernetes-int-or-string": true,
            "anyOf": [{"type": "integer"}, {"type": "string"}]
        }
    })
}

/// A single quantity, e.g. `10Gi`.
pub(crate) fn quantity(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "A quantity, e.g. 10Gi.",
        "x-kubernetes-int-or-string": true,
        "anyOf": [{"type": "integer"}, {"type": "string"}]
    })
}

/// Joins the hard-wrapped lines of Rust doc comments in every `description`, keeping blank
/// lines as paragraph breaks, so `kubectl explain` can wrap the text itself.
pub(crate) fn unwrap_descriptions(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    serde_json::Value::String(s) if key == "description" => {
                        *s = unwrap_lines(s);
                    }
                    _ => unwrap_descriptions(v),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(unwrap_descriptions),
        _ => {}
    }
}

fn unwrap_lines(text: &str) -> String {
    text.split("\n\n")
        .map(|paragraph| {
            paragraph
                .split('\n')
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_breaks_are_joined_and_paragraphs_kept() {
        assert_eq!(unwrap_lines("one\ntwo\n\nthree"), "one two\n\nthree");
    }
}
