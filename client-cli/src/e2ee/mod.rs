//! End-to-end encryption in the client (spec `e2ee.md`): this device's Olm account and
//! keys published in the server's key directory, messages encrypted to every device of
//! the recipient and to the sender's own other devices (one Olm ciphertext per device,
//! E4), messages opened once and kept, device changes of peers announced, safety numbers.
//! The cryptography is vodozemac's; nothing here implements a primitive.
//!
//! - [`Crypto`]: one profile's device. [`Crypto::publish`] keeps the server stocked with
//!   one-time keys; [`Crypto::seal`] encrypts; [`Crypto::open_message`] decrypts (or finds what
//!   this device decrypted before); [`Crypto::devices_changed`] compares a user's devices
//!   with what was seen; [`Crypto::safety_number`] and [`Crypto::verify`].
//! - Opened messages keep their place in the client's types: the content of an opened
//!   message is the decrypted content under a client-local type (`e2ee+TYPE`), one that
//!   could not be opened carries its reason (`e2ee!`); [`shown`] reads them back.

mod store;

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, bail, Context};
use missive_spec::e2ee::{
    safety_number, ClaimedKey, DeviceKeys, Inner, OneTimeKey, Sealed, SealedFor, ALG_OLM_V1, CONTENT_ENCRYPTED,
};
use missive_spec::{codec, limits, Content, ConversationId, DeviceId, Message, UserId};
use serde::{Deserialize, Serialize};
use vodozemac::olm::{Account, AccountPickle, OlmMessage, Session, SessionConfig, SessionPickle};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature};

use crate::client::Client;
use crate::profile::Profile;

pub use store::{FILE as STORE_FILE, KEY_FILE};

/// How many one-time keys a device keeps on its server; below half, it uploads more.
pub const ONE_TIME_TARGET: u32 = 50;
/// The fallback key is replaced at most this often (when the one-time keys ran out).
const FALLBACK_ROTATION_MS: u64 = 24 * 3600 * 1000;
/// Content type prefix of an opened message in the client (never on the wire).
pub const OPENED_PREFIX: &str = "e2ee+";
/// Content type of a message that could not be opened; the body is the reason.
pub const UNDECRYPTABLE: &str = "e2ee!";

/// How a message's content is shown.
pub struct Shown<'a> {
    pub encrypted: bool,
    /// The content type: the inner one for an opened message.
    pub kind: &'a str,
    pub text: Option<&'a str>,
    pub body: &'a [u8],
    pub undecryptable: Option<&'a str>,
}

/// Reads a content as the commands show it: plain, opened or undecryptable.
pub fn shown(c: &Content) -> Shown<'_> {
    let text = |kind: &str| (kind == missive_spec::wire::CONTENT_TEXT).then(|| std::str::from_utf8(&c.body).ok()).flatten();
    if let Some(kind) = c.kind.strip_prefix(OPENED_PREFIX) {
        return Shown { encrypted: true, kind, text: text(kind), body: &c.body, undecryptable: None };
    }
    if c.kind == UNDECRYPTABLE {
        return Shown { encrypted: true, kind: CONTENT_ENCRYPTED, text: None, body: &[], undecryptable: std::str::from_utf8(&c.body).ok() };
    }
    Shown { encrypted: c.kind == CONTENT_ENCRYPTED, kind: &c.kind, text: text(&c.kind), body: &c.body, undecryptable: None }
}

/// Why a message was not encrypted and sent.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{0} has no device with keys, so the message cannot be encrypted; send it with --plaintext to send it unencrypted")]
    NoKeys(UserId),
    #[error("{0} published device keys before and now has none: the server may be stripping them; not sending in plaintext")]
    KeysVanished(UserId),
    #[error("{user}'s devices changed since you verified them ({what}); compare the safety number again with `missive verify {user}` before sending")]
    Unverified { user: UserId, what: String },
    #[error("the message is too long to encrypt for {devices} devices (at most {max} bytes of ciphertext)")]
    TooLong { devices: usize, max: usize },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// What changed in a user's devices since they were last seen.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeviceChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Devices whose keys changed under the same id: a substituted key.
    pub changed: Vec<String>,
}

impl DeviceChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    /// `new device ABC, keys of DEF changed`
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.added.is_empty() {
            parts.push(format!("new device {}", self.added.join(", ")));
        }
        if !self.changed.is_empty() {
            parts.push(format!("keys of device {} changed", self.changed.join(", ")));
        }
        if !self.removed.is_empty() {
            parts.push(format!("device {} removed", self.removed.join(", ")));
        }
        parts.join("; ")
    }
}

