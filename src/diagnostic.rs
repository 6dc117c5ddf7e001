//! Problems found in input files, collected (never stop at the first) and rendered as
//! `error: … --> file:line:col` with the source line, a caret and a hint.
