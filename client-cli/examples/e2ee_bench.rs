//! What end-to-end encryption costs a client per message. Prints figures; asserts no time.
//!
//!     cargo run --release -p missive-cli --example e2ee_bench [-- MESSAGES]
//!
//! Starts a real `missived` (the one built beside this program; `MISSIVED_BIN` names another)
//! with alice and bob, each with two devices (four `Crypto` stores in temporary profiles),
//! then:
//! - **Olm alone**: vodozemac's encrypt and decrypt of one message, no store: the floor.
//! - **seal**: `Crypto::seal` of a 100-byte text for bob's two devices and alice's other
//!   one, as `missive send` does it, with its three requests to the server (the key count,
//!   bob's devices, alice's own) and the SQLite transaction that saves the sessions;
//!   then the same with those requests taken out (`seal, local part`).
//! - **open**: `Crypto::open_message` on bob's device of each message as `sync` brings it
//!   (one SQLite transaction, one Olm decrypt).
//! - the sealed body's size against the text's, which is what the server stores and sends.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use missive_cli::e2ee::{send_text, Crypto};
use missive_cli::profile::{Profile, SessionFile};
use missive_cli::Client;
use missive_conformance::harness::{workspace_bin, ServerProcess};
use missive_spec::{Content, ServerName, UserId};
use vodozemac::olm::{Account, SessionConfig};

const TEXT_BYTES: usize = 100;

fn us(h: &Histogram<u64>) -> String {
    format!(
        "p50 {:>7.1} µs  p99 {:>7.1} µs  mean {:>7.1} µs",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.mean() / 1000.0
    )
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record(d.as_nanos().max(1) as u64);
}

/// A logged-in device: its client and its key store in a profile of its own.
async fn device(srv: &ServerProcess, dir: &std::path::Path, user: &UserId, password: &str) -> anyhow::Result<(Client, Crypto)> {
    let name = ServerName::parse(srv.name.as_str())?;
    let mut c = Client::connect(srv.addr, &name, missive_transport::tls::Pin::FirstUse).await?;
    let session = c.login(user, password, None).await?;
    let profile = Profile::open(dir)?;
    let s = SessionFile { user: user.clone(), server: srv.addr.to_string(), device: session.device, token: session.token, sync_pos: 0 };
    profile.save_session(&s)?;
    let mut crypto = Crypto::open(&profile, user, &s.device)?;
    crypto.publish(&c).await?;
    Ok((c, crypto))
}

fn olm_alone(n: usize) -> (Histogram<u64>, Histogram<u64>) {
    let (alice, mut bob) = (Account::new(), Account::new());
    bob.generate_one_time_keys(1);
    let otk = *bob.one_time_keys().values().next().expect("one key");
    let mut out = alice.create_outbound_session(SessionConfig::version_1(), bob.curve25519_key(), otk).expect("session");
    let first = out.encrypt(b"hello").expect("encrypt");
    let vodozemac::olm::OlmMessage::PreKey(pre) = first else { panic!("the first message is a pre-key message") };
    let mut inbound = bob.create_inbound_session(SessionConfig::version_1(), alice.curve25519_key(), &pre).expect("inbound").session;
    let text = vec![b'x'; TEXT_BYTES];
    let (mut enc, mut dec) = (hist(), hist());
    for _ in 0..n {
        let t = Instant::now();
        let m = out.encrypt(&text).expect("encrypt");
        record(&mut enc, t.elapsed());
        let t = Instant::now();
        inbound.decrypt(&m).expect("decrypt");
        record(&mut dec, t.elapsed());
    }
    (enc, dec)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(500);
    missive_transport::tls::install_provider();
    let tmp = tempfile::tempdir()?;
    let bin = workspace_bin("missived");
    let srv = ServerProcess::create(&bin, &tmp.path().join("srv"), "alpha.test", "closed").await?;
    srv.add_user("alice", "alice-password").await?;
    srv.add_user("bob", "bob-password").await?;
    let (alice, bob) = (UserId::parse("@alice:alpha.test")?, UserId::parse("@bob:alpha.test")?);
    let (a1, mut k1) = device(&srv, &tmp.path().join("a1"), &alice, "alice-password").await?;
    let (_a2, _k2) = device(&srv, &tmp.path().join("a2"), &alice, "alice-password").await?;
    let (b1, mut kb1) = device(&srv, &tmp.path().join("b1"), &bob, "bob-password").await?;
    let (_b2, _kb2) = device(&srv, &tmp.path().join("b2"), &bob, "bob-password").await?;

    let (olm_enc, olm_dec) = olm_alone(n);
    let text: String = "x".repeat(TEXT_BYTES);
    let content = Content::text(&text);
    // The first message makes the sessions (claims); the figures are for the ones after.
    send_text(&a1, &mut k1, &bob, &text, missive_cli::client::new_client_msg_id(), false).await?;
    let (mut seal, mut send, mut open) = (hist(), hist(), hist());
    let mut sealed_len = 0;
    for _ in 0..n {
        let t = Instant::now();
        let sealed = k1.seal(&a1, &bob, &content).await?;
        record(&mut seal, t.elapsed());
        sealed_len = sealed.body.len();
        let t = Instant::now();
        a1.send(&bob, sealed, missive_cli::client::new_client_msg_id()).await?;
        record(&mut send, t.elapsed());
    }
    // The local part of a seal: the same three requests timed alone, taken out.
    let mut requests = hist();
    for _ in 0..n {
        let t = Instant::now();
        a1.keys_upload(None, None, Vec::new()).await?;
        a1.keys_query(&bob).await?;
        a1.keys_query(&alice).await?;
        record(&mut requests, t.elapsed());
    }
    let mut since = 0;
    let mut opened = 0;
    while opened < n + 1 {
        let page = b1.sync_page(since, None).await?;
        since = page.next;
        for e in &page.events {
            if let missive_spec::EventKind::Message(m) = &e.event {
                let t = Instant::now();
                let shown = kb1.open_message(&b1, m).await;
                record(&mut open, t.elapsed());
                anyhow::ensure!(missive_cli::e2ee::shown(&shown.content).text == Some(text.as_str()), "bob could not read a message");
                opened += 1;
            }
        }
        if page.events.is_empty() {
            break;
        }
    }
    println!("end-to-end encryption, client side: {n} messages of {TEXT_BYTES} bytes, alice (2 devices) to bob (2 devices), one local missived ({})", bin.display());
    println!("  Olm alone, encrypt          {}", us(&olm_enc));
    println!("  Olm alone, decrypt          {}", us(&olm_dec));
    println!("  seal (with 3 requests)      {}", us(&seal));
    println!("  the 3 requests alone        {}", us(&requests));
    println!(
        "  seal, local part (mean)     {:>7.1} µs   (seal mean less the requests' mean)",
        (seal.mean() - requests.mean()) / 1000.0
    );
    println!("  send of the sealed message  {}", us(&send));
    println!("  open (decrypt + keep)       {}", us(&open));
    println!("  body: text {TEXT_BYTES} bytes, sealed for 3 devices {sealed_len} bytes");
    Ok(())
}