/// What one upload carries, kept until the server acknowledged it so that a retry sends
/// the same keys under the same ids.
#[derive(Serialize, Deserialize)]
struct PendingUpload {
    keys: Option<DeviceKeys>,
    fallback: Option<OneTimeKey>,
    one_time: Vec<OneTimeKey>,
}

/// One profile's device.
pub struct Crypto {
    store: store::Store,
    user: UserId,
    device: DeviceId,
    /// Announcements of device changes, for the command to print.
    notices: Vec<String>,
    /// This device's keys, once read from its account.
    own: Option<DeviceKeys>,
}

fn verify_sig(ed25519: &[u8], bytes: &[u8], sig: &[u8]) -> bool {
    let Ok(k) = <&[u8; 32]>::try_from(ed25519) else { return false };
    let (Ok(k), Ok(s)) = (Ed25519PublicKey::from_slice(k), Ed25519Signature::from_slice(sig)) else { return false };
    k.verify(bytes, &s).is_ok()
}

fn curve(bytes: &[u8]) -> anyhow::Result<Curve25519PublicKey> {
    Curve25519PublicKey::from_slice(bytes).map_err(|e| anyhow!("not a curve25519 key: {e}"))
}

impl Crypto {
    /// Opens the profile's device key store for the logged-in device.
    pub fn open(profile: &Profile, user: &UserId, device: &str) -> anyhow::Result<Crypto> {
        let device = DeviceId::parse(device).map_err(|e| anyhow!("the session's device id: {e}"))?;
        Ok(Crypto { store: store::Store::open(profile.dir())?, user: user.clone(), device, notices: Vec::new(), own: None })
    }

