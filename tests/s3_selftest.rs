//! Self-test of the S3 test harness, so the S3 backend's tests can trust it: a real Garage
//! answers object_store's requests, and the relay in front of it forwards them intact, records
//! each S3 operation, and injects each fault the way a client will see it.
//!
//! Needs `garage` 2.5.0 (`bash .ci/install-garage.sh`).

mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use bytes::Bytes;
use common::garage::{self, Garage};
use common::real::{run_scenario, within};
use common::s3_relay::{Fault, Limit, Op, Recorded, S3Relay};
use futures_util::TryStreamExt as _;
use object_store::aws::AmazonS3;
use object_store::multipart::MultipartStore as _;
use object_store::path::Path;
use object_store::{BackoffConfig, ObjectStore as _, ObjectStoreExt as _, RetryConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const MIB: usize = 1024 * 1024;
/// The part size the S3 backend will use; S3 wants at least 5 MiB for all parts but the last.
const PART: usize = 8 * MIB;
/// The client timeout of stores built by [`Env::via_relay`]: long enough for an 8 MiB part on a
/// loaded machine, short enough that a hang is cut quickly.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Field order is drop order: the relay goes first, then Garage (killed, data deleted).
struct Env {
    relay: S3Relay,
    garage: Garage,
}

impl Env {
    async fn start() -> Result<Self> {
        let garage = Garage::start().await?;
        let relay = S3Relay::start(&garage.endpoint()).await?;
        Ok(Self { relay, garage })
    }

    /// Straight to Garage, with object_store's default retries.
    fn direct(&self) -> Result<AmazonS3> {
        Ok(self.garage.s3_builder().build()?)
    }

    /// Through the relay, with no retries: every fault reaches the caller as it is.
    fn via_relay(&self) -> Result<AmazonS3> {
        self.via_relay_with(0, CLIENT_TIMEOUT)
    }

    /// Through the relay, with up to `retries` quick retries and a `timeout` per request.
    fn via_relay_with(&self, retries: usize, timeout: Duration) -> Result<AmazonS3> {
        let retry = RetryConfig {
            max_retries: retries,
            retry_timeout: Duration::from_secs(10),
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(50),
                base: 2.0,
            },
        };
        let options = garage::client_options()
            .with_timeout(timeout)
            .with_connect_timeout(Duration::from_secs(2));
        Ok(self
            .garage
            .s3_builder()
            .with_endpoint(self.relay.endpoint())
            .with_retry(retry)
            .with_client_options(options)
            .build()?)
    }
}

/// `len` random bytes, different for each `seed`.
fn payload(len: usize, seed: u64) -> Bytes {
    Bytes::from(common::random_bytes(len, seed))
}

async fn get_bytes(store: &AmazonS3, path: &Path) -> Result<Bytes> {
    let got = store
        .get(path)
        .await
        .with_context(|| format!("GET {path}"))?;
    Ok(got.bytes().await?)
}

/// The recorded requests of `op`.
fn recorded(relay: &S3Relay, op: Op) -> Vec<Recorded> {
    relay
        .requests()
        .into_iter()
        .filter(|r| r.op == op)
        .collect()
}

