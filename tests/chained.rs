//! Chained caches: entrepot as the upstream of another entrepot (edge → regional → origin).
//! Pulls through the edge fill both caches, and the edge never asks the regional cache for
//! anything it already holds.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::fake_registry::FakeRegistry;
use common::proxy::Proxy;
use common::{random_bytes, upstream, OCI_MANIFEST};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A counting HTTP relay in front of the regional cache: it records every path the edge asks
/// for, so the test can say "no request" rather than "no visible failure".
struct Relay {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
    _task: tokio::task::JoinHandle<()>,
}

async fn relay_to(target: String) -> Relay {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let client = common::client_no_redirect();
    let s = seen.clone();
    let task = tokio::spawn(common::serve_connections(listener, move |stream| {
        let (client, target, seen) = (client.clone(), target.clone(), s.clone());
        async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (client, target, seen) = (client.clone(), target.clone(), seen.clone());
                async move {
                    let pq = req.uri().path_and_query().unwrap().to_string();
                    seen.lock().unwrap().push(format!("{} {pq}", req.method()));
                    let mut fwd = client.request(req.method().clone(), format!("{target}{pq}"));
                    for (k, v) in req.headers() {
                        if k != "host" {
                            fwd = fwd.header(k, v);
                        }
                    }
                    let resp = fwd.send().await.unwrap();
                    let mut out = hyper::Response::builder().status(resp.status());
                    for (k, v) in resp.headers() {
                        out = out.header(k, v);
                    }
                    let body = resp.bytes().await.unwrap();
                    Ok::<_, Infallible>(out.body(Full::new(body)).unwrap())
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        }
    }));
    Relay {
        url,
        seen,
        _task: task,
    }
}

#[tokio::test]
async fn edge_and_regional_caches_both_fill_and_the_edge_never_re_asks() {
    let origin = FakeRegistry::start().await;
    let layers: Vec<Bytes> = (0..3)
        .map(|i| random_bytes(200_000 + i, i as u64).into())
        .collect();
    let img = origin.push_image("team/app", "v1", &layers);

    let regional = Proxy::start(&upstream("docker.io", &origin.url(), true, "")).await;
    let relay = relay_to(regional.url.clone()).await;
    let edge = Proxy::start(&upstream("regional", &relay.url, true, "")).await;

    let c = common::client();
    let pull = || async {
        let r = c
            .get(edge.url("/v2/team/app/manifests/v1"))
            .header("Accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), img.manifest_body);
        for (d, data) in img.layers.iter().zip(&layers) {
            let r = c
                .get(edge.url(&format!("/v2/team/app/blobs/{d}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert!(r.bytes().await.unwrap() == data);
        }
    };
    pull().await;
    for d in &img.layers {
        edge.wait_cached(d).await;
        regional.wait_cached(d).await;
    }
    assert!(regional.blob_path(&img.manifest).exists());
    assert!(edge.blob_path(&img.manifest).exists());
    let first = relay.seen.lock().unwrap().len();
    assert_eq!(first, 4, "{:?}", relay.seen.lock().unwrap());
    assert_eq!(origin.count("GET", "/blobs/"), 3);

    // Everything again, many times: the edge holds it all and asks nobody.
    let origin_before = origin.requests().len();
    for _ in 0..3 {
        pull().await;
    }
    assert_eq!(
        relay.seen.lock().unwrap().len(),
        first,
        "{:?}",
        relay.seen.lock().unwrap()
    );
    assert_eq!(origin.requests().len(), origin_before);

    // A second edge, cold, is served by the regional cache without touching the origin.
    let edge2 = Proxy::start(&upstream("regional", &regional.url, true, "")).await;
    for (d, data) in img.layers.iter().zip(&layers) {
        let r = c
            .get(edge2.url(&format!("/v2/team/app/blobs/{d}")))
            .send()
            .await
            .unwrap();
        assert!(r.bytes().await.unwrap() == data);
    }
    assert_eq!(origin.requests().len(), origin_before);
    assert_eq!(relay.seen.lock().unwrap().len(), first);
}
