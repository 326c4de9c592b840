//! Issue 13's scenarios, cold pulls at the machine's limit: `cold1m` (a 16 MiB layer on
//! loopback) and `shaped` (the big layer over a shaped link), each round one client and a fresh
//! proxy, timed to the first and the last byte, with the proxy's CPU. `cold1`'s rows for issue
//! 13 are made beside issue 4's, in `cold_single`.

use anyhow::{Context, Result};

use crate::support::{
    load::{self, Timed},
    procs,
    relay::{Counts, Relay},
    report::{Goal, Row, Samples, Subject, Unit},
    seed::Pushed,
    shaped::{Shape, ShapedRelay},
};
use crate::{
    order, samples, settle, size_label, Backend, Bench, Peer, Proxy, CPU_TAIL, DISTRIBUTION,
    ENTREPOT, GIB,
};

/// Shaping relays in front of the counting relays: one per proxy, one for direct pulls, so
/// every peer has the link to itself and the counting goes on as on loopback.
pub struct ShapedLinks {
    entrepot: ShapedRelay,
    distribution: ShapedRelay,
    direct: ShapedRelay,
}

/// The path between a peer and the upstream's counting relay.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Link {
    Loopback,
    Shaped,
}

/// One cold pull by one client.
struct ColdPull {
    timed: Timed,
    /// What crossed the counting relay in front of the upstream.
    upstream: Counts,
    /// The proxy's CPU seconds (a direct pull has no proxy).
    cpu: Option<f64>,
}

/// "1 Gbit/s", "300 Mbit/s".
fn rate_label(shape: Shape) -> String {
    let mbit = shape.bytes_per_sec * 8 / 1_000_000;
    if mbit >= 1000 && mbit.is_multiple_of(1000) {
        format!("{} Gbit/s", mbit / 1000)
    } else {
        format!("{mbit} Mbit/s")
    }
}

fn label(peer: Peer) -> &'static str {
    match peer {
        Peer::Proxy(Proxy::Entrepot) => "entrepot",
        Peer::Proxy(Proxy::Distribution) => "distribution",
        Peer::Reference => "direct",
    }
}

impl Bench {
    /// Starts (once) the shaping relays.
    async fn shaped_links(&mut self) -> Result<&ShapedLinks> {
        if self.shaped.is_none() {
            let shape = self.s.shape;
            self.shaped = Some(ShapedLinks {
                entrepot: ShapedRelay::start(self.relay_entrepot.port, shape).await?,
                distribution: ShapedRelay::start(self.relay_distribution.port, shape).await?,
                direct: ShapedRelay::start(self.relay_direct.port, shape).await?,
            });
        }
        Ok(self.shaped.as_ref().expect("just set"))
    }

    /// `peer`'s counting relay, and the URL of the upstream as `peer` reaches it over `link`.
    fn link(&self, peer: Peer, link: Link) -> Result<(&Relay, String)> {
        let relay = match peer {
            Peer::Proxy(proxy) => self.relay(proxy),
            Peer::Reference => &self.relay_direct,
        };
        let url = match link {
            Link::Loopback => relay.url(),
            Link::Shaped => {
                let links = self.shaped.as_ref().context("no shaped links started")?;
                match peer {
                    Peer::Proxy(Proxy::Entrepot) => links.entrepot.url(),
                    Peer::Proxy(Proxy::Distribution) => links.distribution.url(),
                    Peer::Reference => links.direct.url(),
                }
            }
        };
        Ok((relay, url))
    }

    /// One client pulls `blob` from `peer` over `link`: from a fresh proxy (empty store, named
    /// `name`), whose CPU is counted from just before the request until the upstream relay is
    /// quiet and [`CPU_TAIL`] more, or from the upstream directly.
    async fn cold_pull(
        &self,
        peer: Peer,
        blob: &Pushed,
        link: Link,
        name: &str,
    ) -> Result<ColdPull> {
        let (relay, upstream) = self.link(peer, link)?;
        let path = self.blob_path(blob);
        let client = load::client()?;
        let Peer::Proxy(proxy) = peer else {
            let before = relay.counts();
            let timed = load::pull_ttfb(&client, &format!("{upstream}{path}"), blob.size).await?;
            return Ok(ColdPull {
                timed,
                upstream: relay.counts() - before,
                cpu: None,
            });
        };
        let instance = self.start_via(proxy, &Backend::Fs, name, &upstream).await?;
        let pid = instance.server.pid()?;
        let before = relay.counts();
        let cpu_before = procs::cpu_mark(pid)?;
        let timed = load::pull_ttfb(&client, &instance.server.url(&path), blob.size)
            .await
            .with_context(|| format!("{proxy:?}:\n{}", instance.server.process.output_tail()))?;
        let upstream = settle(relay).await - before;
        tokio::time::sleep(CPU_TAIL).await;
        let cpu = procs::cpu_mark(pid)?.since(&cpu_before);
        Ok(ColdPull {
            timed,
            upstream,
            cpu: Some(cpu),
        })
    }