#[tokio::test]
async fn garage_serves_put_get_head_list_and_delete() {
    run_scenario(Env::start(), async |env: &mut Env| {
        let store = env.direct()?;
        let data = payload(100_000, 1);
        let path = Path::from("dir/object");
        store.put(&path, data.clone().into()).await?;
        ensure!(
            get_bytes(&store, &path).await? == data,
            "GET returned other bytes"
        );
        let meta = store.head(&path).await?;
        ensure!(meta.size == data.len() as u64, "HEAD size {}", meta.size);
        // A single PUT's ETag is the MD5 of the body, as on AWS.
        let etag = meta.e_tag.context("no ETag")?;
        ensure!(etag.trim_matches('"').len() == 32, "ETag {etag}");

        let listed: Vec<_> = store.list(Some(&Path::from("dir"))).try_collect().await?;
        let names: Vec<String> = listed.iter().map(|m| m.location.to_string()).collect();
        ensure!(names == ["dir/object"], "listed {names:?}");

        store.delete(&path).await?;
        match store.head(&path).await {
            Err(object_store::Error::NotFound { .. }) => {}
            other => bail!("HEAD after DELETE: {other:?}"),
        }
        match store.get(&path).await {
            Err(object_store::Error::NotFound { .. }) => {}
            other => bail!("GET after DELETE: {:?}", other.map(|_| "a body")),
        }

        // Another bucket, for the same key: separate namespaces.
        env.garage.create_bucket("second").await?;
        let second = env.garage.s3_builder().with_bucket_name("second").build()?;
        second.put(&path, "in second".into()).await?;
        ensure!(
            get_bytes(&second, &path).await? == "in second",
            "second bucket"
        );
        ensure!(
            store.head(&path).await.is_err(),
            "the key leaked into the first bucket"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn multipart_upload_through_the_relay_is_recorded_operation_by_operation() {
    run_scenario(Env::start(), async |env: &mut Env| {
        let store = env.via_relay()?;
        let data = payload(20 * MIB, 2);
        let path = Path::from("blobs/sha256/big");
        let mut upload = store.put_multipart(&path).await?;
        for part in data.chunks(PART) {
            upload.put_part(data.slice_ref(part).into()).await?;
        }
        let done = upload.complete().await?;
        // A multipart ETag is not an MD5 of the object: "<md5 of the parts' md5s>-<parts>".
        let etag = done.e_tag.context("no ETag")?;
        ensure!(
            etag.trim_matches('"').ends_with("-3"),
            "multipart ETag {etag}"
        );

        use Op::*;
        let expected = [
            CreateMultipartUpload,
            UploadPart,
            UploadPart,
            UploadPart,
            CompleteMultipartUpload,
        ];
        ensure!(env.relay.ops() == expected, "ops {:?}", env.relay.ops());
        for r in env.relay.requests() {
            ensure!(
                r.status == Some(200) && r.upstream == Some(200) && r.fault.is_none(),
                "{r:?}"
            );
            ensure!(
                r.bucket == "entrepot" && r.key == "blobs/sha256/big",
                "bucket/key of {r:?}"
            );
        }

        // Streamed back through the relay, and seen directly in Garage.
        ensure!(
            get_bytes(&store, &path).await? == data,
            "GET through the relay: other bytes"
        );
        let meta = env.direct()?.head(&path).await?;
        ensure!(
            meta.size == data.len() as u64,
            "size in Garage {}",
            meta.size
        );
        ensure!(
            env.relay.statuses(GetObject) == [Some(200)],
            "{:?}",
            env.relay.requests()
        );

        // object_store deletes through the bulk API, whose keys are in the body.
        store.delete(&path).await?;
        ensure!(
            env.relay.statuses(DeleteObjects) == [Some(200)],
            "{:?}",
            env.relay.requests()
        );
        ensure!(
            env.direct()?.head(&path).await.is_err(),
            "deleted object still in Garage"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn status_fault_fails_the_request_then_the_next_attempt_succeeds() {
    run_scenario(Env::start(), async |env: &mut Env| {
        let relay = &env.relay;
        let path = Path::from("status");

        // No retries: the 503 reaches the caller, once.
        let fired = relay.fault(Op::PutObject, Fault::Status(503), Limit::Times(1));
        let store = env.via_relay()?;
        let err = store.put(&path, "x".into()).await.unwrap_err().to_string();
        ensure!(
            err.contains("503") && err.contains("SlowDown"),
            "error: {err}"
        );
        store.put(&path, "y".into()).await?;
        ensure!(fired.fired() == 1, "fired {}", fired.fired());
        ensure!(
            relay.statuses(Op::PutObject) == [Some(503), Some(200)],
            "{:?}",
            relay.requests()
        );
        ensure!(get_bytes(&store, &path).await? == "y", "content");

        // object_store retries 5xx itself: two 503s on a part are absorbed by three retries.
        relay.fault(Op::UploadPart, Fault::Status(503), Limit::Times(2));
        let retrying = env.via_relay_with(3, CLIENT_TIMEOUT)?;
        let mut upload = retrying.put_multipart(&Path::from("retried")).await?;
        upload.put_part(payload(MIB, 3).into()).await?;
        upload.complete().await?;
        ensure!(
            relay.statuses(Op::UploadPart) == [Some(503), Some(503), Some(200)],
            "{:?}",
            relay.requests()
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn not_found_after_write_hides_a_new_object_for_the_lag_only() {
    run_scenario(Env::start(), async |env: &mut Env| {
        const LAG: Duration = Duration::from_millis(1500);
        let relay = &env.relay;
        let store = env.via_relay()?;
        let path = Path::from("lagging");
        relay.fault(
            Op::PutObject,
            Fault::NotFoundAfterWrite(LAG),
            Limit::Times(1),
        );
        store.put(&path, "fresh".into()).await?;
        let written = Instant::now();

        match store.head(&path).await {
            Err(object_store::Error::NotFound { .. }) => {}
            other => bail!("HEAD right after the write: {other:?}"),
        }
        match store.get(&path).await {
            Err(object_store::Error::NotFound { .. }) => {}
            other => bail!("GET right after the write: {:?}", other.map(|_| "a body")),
        }
        // Garage has it all along.
        env.direct()?.head(&path).await?;

        within(Duration::from_secs(10), async {
            while store.head(&path).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        })
        .await?;
        let visible_after = written.elapsed();
        ensure!(
            visible_after >= LAG - Duration::from_millis(100),
            "visible after {visible_after:?} already"
        );
        let heads = recorded(relay, Op::HeadObject);
        ensure!(
            heads.first().map(|r| (r.status, r.fault))
                == Some((Some(404), Some(Fault::NotFoundAfterWrite(LAG)))),
            "{heads:?}"
        );
        ensure!(
            heads.last().map(|r| r.status) == Some(Some(200)),
            "{heads:?}"
        );

        // The rule fired once: the next write is visible at once.
        let other = Path::from("immediate");
        store.put(&other, "now".into()).await?;
        store.head(&other).await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn lost_answer_to_complete_leaves_the_object_in_garage() {
    run_scenario(Env::start(), async |env: &mut Env| {
        let relay = &env.relay;
        let store = env.via_relay()?;
        let path = Path::from("completed-unawares");
        let data = payload(MIB, 4);
        relay.fault(
            Op::CompleteMultipartUpload,
            Fault::LoseAnswer,
            Limit::Times(1),
        );
        let id = store.create_multipart(&path).await?;
        let part = store.put_part(&path, &id, 0, data.clone().into()).await?;
        let err = store
            .complete_multipart(&path, &id, vec![part.clone()])
            .await
            .expect_err("the answer was lost");
        let complete = recorded(relay, Op::CompleteMultipartUpload);
        ensure!(
            complete.len() == 1
                && complete[0].status.is_none()
                && complete[0].upstream == Some(200),
            "{complete:?} ({err})"
        );
        // The client could not know, but the object is there, whole.
        ensure!(
            get_bytes(&env.direct()?, &path).await? == data,
            "object in Garage"
        );

        // Completing the same upload again (what a retry does) is answered 404 NoSuchUpload
        // by Garage: a retried Complete whose first answer was lost fails although the
        // object exists.
        match store.complete_multipart(&path, &id, vec![part]).await {
            Err(e) if e.to_string().contains("NoSuchUpload") => {}
            other => bail!("second Complete: {other:?}"),
        }
        ensure!(
            relay.statuses(Op::CompleteMultipartUpload) == [None, Some(404)],
            "{:?}",
            relay.requests()
        );

        // object_store retries a Complete whose answer was lost (it is marked idempotent), and
        // so reports the object NotFound although the upload succeeded.
        let retrying = env.via_relay_with(3, CLIENT_TIMEOUT)?;
        let path = Path::from("completed-then-retried");
        relay.fault(
            Op::CompleteMultipartUpload,
            Fault::LoseAnswer,
            Limit::Times(1),
        );
        let mut upload = retrying.put_multipart(&path).await?;
        upload.put_part(data.clone().into()).await?;
        match upload.complete().await {
            Err(object_store::Error::NotFound { .. }) => {}
            other => bail!("retried Complete: {other:?}"),
        }
        ensure!(
            get_bytes(&env.direct()?, &path).await? == data,
            "retried object in Garage"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn malformed_status_and_close_fail_the_request_at_once() {
    run_scenario(Env::start(), async |env: &mut Env| {
        let relay = &env.relay;
        let store = env.via_relay()?;
        let path = Path::from("present");
        store.put(&path, "here".into()).await?;

        relay.fault(Op::HeadObject, Fault::MalformedStatus, Limit::Times(1));
        let started = Instant::now();
        let err = store.head(&path).await.expect_err("garbage status line");
        ensure!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}: {err}",
            started.elapsed()
        );
        store.head(&path).await.context("HEAD after the garbage")?;

        relay.fault(Op::GetObject, Fault::Close, Limit::Times(1));
        let started = Instant::now();
        let err = store
            .get(&path)
            .await
            .map(drop)
            .expect_err("closed without answer");
        ensure!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}: {err}",
            started.elapsed()
        );
        ensure!(
            get_bytes(&store, &path).await? == "here",
            "GET after the close"
        );

        ensure!(
            relay.statuses(Op::HeadObject) == [None, Some(200)]
                && relay.statuses(Op::GetObject) == [None, Some(200)],
            "{:?}",
            relay.requests()
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn hang_is_cut_by_the_client_timeout() {
    run_scenario(Env::start(), async |env: &mut Env| {
        const TIMEOUT: Duration = Duration::from_secs(1);
        let relay = &env.relay;
        let store = env.via_relay_with(0, TIMEOUT)?;
        let path = Path::from("slow");
        store.put(&path, "eventually".into()).await?;
        relay.fault(Op::HeadObject, Fault::Hang, Limit::Times(1));
        let started = Instant::now();
        let err = within(Duration::from_secs(10), async {
            Ok(store.head(&path).await.expect_err("hung"))
        })
        .await?;
        let took = started.elapsed();
        ensure!(
            took >= TIMEOUT - Duration::from_millis(100) && took < TIMEOUT * 3,
            "took {took:?}: {err}"
        );
        store.head(&path).await.context("HEAD after the hang")?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn down_relay_refuses_every_request_until_it_is_up_again() {
    run_scenario(Env::start(), async |env: &mut Env| {
        let store = env.via_relay()?;
        let path = Path::from("reachable");
        store.put(&path, "a".into()).await?;
        env.relay.set_down(true);
        ensure!(
            store.head(&path).await.is_err(),
            "HEAD through a down relay"
        );
        ensure!(
            store.put(&path, "b".into()).await.is_err(),
            "PUT through a down relay"
        );
        env.relay.set_down(false);
        ensure!(
            get_bytes(&store, &path).await? == "a",
            "the PUT while down got through"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn garage_keeps_its_objects_across_kill_and_restart() {
    run_scenario(Env::start(), async |env: &mut Env| {
        let store = env.via_relay()?;
        let path = Path::from("durable");
        let data = payload(3 * MIB, 5);
        store.put(&path, data.clone().into()).await?;

        env.garage.kill();
        ensure!(!env.garage.is_running(), "garage survived SIGKILL");
        let err = store.head(&path).await.expect_err("HEAD with garage dead");
        ensure!(
            env.relay
                .requests()
                .last()
                .is_some_and(|r| r.upstream.is_none()),
            "{:?} ({err})",
            env.relay.requests()
        );

        env.garage.restart().await?;
        ensure!(get_bytes(&store, &path).await? == data, "after restart");
        Ok(())
    })
    .await;
}

/// Against a raw upstream rather than Garage, so the bytes on both sides can be compared: the
/// head goes up exactly as sent (Host, header case and order), a chunked body with extensions
/// and trailers passes unchanged both ways, and the relay finds the end of each message (a HEAD
/// answer announcing a length has no body), so the connection serves a second request.
#[tokio::test]
async fn relay_forwards_heads_and_chunked_bodies_byte_for_byte() {
    const PUT: &[u8] = b"PUT /bucket/some%20key?x-id=PutObject HTTP/1.1\r\n\
        Host: example.test:1234\r\nX-Amz-Date: 20260101T000000Z\r\n\
        Transfer-Encoding: chunked\r\n\r\n\
        5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n";
    const PUT_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nX-Custom: Kept\r\n\
        transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    const HEAD: &[u8] = b"HEAD /bucket/k HTTP/1.1\r\nhost: example.test:1234\r\n\r\n";
    const HEAD_ANSWER: &[u8] = b"HTTP/1.1 404 Not Found\r\ncontent-length: 7\r\n\r\n";

    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    // One connection per request (the relay's way): reads exactly the expected request, so a
    // relay sending more or less fails the comparison or the deadline.
    let server = tokio::spawn(async move {
        let mut received = Vec::new();
        for (request, answer) in [(PUT, PUT_ANSWER), (HEAD, HEAD_ANSWER)] {
            let (mut conn, _) = upstream.accept().await?;
            let mut got = vec![0; request.len()];
            conn.read_exact(&mut got).await?;
            conn.write_all(answer).await?;
            received.push(got);
        }
        Ok::<_, std::io::Error>(received)
    });
    let relay = S3Relay::start(&format!("http://{up_addr}")).await.unwrap();
    let mut client = tokio::net::TcpStream::connect(relay.addr()).await.unwrap();
    for (request, answer) in [(PUT, PUT_ANSWER), (HEAD, HEAD_ANSWER)] {
        client.write_all(request).await.unwrap();
        let mut got = vec![0; answer.len()];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut got))
            .await
            .expect("the answer within 5s")
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(answer)
        );
    }
    let received = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("upstream done")
        .unwrap()
        .unwrap();
    assert_eq!(received, [PUT.to_vec(), HEAD.to_vec()]);
    let recorded: Vec<_> = relay
        .requests()
        .into_iter()
        .map(|r| (r.op, r.bucket, r.key, r.status))
        .collect();
    assert_eq!(
        recorded,
        [
            (Op::PutObject, "bucket".into(), "some key".into(), Some(200)),
            (Op::HeadObject, "bucket".into(), "k".into(), Some(404)),
        ]
    );
}
