//! The sluice CNI plugin (being written).
