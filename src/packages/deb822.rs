//! apt's file format (deb822: `Field: value` lines in paragraphs separated by blank lines,
//! continuation lines indented) read as a stream, every field with the line and column it is
//! at: `.sources` files are small but their mistakes are reported at `path:line:col`, and a
//! `Packages` index is up to ~100 MB and is read one paragraph at a time (a bad one is
//! reported at its line).
//!
//! Not the `deb822-fast` crate: it drops positions (its errors say "Unexpected token" with no
//! line), which our errors need; the format takes eighty lines.

use std::io::BufRead;

/// One `Name: value` field; a multi-line value keeps its lines joined with `\n`, each
/// continuation line's leading blanks dropped and a lone `.` read as an empty line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub value: String,
    /// 1-based line of the field's name.
    pub line: usize,
    /// 1-based column (in characters) where the value starts on that line.
    pub value_col: usize,
}

/// A paragraph: its fields in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Paragraph {
    pub fields: Vec<Field>,
    /// 1-based line of its first field.
    pub line: usize,
}

impl Paragraph {
    /// The field `name` (names compare without case, as apt does).
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name))
    }

    /// The value of `name`, trimmed.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.field(name).map(|f| f.value.trim())
    }
}

/// Text that is not deb822, where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {col}: {message}")]
pub struct SyntaxError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// The paragraphs of a reader, one at a time. Comment lines (`#` in the first column) are
/// skipped, as apt does in `.sources` files. Bytes that are not UTF-8 (an old description in
/// Latin-1) are read as U+FFFD rather than refused: no field we read can hold them.
pub struct Paragraphs<R> {
    reader: R,
    line: usize,
    done: bool,
    buffer: Vec<u8>,
}

impl<R: BufRead> Paragraphs<R> {
    pub fn new(reader: R) -> Self {
        Paragraphs {
            reader,
            line: 0,
            done: false,
            buffer: Vec::new(),
        }
    }

    /// The next line without its line break, or `None` at the end.
    fn next_line(&mut self) -> Result<Option<String>, SyntaxError> {
        self.buffer.clear();
        let read = self
            .reader
            .read_until(b'\n', &mut self.buffer)
            .map_err(|e| SyntaxError {
                line: self.line + 1,
                col: 1,
                message: format!("could not read: {e}"),
            })?;
        if read == 0 {
            return Ok(None);
        }
        self.line += 1;
        let text = String::from_utf8_lossy(&self.buffer);
        Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()))
    }

    fn read_paragraph(&mut self) -> Result<Option<Paragraph>, SyntaxError> {
        let mut paragraph = Paragraph::default();
        loop {
            let Some(line) = self.next_line()? else {
                self.done = true;
                break;
            };
            if line.starts_with('#') {
                continue;
            }
            if line.trim().is_empty() {
                if paragraph.fields.is_empty() {
                    continue;
                }
                break;
            }
            if line.starts_with([' ', '\t']) {
                let Some(field) = paragraph.fields.last_mut() else {
                    return Err(SyntaxError {
                        line: self.line,
                        col: 1,
                        message: "an indented line continues a field, but no field is above it"
                            .into(),
                    });
                };
                let text = line.trim();
                field.value.push('\n');
                if text != "." {
                    field.value.push_str(text);
                }
                continue;
            }
            let Some((name, value)) = line.split_once(':') else {
                return Err(SyntaxError {
                    line: self.line,
                    col: 1,
                    message: format!("expected `Field: value`, found `{}`", line.trim()),
                });
            };
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(SyntaxError {
                    line: self.line,
                    col: 1,
                    message: format!("`{name}` is not a field name (no blanks, not empty)"),
                });
            }
            let blanks = value.len() - value.trim_start().len();
            if paragraph.fields.is_empty() {
                paragraph.line = self.line;
            }
            paragraph.fields.push(Field {
                name: name.to_string(),
                value: value.trim().to_string(),
                line: self.line,
                value_col: name.chars().count() + 2 + blanks,
            });
        }
        Ok((!paragraph.fields.is_empty()).then_some(paragraph))
    }
}

impl<R: BufRead> Iterator for Paragraphs<R> {
    type Item = Result<Paragraph, SyntaxError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.read_paragraph() {
            Ok(Some(p)) => Some(Ok(p)),
            Ok(None) => None,
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// The paragraphs of a text.
pub fn paragraphs(text: &str) -> Paragraphs<&[u8]> {
    Paragraphs::new(text.as_bytes())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;

    #[test]
    fn fields_lines_and_continuations() {
        let text = "# a comment\n\nTypes: deb\nURIs:  http://a/debian\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n mQINBF\n\n\n\nPackage: x\r\nDescription: one\n two\n";
        let all: Vec<_> = paragraphs(text).collect::<Result<_, _>>().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].line, 3);
        let uris = all[0].field("uris").unwrap();
        assert_eq!(
            (uris.value.as_str(), uris.line, uris.value_col),
            ("http://a/debian", 4, 8)
        );
        assert_eq!(
            all[0].get("Signed-By"),
            Some("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQINBF")
        );
        assert_eq!(all[1].line, 12);
        assert_eq!(all[1].get("Package"), Some("x"));
        assert_eq!(all[1].get("description"), Some("one\ntwo"));
        assert_eq!(all[1].get("Version"), None);
    }

    #[test]
    fn mistakes_name_their_line() {
        let e = paragraphs("Types: deb\nthis is not a field\n")
            .collect::<Result<Vec<_>, _>>()
            .unwrap_err();
        assert_eq!((e.line, e.col), (2, 1));
        assert!(e.message.contains("expected `Field: value`"), "{e}");
        let e = paragraphs("\n continued\n")
            .collect::<Result<Vec<_>, _>>()
            .unwrap_err();
        assert_eq!(e.line, 2);
        let e = paragraphs("A B: c\n")
            .collect::<Result<Vec<_>, _>>()
            .unwrap_err();
        assert!(e.message.contains("not a field name"), "{e}");
    }

    #[test]
    fn not_utf8_is_read_anyway() {
        let all: Vec<_> = Paragraphs::new(&b"Package: a\nDescription: caf\xe9\n"[..])
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(all[0].get("Package"), Some("a"));
    }
}
