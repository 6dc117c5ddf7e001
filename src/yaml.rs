//! YAML read into a node tree that keeps the span, style and source text of every value.
