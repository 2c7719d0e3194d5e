//! Mutual authentication of migration peers holding the same key (`--auth-key FILE`),
//! before any state is sent or accepted: HMAC-SHA256 challenge and response, each side
//! proving it knows the key over the other side's fresh nonce.
//!
//! source -> destination: Auth { nonce_s }
//! destination -> source: Auth { nonce_d, mac_d = HMAC(key, "popek-dst" | nonce_s | nonce_d) }
//! source -> destination: Auth { mac_s = HMAC(key, "popek-src" | nonce_d | nonce_s) }

use super::protocol::{self, Kind};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{Read, Write};
use std::path::Path;

type HmacSha256 = Hmac<Sha256>;

/// Shortest key accepted.
pub const MIN_KEY: usize = 16;

/// A migration key.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key(<{} bytes>)", self.0.len())
    }
}

impl Key {
    /// Reads a key file (at least 16 bytes; surrounding whitespace is not part of it).
    pub fn load(path: &Path) -> Result<Key, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read the auth key {}: {e}", path.display()))?;
        let text_trimmed = bytes.trim_ascii().to_vec();
        if text_trimmed.len() < MIN_KEY {
            return Err(format!("the auth key {} is shorter than {MIN_KEY} bytes", path.display()));
        }
        Ok(Key(text_trimmed))
    }

    fn mac(&self, label: &[u8], a: &[u8], b: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(label);
        mac.update(a);
        mac.update(b);
        mac
    }
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Auth {
    #[serde(default)]
    nonce: Vec<u8>,
    #[serde(default)]
    mac: Vec<u8>,
}

pub fn nonce() -> Result<Vec<u8>, String> {
    let mut n = vec![0u8; 32];
    // SAFETY: getrandom writes at most n.len() bytes into n.
    let got = unsafe { libc::getrandom(n.as_mut_ptr().cast(), n.len(), 0) };
    if got != n.len() as isize {
        return Err("no randomness for the authentication nonce".into());
    }
    Ok(n)
}

fn chain(e: protocol::Error) -> String {
    super::source::chain(&e)
}

/// The source's side of the handshake.
pub fn prove_source<S: Read + Write>(stream: &mut S, key: &Key) -> Result<(), String> {
    let nonce_s = nonce()?;
    protocol::write_json(stream, Kind::Auth, &Auth { nonce: nonce_s.clone(), mac: vec![] }).map_err(chain)?;
    let reply: Auth = protocol::read_json(stream, Kind::Auth).map_err(chain)?;
    key.mac(b"popek-dst", &nonce_s, &reply.nonce)
        .verify_slice(&reply.mac)
        .map_err(|_| "authentication failed: the destination does not hold the same key".to_string())?;
    let mac_s = key.mac(b"popek-src", &reply.nonce, &nonce_s).finalize().into_bytes().to_vec();
    protocol::write_json(stream, Kind::Auth, &Auth { nonce: vec![], mac: mac_s }).map_err(chain)
}

/// The destination's side: `first` is the first frame the source sent.
pub fn verify_source<S: Read + Write>(stream: &mut S, key: &Key, first: (Kind, Vec<u8>)) -> Result<(), String> {
    if first.0 != Kind::Auth {
        return Err("authentication required: the source sent no credentials (start it with --auth-key)".into());
    }
    let hello: Auth = serde_json::from_slice(&first.1).map_err(|e| format!("malformed Auth message: {e}"))?;
    if hello.nonce.len() != 32 {
        return Err("malformed Auth message: bad nonce".into());
    }
    let nonce_d = nonce()?;
    let mac_d = key.mac(b"popek-dst", &hello.nonce, &nonce_d).finalize().into_bytes().to_vec();
    protocol::write_json(stream, Kind::Auth, &Auth { nonce: nonce_d.clone(), mac: mac_d }).map_err(chain)?;
    let proof: Auth = protocol::read_json(stream, Kind::Auth).map_err(chain)?;
    key.mac(b"popek-src", &nonce_d, &hello.nonce)
        .verify_slice(&proof.mac)
        .map_err(|_| "authentication failed: the source does not hold the same key".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn run(src_key: &[u8], dst_key: &[u8]) -> (Result<(), String>, Result<(), String>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let (sk, dk) = (Key(src_key.to_vec()), Key(dst_key.to_vec()));
        let dst = std::thread::spawn(move || {
            let first = protocol::read_frame(&mut b).map_err(chain)?;
            let r = verify_source(&mut b, &dk, first);
            if r.is_err() {
                let _ = protocol::write_json(&mut b, Kind::Refuse, &protocol::Answer { reason: "no".into() });
            }
            r
        });
        let s = prove_source(&mut a, &sk);
        drop(a);
        (s, dst.join().unwrap())
    }

    #[test]
    fn same_key_passes_other_keys_fail() {
        let (s, d) = run(b"0123456789abcdef-key", b"0123456789abcdef-key");
        assert!(s.is_ok() && d.is_ok(), "{s:?} {d:?}");
        let (s, d) = run(b"0123456789abcdef-key", b"0123456789abcdef-KEY");
        assert!(s.is_err() && d.is_err(), "{s:?} {d:?}");
    }
}
