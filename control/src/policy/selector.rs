//! Kubernetes label selectors (`metav1.LabelSelector`), validated once and then evaluated.
//!
//! Semantics as apimachinery's `LabelSelectorAsSelector`: every `matchLabels` pair and every
//! `matchExpressions` requirement must hold (AND); `In` / `NotIn` need at least one value,
//! `Exists` / `DoesNotExist` take none; `NotIn` also matches objects without the key. An empty
//! selector (`{}`) matches everything. Whether an *absent* selector means "everything" or
//! "nothing" depends on the field, so callers decide that before building a [`Selector`].

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Labels of an object (pod, namespace or node).
pub type Labels = BTreeMap<String, String>;

/// Why a selector is not valid; the field path is relative to the selector
/// (e.g. `matchExpressions[1].operator`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SelectorError {
    /// Path inside the selector.
    pub field: String,
    /// What is wrong and what to write instead.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A validated label selector.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector that matches every object (`{}`).
    pub fn everything() -> Self {
        Self::default()
    }

    /// Validates `selector`.
    pub fn new(selector: &LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            if key.is_empty() {
                return Err(SelectorError {
                    field: "matchLabels".into(),
                    reason: "empty label key; write key: value".into(),
                });
            }
            requirements.push(Requirement::In(key.clone(), vec![value.clone()]));
        }
        for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let field = |f: &str| format!("matchExpressions[{i}].{f}");
            if expr.key.is_empty() {
                return Err(SelectorError {
                    field: field("key"),
                    reason: "empty label key".into(),
                });
            }
            let values = expr.values.clone().unwrap_or_default();
            let key = expr.key.clone();
            let requirement = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(SelectorError {
                        field: field("values"),
                        reason: format!(
                            "operator {} needs at least one value",
                            expr.operator.as_str()
                        ),
                    })
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(SelectorError {
                        field: field("values"),
                        reason: format!(
                            "operator {} takes no values; remove values",
                            expr.operator.as_str()
                        ),
                    })
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    return Err(SelectorError {
                        field: field("operator"),
                        reason: format!(
                            "unknown operator {other:?}; use In, NotIn, Exists or DoesNotExist \
                             (case matters)"
                        ),
                    })
                }
            };
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    /// Validates an optional selector where absence means "everything" (`spec.podSelector`,
    /// `spec.nodeSelector`).
    pub fn new_or_everything(selector: Option<&LabelSelector>) -> Result<Self, SelectorError> {
        selector.map_or_else(|| Ok(Self::everything()), Self::new)
    }

    /// Whether an object with `labels` is selected.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::In(k, values) => labels.get(k).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(k, values) => labels.get(k).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    /// Whether this is the empty selector (matches everything).
    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }
}
