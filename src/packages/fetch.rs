//! Getting a repository's files on the host: `http`/`https` through reqwest (proxies from
//! `HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY`, as reqwest reads them), `file:` from the host's
//! disk, after the store configuration's mirrors rewrote the image's URI.

use std::time::Duration;

use crate::store::config::Mirror;

/// Why a file could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchProblem {
    #[error("unreachable: {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("{url} answered {status}")]
    Status { url: String, status: String },
    #[error(
        "the host cannot fetch `{scheme}:` URIs ({url}); map it to http, https or file with a mirror"
    )]
    Scheme { scheme: String, url: String },
}

/// Fetches files, rewriting URIs by the mirrors first. Clones share the connection pool.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    mirrors: std::sync::Arc<[Mirror]>,
}

impl Fetcher {
    #[expect(
        clippy::expect_used,
        reason = "the builder sets only timeouts; it fails only when the TLS backend cannot start, which no input causes"
    )]
    pub fn new(mirrors: &[Mirror]) -> Fetcher {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(20))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("builder/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a reqwest client with rustls and timeouts always builds");
        Fetcher {
            client,
            mirrors: mirrors.into(),
        }
    }

    /// `uri` after the mirror whose `from` is its longest prefix (on a path boundary).
    pub fn rewrite(&self, uri: &str) -> String {
        rewrite(&self.mirrors, uri)
    }

    /// The bytes at `url` (already rewritten), `None` when it does not exist (404, 410, no
    /// such file).
    pub async fn get(&self, url: &str) -> Result<Option<Vec<u8>>, FetchProblem> {
        let scheme = url.split_once(':').map_or("", |(s, _)| s);
        match scheme {
            "http" | "https" => {
                let unreachable = |e: reqwest::Error| FetchProblem::Unreachable {
                    url: url.to_string(),
                    message: crate::diagnostic::error_chain(&e),
                };
                let response = self.client.get(url).send().await.map_err(unreachable)?;
                let status = response.status();
                if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
                    return Ok(None);
                }
                if !status.is_success() {
                    return Err(FetchProblem::Status {
                        url: url.to_string(),
                        status: status.to_string(),
                    });
                }
                Ok(Some(response.bytes().await.map_err(unreachable)?.to_vec()))
            }
            "file" => {
                let path = file_path(url);
                match fs_err::tokio::read(&path).await {
                    Ok(bytes) => Ok(Some(bytes)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(FetchProblem::Unreachable {
                        url: url.to_string(),
                        message: e.to_string(),
                    }),
                }
            }
            _ => Err(FetchProblem::Scheme {
                scheme: scheme.to_string(),
                url: url.to_string(),
            }),
        }
    }
}

/// The path of a `file:` URI: `file:///srv/x`, `file:/srv/x` (apt's spelling) → `/srv/x`.
fn file_path(url: &str) -> String {
    let rest = url.strip_prefix("file:").unwrap_or(url);
    let rest = rest.strip_prefix("//localhost").unwrap_or(rest);
    format!("/{}", rest.trim_start_matches('/'))
}

fn rewrite(mirrors: &[Mirror], uri: &str) -> String {
    mirrors
        .iter()
        .filter(|m| {
            let from = m.from.trim_end_matches('/');
            uri.strip_prefix(from)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
        .max_by_key(|m| m.from.trim_end_matches('/').len())
        .map_or_else(
            || uri.to_string(),
            |m| {
                let rest = &uri[m.from.trim_end_matches('/').len()..];
                format!("{}{rest}", m.to.trim_end_matches('/'))
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(from: &str, to: &str) -> Mirror {
        Mirror {
            from: from.into(),
            to: to.into(),
        }
    }

    #[test]
    fn longest_prefix_on_a_path_boundary() {
        let mirrors = [
            mirror("http://deb.example.org", "http://m/all"),
            mirror("http://deb.example.org/debian", "file:///srv/debian"),
            mirror("http://10.0.2.2:8080", "http://127.0.0.1:8080"),
        ];
        assert_eq!(
            rewrite(&mirrors, "http://deb.example.org/debian"),
            "file:///srv/debian"
        );
        assert_eq!(
            rewrite(&mirrors, "http://deb.example.org/debian/"),
            "file:///srv/debian/"
        );
        assert_eq!(
            rewrite(&mirrors, "http://deb.example.org/debian-security"),
            "http://m/all/debian-security"
        );
        assert_eq!(
            rewrite(&mirrors, "http://10.0.2.2:8080/repo"),
            "http://127.0.0.1:8080/repo"
        );
        // Not a boundary: port 80801 is another host.
        assert_eq!(
            rewrite(&mirrors, "http://10.0.2.2:80801/repo"),
            "http://10.0.2.2:80801/repo"
        );
        assert_eq!(rewrite(&[], "http://x/"), "http://x/");
    }

    #[test]
    fn file_uris() {
        assert_eq!(file_path("file:///srv/x/"), "/srv/x/");
        assert_eq!(file_path("file:/srv/x"), "/srv/x");
        assert_eq!(file_path("file://localhost/srv/x"), "/srv/x");
    }
}
