//! A small XML tree for AWS responses (S3 REST, EC2 and IAM Query): element local names
//! (namespaces dropped), text, children. AWS responses are small documents read whole; a tree
//! with path lookups is easier to read and test than a serde mapping per response, and it
//! does not break when AWS adds an element.

use quick_xml::Reader;
use quick_xml::events::Event;

#[derive(Debug, thiserror::Error)]
#[error("not a well-formed XML document: {detail}")]
pub struct XmlError {
    pub detail: String,
}

/// One element: its local name, its text (concatenated, entities resolved) and its children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    /// Parse a document and return its root element.
    pub fn parse(xml: &str) -> Result<Element, XmlError> {
        let mut reader = Reader::from_str(xml);
        let mut stack: Vec<Element> = Vec::new();
        let err = |detail: String| XmlError { detail };
        loop {
            let event = reader
                .read_event()
                .map_err(|e| err(format!("{e} at byte {}", reader.buffer_position())))?;
            match event {
                Event::Start(start) => {
                    let name = start.local_name().as_ref().to_string();
                    stack.push(Element {
                        name,
                        ..Element::default()
                    });
                }
                Event::Empty(start) => {
                    let name = start.local_name().as_ref().to_string();
                    let element = Element {
                        name,
                        ..Element::default()
                    };
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(element),
                        None => return Ok(element),
                    }
                }
                Event::End(_) => {
                    let done = stack
                        .pop()
                        .ok_or_else(|| err("an end tag without a start tag".into()))?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(done),
                        None => return Ok(done),
                    }
                }
                Event::Text(text) => {
                    if let Some(current) = stack.last_mut() {
                        current.text.push_str(&text.xml10_content());
                    }
                }
                Event::CData(data) => {
                    if let Some(current) = stack.last_mut() {
                        current.text.push_str(data.into_inner().as_ref());
                    }
                }
                Event::GeneralRef(reference) => {
                    let resolved = match reference.resolve_char_ref() {
                        Ok(Some(c)) => c.to_string(),
                        Ok(None) => {
                            let name = reference.into_inner().into_owned();
                            match name.as_str() {
                                "amp" => "&".to_string(),
                                "lt" => "<".to_string(),
                                "gt" => ">".to_string(),
                                "quot" => "\"".to_string(),
                                "apos" => "'".to_string(),
                                other => return Err(err(format!("unknown entity `&{other};`"))),
                            }
                        }
                        Err(e) => return Err(err(e.to_string())),
                    };
                    if let Some(current) = stack.last_mut() {
                        current.text.push_str(&resolved);
                    }
                }
                Event::Eof => return Err(err("the document ended before its root element".into())),
                Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
            }
        }
    }

    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child named `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The element at a path of child names (`["Errors", "Error", "Code"]`).
    pub fn at(&self, path: &[&str]) -> Option<&Element> {
        path.iter().try_fold(self, |e, name| e.child(name))
    }

    /// The trimmed text at a path, if the element exists and the text is not empty.
    pub fn text_at(&self, path: &[&str]) -> Option<String> {
        self.at(path)
            .map(|e| e.text.trim().to_string())
            .filter(|t| !t.is_empty())
    }

    /// The first element named `name` anywhere below this one (depth first).
    pub fn find(&self, name: &str) -> Option<&Element> {
        self.children.iter().find_map(|c| {
            if c.name == name {
                Some(c)
            } else {
                c.find(name)
            }
        })
    }
}

/// Escape text for an XML element body (the bodies S3 requests send).
pub fn escape(text: &str) -> String {
    quick_xml::escape::escape(text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_ec2_error_with_namespaces_and_entities() {
        let doc = r#"<?xml version="1.0" encoding="UTF-8"?>
<Response xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><Errors><Error><Code>InvalidAMIName.Duplicate</Code><Message>AMI name a &amp; b &#65; is already in use</Message></Error></Errors><RequestID>r-1</RequestID></Response>"#;
        let root = Element::parse(doc).expect("parses");
        assert_eq!(root.name, "Response");
        assert_eq!(
            root.text_at(&["Errors", "Error", "Code"]).as_deref(),
            Some("InvalidAMIName.Duplicate")
        );
        assert_eq!(
            root.text_at(&["Errors", "Error", "Message"]).as_deref(),
            Some("AMI name a & b A is already in use")
        );
        assert_eq!(root.find("RequestID").map(|e| e.text.as_str()), Some("r-1"));
    }

    #[test]
    fn lists_repeated_children_and_empty_elements() {
        let doc = "  <a><item><id>1</id></item><item><id>2</id></item><empty/></a>";
        let root = Element::parse(doc).expect("parses");
        let ids: Vec<_> = root
            .children_named("item")
            .filter_map(|i| i.text_at(&["id"]))
            .collect();
        assert_eq!(ids, ["1", "2"]);
        assert!(root.child("empty").is_some());
        assert_eq!(root.text_at(&["empty"]), None);
    }

    #[test]
    fn rejects_broken_documents() {
        assert!(Element::parse("<a><b></a>").is_err());
        assert!(Element::parse("<a>").is_err());
        assert!(Element::parse("").is_err());
    }
}
