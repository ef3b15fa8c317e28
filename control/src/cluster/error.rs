//! Errors of the cluster-state reader: each names the file, the document, the object and the
//! field, and says what to change.

use std::fmt;
use std::path::PathBuf;

/// Where an object sits in a cluster file: `cluster.yaml: document 3 items[1] (Pod default/web)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file path (or another name for the text, e.g. `<stdin>`).
    pub origin: String,
    /// 1-based index of the YAML document in the stream (`---` separated).
    pub document: usize,
    /// 0-based index in `items` when the object came from a `kind: List` document.
    pub item: Option<usize>,
    /// `Kind namespace/name` (or `Kind name` for cluster-scoped kinds) once known.
    pub object: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.origin, self.document)?;
        if let Some(item) = self.item {
            write!(f, " items[{item}]")?;
        }
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        Ok(())
    }
}

/// Everything that can go wrong reading cluster state from a file or string.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The cluster file could not be read (missing, permissions, not UTF-8).
    #[error("cannot read cluster file {}: {reason}; check the path given to --source file:PATH", path.display())]
    Read {
        /// The file that could not be read.
        path: PathBuf,
        /// What the OS (or the UTF-8 check) said.
        reason: String,
        /// The I/O error, when there was one.
        #[source]
        source: Option<std::io::Error>,
    },

    /// The text is not valid YAML.
    #[error("{origin}: document {document}: invalid YAML: {reason}")]
    Yaml {
        /// The file path (or other name of the text).
        origin: String,
        /// 1-based document index in the stream.
        document: usize,
        /// 1-based line in the whole text (0 when the YAML parser gave no position).
        line: usize,
        /// 1-based column (0 when the YAML parser gave no position).
        column: usize,
        /// The YAML parser's message, with the line and column.
        reason: String,
    },

    /// A document parsed as YAML but does not decode into its Kubernetes type.
    #[error("{at}: {}", field_reason(field, reason))]
    Decode {
        /// Where the object is.
        at: Box<Location>,
        /// Field path inside the object, e.g. `spec.containers[0].ports[0].containerPort`.
        field: String,
        /// What the decoder said, e.g. `invalid type: string "x", expected i32`.
        reason: String,
    },

    /// An object decoded but breaks a rule sluice relies on.
    #[error("{at}: {}", field_reason(field, reason))]
    Invalid {
        /// Where the object is.
        at: Box<Location>,
        /// Field path inside the object.
        field: String,
        /// What is wrong and what to do.
        reason: String,
    },

    /// The same (kind, namespace, name) appears twice.
    #[error("{at}: duplicate object, already defined in document {first_document}; remove or rename one of them")]
    Duplicate {
        /// Where the second definition is.
        at: Box<Location>,
        /// 1-based document index of the first definition.
        first_document: usize,
    },

    /// `node_info` was asked for a node that is not in the state.
    #[error(
        "Node {node} is not in the cluster state; check the node name against the Node objects"
    )]
    NodeNotFound {
        /// The node name asked for.
        node: String,
    },

    /// The node exists but cannot be used to address pods.
    #[error("Node {node}: {reason}")]
    NodeUnusable {
        /// The node name.
        node: String,
        /// What is missing and what to set.
        reason: String,
    },
}

/// `field: reason`, or only the reason for the object as a whole (empty field or serde's `.`).
fn field_reason(field: &str, reason: &str) -> String {
    if field.is_empty() || field == "." {
        reason.to_owned()
    } else {
        format!("{field}: {reason}")
    }
}

impl ClusterError {
    pub(crate) fn invalid(
        at: &Location,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        ClusterError::Invalid {
            at: Box::new(at.clone()),
            field: field.into(),
            reason: reason.into(),
        }
    }
}
