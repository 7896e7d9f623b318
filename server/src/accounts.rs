//! Passwords (argon2id, PHC strings), access tokens (random, stored as SHA-256) and
//! device ids.

use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use missive_spec::{limits, DeviceId};
use rand::{Rng, RngCore};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Checks a new password against the limits of spec §6.2.
pub fn check_password(password: &str) -> Result<(), ApiError> {
    let n = password.len();
    if !(limits::MIN_PASSWORD_LEN..=limits::MAX_PASSWORD_LEN).contains(&n) {
        return Err(ApiError::invalid(format!(
            "password must be {} to {} bytes long",
            limits::MIN_PASSWORD_LEN,
            limits::MAX_PASSWORD_LEN
        )));
    }
    Ok(())
}

thread_local! {
    /// Argon2 working memory (19 MiB with the default parameters), allocated once per
    /// thread and reused: allocating it per hash lets the allocator keep a copy per
    /// thread that ever hashed. Only the few hashing threads (`hashing.rs`) fill it.
    static BLOCKS: std::cell::RefCell<Vec<argon2::Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The raw argon2id output of `password` and `salt` under `params`, in this thread's
/// reused working memory.
fn argon2id(params: argon2::Params, password: &[u8], salt: &[u8], out: &mut [u8]) -> argon2::Result<()> {
    let a = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    BLOCKS.with(|b| {
        let mut blocks = b.borrow_mut();
        let need = a.params().block_count();
        if blocks.len() < need {
            blocks.resize(need, argon2::Block::default());
        }
        a.hash_password_into_with_memory(password, salt, out, &mut blocks[..need])
    })
}

/// argon2id PHC string of `password` with a fresh salt. Slow on purpose: call on a
/// hashing thread.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    let mut raw_salt = [0u8; 64];
    let params = argon2::Params::default();
    let mut out = [0u8; argon2::Params::DEFAULT_OUTPUT_LEN];
    // A generated salt decodes, and the default parameters hash any password under the
    // length limit: none of these can fail.
    let raw_salt = salt.as_salt().decode_b64(&mut raw_salt).expect("generated salt decodes");
    argon2id(params.clone(), password.as_bytes(), raw_salt, &mut out).expect("argon2id hashing");
    PasswordHash {
        algorithm: argon2::ARGON2ID_IDENT,
        version: Some(argon2::Version::V0x13.into()),
        params: (&params).try_into().expect("default argon2 parameters"),
        salt: Some(salt.as_salt()),
        hash: Some(argon2::password_hash::Output::new(&out).expect("argon2 output length")),
    }
    .to_string()
}

/// Verifies `password` against a stored PHC string (argon2id). Slow on purpose.
pub fn verify_password(password: &str, phc: &str) -> bool {
    let Ok(h) = PasswordHash::new(phc) else { return false };
    let (Ok(params), Some(salt), Some(want)) = (argon2::Params::try_from(&h), h.salt, h.hash) else { return false };
    if h.algorithm != argon2::ARGON2ID_IDENT {
        return Argon2::default().verify_password(password.as_bytes(), &h).is_ok();
    }
    let mut raw_salt = [0u8; 64];
    let Ok(raw_salt) = salt.decode_b64(&mut raw_salt) else { return false };
    let mut out = vec![0u8; want.len()];
    if argon2id(params, password.as_bytes(), raw_salt, &mut out).is_err() {
        return false;
    }
    // `Output` compares in constant time.
    argon2::password_hash::Output::new(&out).is_ok_and(|got| got == want)
}

/// Spends the same time as a real check, for logins to unknown users.
pub fn verify_dummy(password: &str) {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let phc = DUMMY.get_or_init(|| hash_password("missive-dummy-password"));
    let _ = verify_password(password, phc);
}

/// A new access token: 32 random bytes, base64url.
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("mt_{}", URL_SAFE_NO_PAD.encode(b))
}

pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new device id: 12 characters of A-Z and 0-9.
pub fn new_device_id() -> DeviceId {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::thread_rng();
    let s: String = (0..12).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect();
    // Built from the device-id alphabet, so always valid.
    DeviceId::parse(&s).expect("generated device id")
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Adds a user straight to the database of a server that is not running.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_themselves() {
        let h = hash_password("correct horse");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct horsf", &h));
        assert!(!verify_password("x", "not a phc string"));
    }

    #[test]
    fn hashes_agree_with_the_argon2_crate_both_ways() {
        use argon2::password_hash::PasswordHasher;
        let ours = hash_password("pw-1234567");
        assert!(Argon2::default().verify_password(b"pw-1234567", &PasswordHash::new(&ours).unwrap()).is_ok());
        let theirs = Argon2::default().hash_password(b"pw-1234567", &SaltString::generate(&mut rand::rngs::OsRng)).unwrap().to_string();
        assert!(verify_password("pw-1234567", &theirs));
        assert!(!verify_password("pw-7654321", &theirs));
    }

    #[test]
    fn tokens_are_unique_and_hashed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_ne!(token_hash(&a), token_hash(&b));
    }
}