    /// Announcements gathered since the last call.
    pub fn take_notices(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notices)
    }

    fn load_account(&self, tx: &rusqlite::Connection, key: &[u8; 32]) -> anyhow::Result<Option<(Account, u64, Option<Vec<u8>>)>> {
        let Some((pickle, next, pending)) = store::account(tx, self.device.as_str())? else { return Ok(None) };
        let account = Account::from_pickle(AccountPickle::from_encrypted(&pickle, key).context("the device key store's account does not decrypt")?);
        Ok(Some((account, next, pending)))
    }

    /// This device's keys as its own account makes them (they never change: made once).
    fn device_keys_of_account(&mut self) -> anyhow::Result<DeviceKeys> {
        if let Some(k) = &self.own {
            return Ok(k.clone());
        }
        let Some((account, _, _)) = self.load_account(&self.store.conn, &self.store.key)? else {
            bail!("this device has no keys yet")
        };
        let k = self.device_keys(&account);
        self.own = Some(k.clone());
        Ok(k)
    }

    fn device_keys(&self, account: &Account) -> DeviceKeys {
        let ids = account.identity_keys();
        let mut k = DeviceKeys {
            sig: Vec::new(),
            user: self.user.clone(),
            device: self.device.clone(),
            ed25519: ids.ed25519.as_bytes().to_vec(),
            curve25519: ids.curve25519.to_bytes().to_vec(),
        };
        k.sig = account.sign(k.signed_bytes()).to_bytes().to_vec();
        k
    }

    fn signed_key(&self, account: &Account, id: u64, key: Curve25519PublicKey, fallback: bool) -> OneTimeKey {
        let mut k = OneTimeKey { id, key: key.to_bytes().to_vec(), sig: Vec::new() };
        k.sig = account.sign(k.signed_bytes(&self.user, &self.device, fallback)).to_bytes().to_vec();
        k
    }

    /// Makes sure the server has this device's keys and at least half of
    /// [`ONE_TIME_TARGET`] one-time keys (and a fallback key): builds an upload when
    /// needed, keeps it, sends it, and marks it published once acknowledged.
    pub async fn publish(&mut self, c: &Client) -> anyhow::Result<()> {
        let device = self.device.as_str().to_owned();
        // First, whatever upload is pending (or the device's first one).
        let pending: Option<Vec<u8>> = self.store.locked(|tx, key| match store::account(tx, &device)? {
            Some((_, _, pending)) => Ok(pending),
            None => {
                let mut account = Account::new();
                account.generate_one_time_keys(ONE_TIME_TARGET as usize);
                account.generate_fallback_key();
                let (up, next) = self.build_upload(&account, 1, true);
                let bytes = codec::encode(&up);
                store::save_account(tx, &device, &account.pickle().encrypt(key), next, Some(&bytes))?;
                Ok(Some(bytes))
            }
        })?;
        let count = match pending {
            Some(bytes) => self.send_pending(c, &bytes).await?,
            None => c.keys_upload(None, None, Vec::new()).await.context("cannot reach the key directory")?.0,
        };
        if count >= ONE_TIME_TARGET / 2 {
            return Ok(());
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let bytes = self.store.locked(|tx, key| {
            let Some((mut account, next, pending)) = self.load_account(tx, key)? else { bail!("the device key store lost its account") };
            // Another command built an upload meanwhile: that one goes, its keys under the
            // ids they were given, never numbered twice.
            if let Some(p) = pending {
                return Ok(p);
            }
            account.generate_one_time_keys((ONE_TIME_TARGET - count) as usize);
            // The fallback key is in use: a fresh one for the next strangers, at most once
            // a day, so that someone draining the one-time keys cannot rotate away a
            // fallback key a session is still being started with (vodozemac keeps two).
            let last = store::meta(tx, "fallback_ms")?.unwrap_or(0);
            if count == 0 && now.saturating_sub(last) > FALLBACK_ROTATION_MS {
                account.generate_fallback_key();
                store::set_meta(tx, "fallback_ms", now)?;
            }
            let (up, next) = self.build_upload(&account, next, false);
            let bytes = codec::encode(&up);
            store::save_account(tx, &device, &account.pickle().encrypt(key), next, Some(&bytes))?;
            Ok(bytes)
        })?;
        self.send_pending(c, &bytes).await?;
        Ok(())
    }

    /// The unpublished keys of the account as an upload, numbered from `next`.
    fn build_upload(&self, account: &Account, mut next: u64, with_keys: bool) -> (PendingUpload, u64) {
        let mut one_time = Vec::new();
        let mut keys: Vec<Curve25519PublicKey> = account.one_time_keys().into_values().collect();
        keys.sort_by_key(|k| k.to_bytes());
        for k in keys {
            one_time.push(self.signed_key(account, next, k, false));
            next += 1;
        }
        let fallback = account.fallback_key().into_values().next().map(|k| {
            let f = self.signed_key(account, next, k, true);
            next += 1;
            f
        });
        (PendingUpload { keys: with_keys.then(|| self.device_keys(account)), fallback, one_time }, next)
    }

    async fn send_pending(&mut self, c: &Client, bytes: &[u8]) -> anyhow::Result<u32> {
        let up: PendingUpload = codec::decode(bytes).context("the device key store's pending upload does not decode")?;
        let (count, _) = c.keys_upload(up.keys, up.fallback, up.one_time).await.context("cannot publish this device's keys")?;
        let device = self.device.as_str().to_owned();
        self.store.locked(|tx, key| {
            let Some((mut account, next, pending)) = self.load_account(tx, key)? else { bail!("the device key store lost its account") };
            // Only what the server acknowledged is marked published (another command may
            // have sent and cleared it already).
            if pending.as_deref() == Some(bytes) {
                account.mark_keys_as_published();
                store::save_account(tx, &device, &account.pickle().encrypt(key), next, None)?;
            }
            Ok(())
        })?;
        Ok(count)
    }

    /// Whether the server acknowledged this device's keys.
    fn keys_published(&self) -> anyhow::Result<bool> {
        Ok(match store::account(&self.store.conn, self.device.as_str())? {
            None => false,
            Some((_, _, None)) => true,
            Some((_, _, Some(bytes))) => codec::decode::<PendingUpload>(&bytes).map(|p| p.keys.is_none()).unwrap_or(false),
        })
    }

    /// A user's devices from the key directory, each checked against its own signature;
    /// what changed since they were last seen is remembered and returned.
    pub async fn devices_changed(&mut self, c: &Client, user: &UserId) -> anyhow::Result<(Vec<DeviceKeys>, DeviceChanges)> {
        let all = c.keys_query(user).await.with_context(|| format!("cannot get the device keys of {user}"))?;
        if all.windows(2).any(|w| w[0].device.as_str() >= w[1].device.as_str()) {
            bail!("the key directory lists a device of {user} twice, or out of order: not trusting it");
        }
        if *user == self.user {
            let mine = self.device_keys_of_account()?;
            if all.iter().any(|d| d.device == self.device && *d != mine) {
                bail!("the server lists this device with keys that are not its own: it may be trying to read your messages");
            }
        }
        let mut devices = Vec::new();
        for d in all {
            if d.user == *user && d.well_formed() && verify_sig(&d.ed25519, &d.signed_bytes(), &d.sig) {
                devices.push(d);
            } else {
                self.notices.push(format!("ignoring device {} of {user}: its keys are not signed by itself", d.device));
            }
        }
        let now: BTreeMap<String, (Vec<u8>, Vec<u8>)> =
            devices.iter().map(|d| (d.device.as_str().to_owned(), (d.ed25519.clone(), d.curve25519.clone()))).collect();
        let (first_sight, changes) = self.store.locked(|tx, _| {
            let seen: BTreeMap<String, (Vec<u8>, Vec<u8>)> =
                store::known_devices(tx, user.as_str())?.into_iter().map(|(d, e, c)| (d, (e, c))).collect();
            let mut changes = DeviceChanges::default();
            for (d, k) in &now {
                match seen.get(d) {
                    None => changes.added.push(d.clone()),
                    Some(old) if old != k => changes.changed.push(d.clone()),
                    Some(_) => {}
                }
            }
            changes.removed = seen.keys().filter(|d| !now.contains_key(*d)).cloned().collect();
            // Whether the user ever listed keys, not whether a list is kept now: an empty
            // answer must not make the next list look like a first sight.
            let first_sight = !store::peer(tx, user.as_str())?.0;
            if !now.is_empty() {
                let rows: Vec<(String, Vec<u8>, Vec<u8>)> = now.iter().map(|(d, (e, c))| (d.clone(), e.clone(), c.clone())).collect();
                // Written only when something changed: a write is a synced commit.
                if first_sight || !changes.is_empty() {
                    store::set_known_devices(tx, user.as_str(), &rows)?;
                }
            }
            Ok((first_sight, changes))
        })?;
        if !first_sight && !changes.is_empty() {
            self.notices.push(match *user == self.user {
                false => format!("warning: {user}'s devices changed: {}. Compare safety numbers with `missive verify {user}`", changes.describe()),
                true => format!(
                    "warning: your devices changed: {}. If you did not do this, your server may be adding devices to read your messages",
                    changes.describe()
                ),
            });
        }
        Ok((devices, changes))
    }

    /// A user's devices as last seen (their signatures were checked then).
    fn known_devices(&self, user: &UserId) -> anyhow::Result<Vec<DeviceKeys>> {
        let rows = store::known_devices(&self.store.conn, user.as_str())?;
        Ok(rows
            .into_iter()
            .filter_map(|(d, ed25519, curve25519)| {
                Some(DeviceKeys { sig: Vec::new(), user: user.clone(), device: DeviceId::parse(&d).ok()?, ed25519, curve25519 })
            })
            .collect())
    }

    /// The safety number of this user and `peer` (E6), from the key directory.
    pub async fn safety_number(&mut self, c: &Client, peer: &UserId) -> anyhow::Result<String> {
        let (mine, _) = self.devices_changed(c, &self.user.clone()).await?;
        let (theirs, _) = self.devices_changed(c, peer).await?;
        if theirs.is_empty() {
            bail!("{peer} has no device with keys: there is nothing to verify");
        }
        Ok(self.number_of(peer, &mine, &theirs))
    }

    /// The safety number of this user's devices `mine` and `peer`'s `theirs`.
    fn number_of(&self, peer: &UserId, mine: &[DeviceKeys], theirs: &[DeviceKeys]) -> String {
        let fp = |ds: &[DeviceKeys]| ds.iter().map(|d| (d.device.clone(), d.ed25519.clone())).collect::<Vec<_>>();
        let (m, t) = (fp(mine), fp(theirs));
        let m: Vec<(&DeviceId, &[u8])> = m.iter().map(|(d, k)| (d, k.as_slice())).collect();
        let t: Vec<(&DeviceId, &[u8])> = t.iter().map(|(d, k)| (d, k.as_slice())).collect();
        safety_number((&self.user, &m), (peer, &t))
    }

    /// Marks `peer` verified with the safety number shown: both users' devices as they
    /// are now (a device added on either side later ends it).
    pub fn verify(&mut self, peer: &UserId, number: &str) -> anyhow::Result<()> {
        store::set_verified(&self.store.conn, peer.as_str(), number)
    }

    /// Whether `peer` is verified, and whether both users' devices still match.
    pub fn verified(&self, peer: &UserId, mine: &[DeviceKeys], theirs: &[DeviceKeys]) -> anyhow::Result<Option<bool>> {
        let (_, verified) = store::peer(&self.store.conn, peer.as_str())?;
        Ok(verified.map(|v| v == self.number_of(peer, mine, theirs)))
    }

    /// Encrypts `content` for every device of `to` and this user's other devices (E4).
    /// Sessions missing are made from claimed one-time keys, each checked against its
    /// device's signature.
    pub async fn seal(&mut self, c: &Client, to: &UserId, content: &Content) -> Result<Content, SealError> {
        // One-time keys running low do not stop a message; unpublished device keys do
        // (nobody could open it).
        if let Err(e) = self.publish(c).await {
            if !self.keys_published()? {
                return Err(SealError::Other(e));
            }
            self.notices.push(format!("warning: cannot publish new one-time keys: {e:#}"));
        }
        let (theirs, changes) = match self.devices_changed(c, to).await {
            // The recipient's server is away: the devices last seen do, as long as every
            // one of them has a session already (nothing to claim).
            Err(e) if remote_unavailable(&e) => {
                let known = self.known_devices(to)?;
                let all_have_sessions = !known.is_empty()
                    && known.iter().all(|d| store::sessions(&self.store.conn, self.device.as_str(), &d.curve25519).is_ok_and(|s| !s.is_empty()));
                if !all_have_sessions {
                    return Err(SealError::Other(e));
                }
                (known, DeviceChanges::default())
            }
            r => r?,
        };
        if theirs.is_empty() {
            return Err(match store::peer(&self.store.conn, to.as_str())?.0 {
                true => SealError::KeysVanished(to.clone()),
                false => SealError::NoKeys(to.clone()),
            });
        }
        let (all_mine, my_changes) = self.devices_changed(c, &self.user.clone()).await?;
        if self.verified(to, &all_mine, &theirs)? == Some(false) {
            let what = match (changes.is_empty(), my_changes.is_empty()) {
                (false, _) => changes.describe(),
                (true, false) => format!("your own devices changed: {}", my_changes.describe()),
                (true, true) => "the devices of one of you differ from the verified ones".to_owned(),
            };
            return Err(SealError::Unverified { user: to.clone(), what });
        }
        let mine: Vec<DeviceKeys> = all_mine.into_iter().filter(|d| d.device != self.device).collect();
        let inner = Inner { conv: ConversationId::one_to_one(&self.user, to), from: self.user.clone(), content: content.clone() };
        let plaintext = codec::encode(&inner);
        // Claims for devices with no session yet, one request per user. Bounded by the
        // devices asked for: a key for any other device in the answer is dropped.
        let mut claimed: BTreeMap<(UserId, DeviceId), ClaimedKey> = BTreeMap::new();
        for (user, devices) in [(to, &theirs), (&self.user.clone(), &mine)] {
            let want: Vec<DeviceId> = devices
                .iter()
                .filter(|d| store::sessions(&self.store.conn, self.device.as_str(), &d.curve25519).map(|s| s.is_empty()).unwrap_or(true))
                .map(|d| d.device.clone())
                .collect();
            if !want.is_empty() {
                let keys = c.keys_claim(user, want.clone()).await.with_context(|| format!("cannot claim one-time keys of {user}"))?;
                for k in keys.into_iter().filter(|k| want.contains(&k.device)) {
                    claimed.insert((user.clone(), k.device.clone()), k);
                }
            }
        }
        let device = self.device.as_str().to_owned();
        let (user, me) = (self.user.clone(), self.device.clone());
        let mut skipped = Vec::new();
        let own_curve = self.device_keys_of_account()?.curve25519;
        let sealed = self.store.locked(|tx, key| {
            // Loading the account costs a scalar multiplication per one-time key it holds:
            // only when a session is to be made.
            let mut account: Option<Account> = None;
            let mut to_list = Vec::new();
            for d in theirs.iter().chain(mine.iter()) {
                let mut session = match store::sessions(tx, &device, &d.curve25519)?.into_iter().next() {
                    Some((_, pickle)) => Session::from_pickle(SessionPickle::from_encrypted(&pickle, key).context("a session does not decrypt")?),
                    None => {
                        let Some(k) = claimed.get(&(d.user.clone(), d.device.clone())) else {
                            skipped.push(format!("{} {}", d.user, d.device));
                            continue;
                        };
                        if !k.key.well_formed() || !verify_sig(&d.ed25519, &k.key.signed_bytes(&d.user, &d.device, k.fallback), &k.key.sig) {
                            skipped.push(format!("{} {} (its one-time key is not signed by the device)", d.user, d.device));
                            continue;
                        }
                        if account.is_none() {
                            let Some((a, _, _)) = self.load_account(tx, key)? else { bail!("this device has no keys yet") };
                            account = Some(a);
                        }
                        let Some(account) = account.as_ref() else { bail!("this device has no keys yet") };
                        account
                            .create_outbound_session(SessionConfig::version_1(), curve(&d.curve25519)?, curve(&k.key.key)?)
                            .map_err(|e| anyhow!("cannot start a session with {} {}: {e}", d.user, d.device))?
                    }
                };
                let msg = session.encrypt(&plaintext).map_err(|e| anyhow!("encryption failed: {e}"))?;
                let (kind, body) = msg.to_parts();
                to_list.push(SealedFor { body, kind: kind as u8, user: d.user.clone(), device: d.device.clone(), session: session.session_id() });
                store::save_session(tx, &device, &d.curve25519, &session.session_id(), &session.pickle().encrypt(key))?;
            }
            if to_list.iter().all(|s| s.user != *to) {
                bail!("no device of {to} could be encrypted to ({})", skipped.join(", "));
            }
            let devices = to_list.len();
            let sealed = Sealed { to: to_list, alg: ALG_OLM_V1.to_owned(), sender: me.clone(), sender_key: own_curve.clone() };
            let body = codec::encode(&sealed);
            if body.len() > limits::MAX_CONTENT_BODY {
                // Rolled back: the sessions stay where they were.
                bail!(SealError::TooLong { devices, max: limits::MAX_CONTENT_BODY });
            }
            // In the same write as the sessions: one synced commit per message.
            store::save_sent(tx, &body, &codec::encode(content), ConversationId::one_to_one(&user, to).as_bytes())?;
            Ok(body)
        });
        let body = match sealed {
            Ok(b) => b,
            Err(e) => return Err(e.downcast::<SealError>().unwrap_or_else(SealError::Other)),
        };
        for s in skipped {
            self.notices.push(format!("warning: not encrypted to device {s}: no one-time key"));
        }
        Ok(Content { body, kind: CONTENT_ENCRYPTED.to_owned() })
    }

    /// Remembers what this device sent, so that it shows its own message (no ciphertext
    /// is made for the sending device).
    pub fn keep_sent(&mut self, m: &Message, sealed: &Content, content: &Content) -> anyhow::Result<()> {
        if m.content != *sealed || m.from != self.user || m.conv != ConversationId::one_to_one(&self.user, &m.to) {
            bail!("the server answered the send with another message than the one sent");
        }
        store::save_opened(&self.store.conn, m.conv.as_bytes(), m.origin.as_str(), m.seq, &codec::encode(content), m.from.as_str())?;
        store::forget_sent(&self.store.conn, &m.content.body)
    }

    /// The message as it is shown: opened (or as this device opened it before), with a
    /// reason when it cannot be, or unchanged when it is not encrypted.
    pub async fn open_message(&mut self, c: &Client, m: &Message) -> Message {
        if m.content.kind != CONTENT_ENCRYPTED {
            return m.clone();
        }
        let content = match self.open_content(c, m).await {
            Ok(inner) => Content { kind: format!("{OPENED_PREFIX}{}", inner.kind), body: inner.body },
            Err(why) => Content { kind: UNDECRYPTABLE.to_owned(), body: why.into_bytes() },
        };
        Message { content, ..m.clone() }
    }

    async fn open_content(&mut self, c: &Client, m: &Message) -> Result<Content, String> {
        let id = (m.conv.as_bytes().to_vec(), m.origin.as_str().to_owned(), m.seq);
        let kept = |tx: &rusqlite::Connection| -> Result<Option<Content>, String> {
            match store::opened(tx, &id.0, &id.1, id.2).map_err(|e| e.to_string())? {
                Some((content, sender)) if sender == m.from.as_str() => {
                    codec::decode(&content).map(Some).map_err(|e| format!("kept content does not decode: {e}"))
                }
                Some(_) => Err("another sender's message was kept under this message's place".to_owned()),
                None => Ok(None),
            }
        };
        if let Some(content) = kept(&self.store.conn)? {
            return Ok(content);
        }
        let sealed: Sealed = codec::decode(&m.content.body).map_err(|e| format!("not an encrypted payload: {e}"))?;
        if sealed.alg != ALG_OLM_V1 {
            return Err(format!("unknown algorithm {}", sealed.alg));
        }
        // One of this device's own: what it carries was kept when it was sealed, for the
        // conversation it was sealed for.
        if m.from == self.user && sealed.sender == self.device {
            return match store::sent(&self.store.conn, &m.content.body).map_err(|e| e.to_string())? {
                Some((content, conv)) if conv == m.conv.as_bytes() => {
                    let _ = store::save_opened(&self.store.conn, &id.0, &id.1, id.2, &content, m.from.as_str());
                    codec::decode(&content).map_err(|e| format!("kept content does not decode: {e}"))
                }
                Some(_) => Err("sent by this device in another conversation".to_owned()),
                None => Err("sent from this device before its key store kept it".to_owned()),
            };
        }
        let Some(mine) = sealed.to.iter().find(|s| s.user == self.user && s.device == self.device) else {
            return Err("not encrypted for this device (it was added after the message was sent, or the sender did not know it)".to_owned());
        };
        // The sending device must be one of the sender's, as the key directory says.
        let sender_known = |s: &mut Self| -> bool {
            store::known_devices(&s.store.conn, m.from.as_str())
                .map(|ds| ds.iter().any(|(d, _, curve)| *d == sealed.sender.as_str() && *curve == sealed.sender_key))
                .unwrap_or(false)
        };
        if !sender_known(self) {
            let _ = self.devices_changed(c, &m.from).await;
            if !sender_known(self) {
                return Err(format!("sent from device {} which {} does not list with that key", sealed.sender, m.from));
            }
        }
        let device = self.device.as_str().to_owned();
        let (conv, from) = (m.conv, m.from.clone());
        let result = self.store.locked(|tx, key| {
            if let Some(content) = kept(tx).map_err(|e| anyhow!(e))? {
                return Ok(Ok(content));
            }
            let opened = match OlmMessage::from_parts(mine.kind as usize, &mine.body) {
                Err(e) => Err(format!("not an Olm message: {e}")),
                Ok(olm) => decrypt(tx, key, &device, &sealed.sender_key, &mine.session, &olm),
            };
            let opened = opened.and_then(|plain| {
                let inner: Inner = codec::decode(&plain).map_err(|e| format!("the plaintext does not decode: {e}"))?;
                if inner.conv != conv || inner.from != from {
                    return Err("the plaintext belongs to another conversation or sender".to_owned());
                }
                Ok(inner.content)
            });
            // Only what opened is kept: a failure may be tried again (a session that
            // arrives later, a store that was busy).
            if let Ok(content) = &opened {
                store::save_opened(tx, &id.0, &id.1, id.2, &codec::encode(content), from.as_str())?;
            }
            Ok(opened)
        });
        result.map_err(|e| e.to_string())?
    }
}

