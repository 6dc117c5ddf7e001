//! Text encodings of the file actions (`encoding: utf8 | utf16 | utf16-BE | utf32 | …`).
//! Bare `utf16`/`utf32` mean little-endian, as in AWSTOE. No byte-order mark is written.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Utf8,
    Utf16Le,
    Utf16Be,
    Utf32Le,
    Utf32Be,
}

impl Encoding {
    /// Case-insensitive, with or without hyphens (`UTF-16-LE`, `utf16le`, `utf16-be`).
    pub fn from_name(name: &str) -> Option<Encoding> {
        let n: String = name
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .collect::<String>()
            .to_ascii_lowercase();
        Some(match n.as_str() {
            "utf8" => Encoding::Utf8,
            "utf16" | "utf16le" => Encoding::Utf16Le,
            "utf16be" => Encoding::Utf16Be,
            "utf32" | "utf32le" => Encoding::Utf32Le,
            "utf32be" => Encoding::Utf32Be,
            _ => return None,
        })
    }

    pub fn encode(self, text: &str) -> Vec<u8> {
        match self {
            Encoding::Utf8 => text.as_bytes().to_vec(),
            Encoding::Utf16Le => text.encode_utf16().flat_map(u16::to_le_bytes).collect(),
            Encoding::Utf16Be => text.encode_utf16().flat_map(u16::to_be_bytes).collect(),
            Encoding::Utf32Le => text
                .chars()
                .flat_map(|c| (c as u32).to_le_bytes())
                .collect(),
            Encoding::Utf32Be => text
                .chars()
                .flat_map(|c| (c as u32).to_be_bytes())
                .collect(),
        }
    }

    /// `None` when the bytes are not valid text in this encoding. A leading byte-order mark
    /// is dropped.
    pub fn decode(self, bytes: &[u8]) -> Option<String> {
        let text = match self {
            Encoding::Utf8 => String::from_utf8(bytes.to_vec()).ok()?,
            Encoding::Utf16Le | Encoding::Utf16Be => {
                if !bytes.len().is_multiple_of(2) {
                    return None;
                }
                let units = bytes.chunks_exact(2).map(|c| {
                    let pair = [c[0], c[1]];
                    if self == Encoding::Utf16Le {
                        u16::from_le_bytes(pair)
                    } else {
                        u16::from_be_bytes(pair)
                    }
                });
                char::decode_utf16(units)
                    .collect::<Result<String, _>>()
                    .ok()?
            }
            Encoding::Utf32Le | Encoding::Utf32Be => {
                if !bytes.len().is_multiple_of(4) {
                    return None;
                }
                bytes
                    .chunks_exact(4)
                    .map(|c| {
                        let quad = [c[0], c[1], c[2], c[3]];
                        let n = if self == Encoding::Utf32Le {
                            u32::from_le_bytes(quad)
                        } else {
                            u32::from_be_bytes(quad)
                        };
                        char::from_u32(n)
                    })
                    .collect::<Option<String>>()?
            }
        };
        Some(
            text.strip_prefix('\u{feff}')
                .map(str::to_string)
                .unwrap_or(text),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_round_trips() {
        for name in [
            "utf8",
            "UTF-8",
            "utf16",
            "utf-16-LE",
            "utf16-BE",
            "utf32",
            "UTF-32-BE",
        ] {
            let enc = Encoding::from_name(name).expect(name);
            let text = "héllo ✓ 𝄞";
            assert_eq!(
                enc.decode(&enc.encode(text)).as_deref(),
                Some(text),
                "{name}"
            );
        }
        assert_eq!(Encoding::Utf16Le.encode("A"), vec![0x41, 0]);
        assert_eq!(Encoding::Utf16Be.encode("A"), vec![0, 0x41]);
        assert_eq!(Encoding::from_name("latin1"), None);
        assert_eq!(Encoding::Utf8.decode(&[0xff]), None);
    }
}