    /// `rounds` rounds of [`Bench::cold_pull`] by direct, entrepot and distribution, the order
    /// rotated each round; each pull printed and handed to `record`.
    async fn cold_pulls(
        &self,
        key: &str,
        blob: &Pushed,
        link: Link,
        rounds: usize,
        mut record: impl FnMut(Peer, &ColdPull),
    ) -> Result<()> {
        for round in 0..rounds {
            for peer in order(round, &[Peer::Reference, ENTREPOT, DISTRIBUTION]) {
                let p = self
                    .cold_pull(peer, blob, link, &format!("{key}-{round}"))
                    .await?;
                let cpu = p.cpu.map_or_else(String::new, |cpu| {
                    format!(
                        ", CPU {cpu:.3} s ({:.2} CPU-s/GiB)",
                        cpu / (blob.size as f64 / GIB)
                    )
                });
                println!(
                    "round {round}: {:<13} {:.3} s, first byte {:.1} ms, upstream bytes ÷ size \
                     {:.3} ({} requests){cpu}",
                    label(peer),
                    p.timed.last_byte.as_secs_f64(),
                    p.timed.first_byte.as_secs_f64() * 1e3,
                    p.upstream.bytes_down as f64 / blob.size as f64,
                    p.upstream.requests,
                );
                record(peer, &p);
            }
        }
        Ok(())
    }

    /// `cold1m`: the medium layer, cold, one client, on loopback: wall time against
    /// distribution's, and CPU per GiB (a figure: the fixed costs of a pull weigh more here).
    pub(crate) async fn cold_medium(&mut self) -> Result<()> {
        let blob = self.seeded.medium.clone();
        let scenario = format!("cold pull, 1 client, {} layer", size_label(blob.size));
        let mut time = Row::new(&scenario, "time to last byte", Unit::Seconds)
            .with_distribution()
            .with_reference("direct")
            .target(
                "≤ 1.0× distribution",
                Subject::RatioToDistribution,
                Goal::AtMost(1.0),
            );
        let mut cpu =
            Row::new(&scenario, "proxy CPU per GiB pulled", Unit::CpuPerGib).with_distribution();
        let gib = blob.size as f64 / GIB;
        self.cold_pulls(
            "cold1m",
            &blob,
            Link::Loopback,
            self.s.medium_rounds,
            |peer, p| {
                samples(&mut time, peer).push(p.timed.last_byte.as_secs_f64());
                if let Some(c) = p.cpu {
                    samples(&mut cpu, peer).push(c / gib);
                }
            },
        )
        .await?;
        self.limits_rows.extend([time, cpu]);
        Ok(())
    }

    /// `shaped`: the big layer, cold, one client, every peer's upstream over a shaped link of
    /// its own: wall time against a direct pull over the same kind of link, and the time to
    /// first byte against the direct one's.
    pub(crate) async fn cold_shaped(&mut self) -> Result<()> {
        let shape = self.s.shape;
        self.shaped_links().await?;
        let blob = self.seeded.big.clone();
        let scenario = format!(
            "cold pull over a shaped link ({}, {} ms each way), 1 client, {} layer",
            rate_label(shape),
            shape.delay.as_millis(),
            size_label(blob.size)
        );
        let reference = "direct, same link";
        let mut time = Row::new(&scenario, "time to last byte", Unit::Seconds)
            .with_distribution()
            .with_reference(reference)
            .target(
                "≤ 1.05× direct",
                Subject::RatioToReference,
                Goal::AtMost(1.05),
            );
        let mut first = Row::new(&scenario, "time to first byte", Unit::MillisTenths)
            .with_distribution()
            .with_reference(reference)
            .target(
                "≤ direct + 10 ms",
                Subject::DifferenceToReference,
                Goal::AtMost(10.0),
            );
        let mut cpu =
            Row::new(&scenario, "proxy CPU per GiB pulled", Unit::CpuPerGib).with_distribution();
        let gib = blob.size as f64 / GIB;
        // The direct pulls' first bytes and bodies (first to last byte), to check the link by.
        let mut direct_first = Samples::default();
        let mut direct_body = Samples::default();
        self.cold_pulls("shaped", &blob, Link::Shaped, self.s.rounds, |peer, p| {
            if peer == Peer::Reference {
                direct_first.push(p.timed.first_byte.as_secs_f64());
                direct_body.push((p.timed.last_byte - p.timed.first_byte).as_secs_f64());
            }
            samples(&mut time, peer).push(p.timed.last_byte.as_secs_f64());
            samples(&mut first, peer).push(p.timed.first_byte.as_secs_f64() * 1e3);
            if let Some(c) = p.cpu {
                samples(&mut cpu, peer).push(c / gib);
            }
        })
        .await?;
        // The shaper checked by itself on the direct pulls: the body comes at the rate (its
        // first chunk is already in at the first byte), the first byte a round trip plus the
        // upstream's own latency after the request.
        let wire = shape.wire_time(blob.size as usize).as_secs_f64();
        let ideal = wire + 2.0 * shape.delay.as_secs_f64();
        if let (Some(first), Some(body), Some(total)) = (
            direct_first.median(),
            direct_body.median(),
            time.reference.as_ref().and_then(|(_, s)| s.median()),
        ) {
            println!(
                "the link alone: {} ÷ {} + 2 × {} ms = {ideal:.3} s; direct pulls (medians): \
                 {total:.3} s, of which the body {body:.3} s (the rate: {wire:.3} s) after a \
                 first byte at {:.1} ms (round trip {} ms + the upstream's own latency)",
                size_label(blob.size),
                rate_label(shape),
                shape.delay.as_millis(),
                first * 1e3,
                2 * shape.delay.as_millis(),
            );
            if body < wire * 0.97 || body > wire * 1.05 || first < 2.0 * shape.delay.as_secs_f64() {
                time.warnings.push(format!(
                    "direct pulls: body in {body:.3} s (the rate: {wire:.3} s), first byte at \
                     {:.1} ms: the shaper is off (or the machine is busy)",
                    first * 1e3
                ));
            }
        }
        self.limits_rows.extend([time, first, cpu]);
        Ok(())
    }
}