/// Decrypts one Olm message. A pre-key message names its session itself (its base and
/// one-time keys): with a session of that id, only that session may open it, so a replayed
/// pre-key message never starts a second session over a used one; without, a new inbound
/// session is made (taking the one-time key out of the account). A normal message is tried
/// with the session the envelope names, then with every other session of the sender's key.
/// Sessions and account are saved in the caller's transaction.
fn decrypt(tx: &rusqlite::Transaction<'_>, key: &[u8; 32], device: &str, sender_key: &[u8], session_hint: &str, olm: &OlmMessage) -> Result<Vec<u8>, String> {
    let inner = || -> anyhow::Result<Result<Vec<u8>, String>> {
        let sessions = store::sessions(tx, device, sender_key)?;
        let try_session = |pickle: &str| -> anyhow::Result<Option<Vec<u8>>> {
            let mut s = Session::from_pickle(SessionPickle::from_encrypted(pickle, key)?);
            match s.decrypt(olm) {
                Ok(p) => {
                    store::save_session(tx, device, sender_key, &s.session_id(), &s.pickle().encrypt(key))?;
                    Ok(Some(p))
                }
                Err(_) => Ok(None),
            }
        };
        if let OlmMessage::PreKey(pre) = olm {
            let id = pre.session_id();
            if let Some((_, pickle)) = sessions.iter().find(|(sid, _)| *sid == id) {
                return Ok(try_session(pickle)?.ok_or_else(|| "cannot decrypt: the message was opened before, or is forged".to_owned()));
            }
            let Some((pickle, next, pending)) = store::account(tx, device)? else { return Ok(Err("this device has no keys".into())) };
            let mut account = Account::from_pickle(AccountPickle::from_encrypted(&pickle, key)?);
            return Ok(match account.create_inbound_session(SessionConfig::version_1(), curve(sender_key)?, pre) {
                Ok(r) => {
                    store::save_session(tx, device, sender_key, &r.session.session_id(), &r.session.pickle().encrypt(key))?;
                    store::save_account(tx, device, &account.pickle().encrypt(key), next, pending.as_deref())?;
                    Ok(r.plaintext)
                }
                Err(e) => Err(format!("cannot start the session: {e}")),
            });
        }
        let ordered = sessions.iter().filter(|(sid, _)| sid == session_hint).chain(sessions.iter().filter(|(sid, _)| sid != session_hint));
        for (_, pickle) in ordered {
            if let Some(p) = try_session(pickle)? {
                return Ok(Ok(p));
            }
        }
        Ok(Err(match sessions.is_empty() {
            true => "no session for this message (its first message never reached this device)".to_owned(),
            false => "cannot decrypt: no session of the sender opens it (opened before, or forged)".to_owned(),
        }))
    };
    inner().unwrap_or_else(|e| Err(e.to_string()))
}

