//! Every request the S3 backend sends, counted by operation and status: an HTTP connector
//! around `object_store`'s reqwest one, so retries (each a request of its own) are counted
//! too.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};
use object_store::ClientOptions;

/// Makes clients whose requests are counted.
#[derive(Debug, Default)]
pub struct CountingConnector;

impl HttpConnector for CountingConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(Counted { inner }))
    }
}

#[derive(Debug)]
struct Counted {
    inner: HttpClient,
}

impl HttpService for Counted {
    // Written out as `#[async_trait]` would write it (the trait is declared with it).
    fn call<'a, 'f>(
        &'a self,
        req: HttpRequest,
    ) -> Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'f>>
    where
        'a: 'f,
        Self: 'f,
    {
        let op = operation(
            req.method(),
            req.uri().path(),
            req.uri().query().unwrap_or(""),
        );
        Box::pin(async move {
            let started = Instant::now();
            let result = self.inner.execute(req).await;
            let status = result.as_ref().ok().map(|r| r.status().as_u16());
            crate::metrics::s3_request(op, status, started.elapsed());
            result
        })
    }
}

/// The S3 operation of a path-style request (`/<bucket>` or `/<bucket>/<key>`).
pub fn operation(method: &http::Method, path: &str, query: &str) -> &'static str {
    let has = |name: &str| {
        query
            .split('&')
            .any(|p| p == name || p.starts_with(&format!("{name}=")))
    };
    let object = path.trim_start_matches('/').contains('/');
    match (method.as_str(), object) {
        ("HEAD", true) => "HeadObject",
        ("GET", true) if has("uploadId") => "ListParts",
        ("GET", true) => "GetObject",
        ("PUT", true) if has("partNumber") => "UploadPart",
        ("PUT", true) => "PutObject",
        ("POST", true) if has("uploads") => "CreateMultipartUpload",
        ("POST", true) if has("uploadId") => "CompleteMultipartUpload",
        ("DELETE", true) if has("uploadId") => "AbortMultipartUpload",
        ("DELETE", true) => "DeleteObject",
        ("GET", false) if has("uploads") => "ListMultipartUploads",
        ("GET", false) => "ListObjects",
        ("POST", false) if has("delete") => "DeleteObjects",
        ("HEAD", false) => "HeadBucket",
        _ => "Other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn operations_of_path_style_requests() {
        let cases = [
            (Method::HEAD, "/b/blobs/sha256/ab", "", "HeadObject"),
            (Method::GET, "/b/blobs/sha256/ab", "", "GetObject"),
            (Method::PUT, "/b/k", "", "PutObject"),
            (Method::POST, "/b/k", "uploads", "CreateMultipartUpload"),
            (Method::PUT, "/b/k", "partNumber=2&uploadId=x", "UploadPart"),
            (
                Method::POST,
                "/b/k",
                "uploadId=x",
                "CompleteMultipartUpload",
            ),
            (Method::DELETE, "/b/k", "uploadId=x", "AbortMultipartUpload"),
            (Method::DELETE, "/b/k", "", "DeleteObject"),
            (Method::GET, "/b", "list-type=2&prefix=meta", "ListObjects"),
            (Method::POST, "/b", "delete", "DeleteObjects"),
        ];
        for (m, path, query, want) in cases {
            assert_eq!(operation(&m, path, query), want, "{m} {path}?{query}");
        }
    }
}