/// Devices named in a sealed message, for tests and diagnostics: (user, device).
pub fn recipients(content: &Content) -> Option<BTreeSet<(String, String)>> {
    let sealed: Sealed = codec::decode(&content.body).ok()?;
    Some(sealed.to.iter().map(|s| (s.user.as_str().to_owned(), s.device.as_str().to_owned())).collect())
}

/// Why a message was not sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
}

/// Whether an error says the other user's server could not be reached.
fn remote_unavailable(e: &anyhow::Error) -> bool {
    use crate::client::ClientError;
    e.chain().any(|c| {
        matches!(c.downcast_ref::<ClientError>(), Some(ClientError::Server { code: missive_spec::ErrorCode::RemoteUnavailable, .. }))
    })
}

impl SendError {
    /// Whether the message should wait in the outbox and go later: the homeserver, or the
    /// recipient's server it asks for keys, could not be reached.
    pub fn is_later(&self) -> bool {
        self.is_connection() || matches!(self, SendError::Seal(SealError::Other(e)) if remote_unavailable(e))
    }

    /// The server's refusal behind the error, if a server refused: its code and message.
    pub fn refusal(&self) -> Option<(missive_spec::ErrorCode, String)> {
        use crate::client::ClientError;
        match self {
            SendError::Client(ClientError::Server { code, message }) => Some((*code, message.clone())),
            SendError::Seal(SealError::Other(e)) => e.chain().find_map(|c| match c.downcast_ref::<ClientError>() {
                Some(ClientError::Server { code, message }) => Some((*code, message.clone())),
                _ => None,
            }),
            _ => None,
        }
    }

    /// Whether the homeserver could not be reached.
    pub fn is_connection(&self) -> bool {
        use crate::client::ClientError;
        match self {
            SendError::Client(ClientError::Connection(_)) => true,
            SendError::Client(_) => false,
            SendError::Seal(SealError::Other(e)) => {
                e.chain().any(|c| matches!(c.downcast_ref::<ClientError>(), Some(ClientError::Connection(_))))
            }
            SendError::Seal(_) => false,
        }
    }
}

/// Sends a text message: encrypted to every device of `to` and of the sender (E4) unless
/// `plaintext`. The message returned shows the text, as [`Crypto::open_message`] would.
pub async fn send_text(
    c: &Client,
    crypto: &mut Crypto,
    to: &UserId,
    text: &str,
    id: missive_spec::ClientMsgId,
    plaintext: bool,
) -> Result<Message, SendError> {
    let content = Content::text(text);
    if plaintext {
        return Ok(c.send(to, content, id).await?);
    }
    let sealed = crypto.seal(c, to, &content).await?;
    let m = c.send(to, sealed.clone(), id).await?;
    crypto.keep_sent(&m, &sealed, &content).map_err(SealError::Other)?;
    // (`m` carries the sealed body; what it shows is the text.)
    Ok(Message { content: Content { kind: format!("{OPENED_PREFIX}{}", content.kind), body: content.body }, ..m })
}

impl Crypto {
    /// Opens the messages among events, in place, and looks again at the devices of every
    /// user a `devices` event names (announcing changes through the notices).
    pub async fn open_events(&mut self, c: &Client, events: &mut [missive_spec::Event]) {
        let mut first_messages = false;
        for e in events.iter_mut() {
            match &e.event {
                missive_spec::EventKind::Message(m) => {
                    first_messages |= self.uses_one_time_key(m);
                    let opened = self.open_message(c, m).await;
                    e.event = missive_spec::EventKind::Message(opened);
                }
                missive_spec::EventKind::Devices(d) => {
                    let user = d.user.clone();
                    if let Err(err) = self.devices_changed(c, &user).await {
                        self.notices.push(format!("warning: {err:#}"));
                    }
                }
                _ => {}
            }
        }
        // Pre-key messages used up one-time keys: the server gets new ones.
        if first_messages {
            if let Err(e) = self.publish(c).await {
                self.notices.push(format!("warning: cannot publish new one-time keys: {e:#}"));
            }
        }
    }

    /// Whether a message starts a session with this device (a pre-key message for it).
    fn uses_one_time_key(&self, m: &Message) -> bool {
        if m.content.kind != CONTENT_ENCRYPTED {
            return false;
        }
        let Ok(sealed) = codec::decode::<Sealed>(&m.content.body) else { return false };
        sealed.to.iter().any(|s| s.user == self.user && s.device == self.device && s.kind == missive_spec::e2ee::OLM_PRE_KEY)
    }

    /// Opens messages, in place, oldest first whatever their order (a history page is
    /// newest first): a ratchet keeps only so many keys of messages it skipped.
    pub async fn open_messages(&mut self, c: &Client, messages: &mut [Message]) {
        let mut order: Vec<usize> = (0..messages.len()).collect();
        order.sort_by_key(|i| messages[*i].order_key());
        for i in order {
            let m = &mut messages[i];
            *m = self.open_message(c, m).await;
        }
    }
}
