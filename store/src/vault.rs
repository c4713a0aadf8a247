//! The credential vault: AES-256-GCM with a keyring of named master keys.
//!
//! Every encryption draws a fresh random 96-bit nonce and binds the ciphertext through the
//! associated data to its owner and to where it is sent ([`connection_aad`], version 2:
//! organization, connection id, and the destination fields), so a ciphertext copied into
//! another tenant's row, another connection's, or a row whose upstream URL, header or token
//! URL was changed fails to decrypt. Version 1 (organization and connection id only) still
//! opens the rows sealed before version 2; they are re-sealed as version 2.
//! Each sealed value records the id of the key that sealed it; the keyring's first key seals,
//! every key opens, so master keys rotate without downtime: add the new key in front, let rows
//! be re-encrypted, then drop the old key.
//!
//! The keyring comes from `NUBABEL_VAULT_KEYS`: `<id>=<base64 of 32 bytes>` entries separated
//! by commas, current key first (`k2=...,k1=...`).

use std::fmt;

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{Aead, Payload},
};
use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use zeroize::{Zeroize, Zeroizing};

/// Length of a master key, in bytes.
pub const KEY_BYTES: usize = 32;

/// Length of a nonce, in bytes (96 bits, as GCM wants).
pub const NONCE_BYTES: usize = 12;

/// Longest key id accepted.
pub const MAX_KEY_ID_LEN: usize = 32;

/// Why the vault refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    /// `NUBABEL_VAULT_KEYS` is malformed (the message says where; it never holds key bytes).
    #[error("NUBABEL_VAULT_KEYS: {0}")]
    InvalidKeyring(String),
    /// The value was sealed with a key id the keyring does not have.
    #[error("vault key {0:?} is not in the keyring")]
    UnknownKey(String),
    /// Authentication failed: a wrong key, tampered bytes, or associated data of another owner.
    #[error("the stored secret cannot be decrypted for this owner")]
    Decrypt,
    /// The nonce has the wrong length.
    #[error("the stored nonce is malformed")]
    MalformedNonce,
    /// The system random number generator failed.
    #[error("no randomness available for a nonce")]
    Random,
    /// Encryption failed (a plaintext too large for GCM).
    #[error("encryption failed")]
    Encrypt,
    /// The row names an associated-data version this build does not know.
    #[error("the stored secret has an unknown associated-data version {0}")]
    UnknownAadVersion(i16),
}

/// One named master key.
struct VaultKey {
    id: String,
    cipher: Aes256Gcm,
}

/// The master keys: the first seals, all open. Never printed.
pub struct Keyring {
    keys: Vec<VaultKey>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.key_ids().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A sealed secret as stored: key id, nonce and ciphertext (with the GCM tag).
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Id of the key that sealed it.
    pub key_id: String,
    /// The 96-bit nonce used.
    pub nonce: Vec<u8>,
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

/// Which associated data a connection's secrets are sealed with; stored beside the
/// ciphertext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AadVersion {
    /// `nubabel/connection/v1|<organization>|<connection id>`: the owner only.
    V1 = 1,
    /// The owner and the destination, length-prefixed (see [`connection_aad`]).
    V2 = 2,
}

impl AadVersion {
    /// The version new values are sealed with.
    pub const CURRENT: Self = Self::V2;

    /// The stored number.
    pub fn as_i16(self) -> i16 {
        self as i16
    }

    /// The version a stored number names.
    pub fn from_i16(value: i16) -> Result<Self, VaultError> {
        match value {
            1 => Ok(Self::V1),
            2 => Ok(Self::V2),
            other => Err(VaultError::UnknownAadVersion(other)),
        }
    }
}

/// Whose a connection's secrets are and where they may be sent: what they are bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionBinding<'a> {
    /// The tenant.
    pub organization_id: &'a str,
    /// The connection's row id.
    pub connection_id: &'a str,
    /// Where the secrets go, as (field, value) pairs in a fixed order: the auth kind, the
    /// upstream URL, the API key header, the token URL and client id.
    pub destination: &'a [(&'a str, &'a str)],
}

/// The associated data of a connection's secrets under `version`.
///
/// Version 2 is `nubabel/connection/v2` followed by every field as a 4-byte big-endian
/// length and its bytes (organization, connection id, then each destination name and
/// value), so no value can be read as part of another, whatever characters it holds.
pub fn connection_aad(version: AadVersion, binding: &ConnectionBinding<'_>) -> Vec<u8> {
    let ConnectionBinding {
        organization_id,
        connection_id,
        destination,
    } = binding;
    match version {
        AadVersion::V1 => {
            format!("nubabel/connection/v1|{organization_id}|{connection_id}").into_bytes()
        }
        AadVersion::V2 => {
            let mut aad = b"nubabel/connection/v2".to_vec();
            let fields = [*organization_id, *connection_id]
                .into_iter()
                .chain(destination.iter().flat_map(|(name, value)| [*name, *value]));
            for field in fields {
                let length = u32::try_from(field.len()).unwrap_or(u32::MAX);
                aad.extend_from_slice(&length.to_be_bytes());
                aad.extend_from_slice(field.as_bytes());
            }
            aad
        }
    }
}

impl Keyring {
    /// Parses `<id>=<base64 32 bytes>[,<id>=<base64>...]`, current key first.
    pub fn parse(spec: &str) -> Result<Self, VaultError> {
        let invalid = |message: String| VaultError::InvalidKeyring(message);
        let mut keys: Vec<VaultKey> = Vec::new();
        for (position, entry) in spec.split(',').map(str::trim).enumerate() {
            let entry_no = position + 1;
            if entry.is_empty() {
                return Err(invalid(format!("entry {entry_no} is empty")));
            }
            let Some((id, encoded)) = entry.split_once('=') else {
                return Err(invalid(format!(
                    "entry {entry_no} must be <key id>=<base64 of {KEY_BYTES} bytes>"
                )));
            };
            let id = id.trim();
            let id_ok = !id.is_empty()
                && id.len() <= MAX_KEY_ID_LEN
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !id_ok {
                return Err(invalid(format!(
                    "entry {entry_no}: the key id must be 1 to {MAX_KEY_ID_LEN} characters of [A-Za-z0-9_-]"
                )));
            }
            if keys.iter().any(|key| key.id == id) {
                return Err(invalid(format!("key id {id:?} appears twice")));
            }
            let mut bytes = Zeroizing::new(
                BASE64
                    .decode(encoded.trim())
                    .map_err(|_| invalid(format!("key {id:?} is not valid base64")))?,
            );
            if bytes.len() != KEY_BYTES {
                let len = bytes.len();
                bytes.zeroize();
                return Err(invalid(format!(
                    "key {id:?} must be {KEY_BYTES} bytes, got {len}"
                )));
            }
            let cipher = Aes256Gcm::new_from_slice(&bytes)
                .map_err(|_| invalid(format!("key {id:?} has the wrong length")))?;
            keys.push(VaultKey {
                id: id.to_owned(),
                cipher,
            });
        }
        Ok(Self { keys })
    }

    /// The id of the key new values are sealed with.
    pub fn current_key_id(&self) -> &str {
        // parse() refuses an empty spec, so there is always a first key.
        self.keys.first().map_or("", |key| key.id.as_str())
    }

    /// Every key id, current first.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|key| key.id.as_str())
    }

    /// Seals `plaintext` with the current key and a fresh random nonce, bound to `aad`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Sealed, VaultError> {
        let key = self
            .keys
            .first()
            .ok_or(VaultError::UnknownKey(String::new()))?;
        let mut nonce = [0u8; NONCE_BYTES];
        getrandom::fill(&mut nonce).map_err(|_| VaultError::Random)?;
        let ciphertext = key
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| VaultError::Encrypt)?;
        Ok(Sealed {
            key_id: key.id.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// Opens a sealed value with the key it names; fails unless `aad` is the one it was
    /// sealed with.
    pub fn open(&self, aad: &[u8], sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let key = self
            .keys
            .iter()
            .find(|key| key.id == sealed.key_id)
            .ok_or_else(|| VaultError::UnknownKey(sealed.key_id.clone()))?;
        if sealed.nonce.len() != NONCE_BYTES {
            return Err(VaultError::MalformedNonce);
        }
        key.cipher
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| VaultError::Decrypt)
    }

    /// True when `sealed` was sealed with an older key and should be re-encrypted.
    pub fn is_stale(&self, sealed: &Sealed) -> bool {
        sealed.key_id != self.current_key_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, byte: u8) -> String {
        format!("{id}={}", BASE64.encode([byte; KEY_BYTES]))
    }

    fn owner<'a>(
        organization_id: &'a str,
        connection_id: &'a str,
        destination: &'a [(&'a str, &'a str)],
    ) -> ConnectionBinding<'a> {
        ConnectionBinding {
            organization_id,
            connection_id,
            destination,
        }
    }

    const UPSTREAM: &[(&str, &str)] = &[
        ("auth_kind", "api_key"),
        ("upstream_url", "https://mcp.example.com/mcp"),
        ("auth_header", "x-api-key"),
    ];

    #[test]
    fn a_sealed_value_opens_with_the_same_associated_data_only() {
        let ring = Keyring::parse(&spec("k1", 1)).unwrap();
        let aad = connection_aad(AadVersion::V2, &owner("org-a", "c1", UPSTREAM));
        let sealed = ring.seal(&aad, b"secret-token").unwrap();
        assert_eq!(sealed.key_id, "k1");
        assert_eq!(&*ring.open(&aad, &sealed).unwrap(), b"secret-token");
        for other in [
            owner("org-b", "c1", UPSTREAM),
            owner("org-a", "c2", UPSTREAM),
        ] {
            assert_eq!(
                ring.open(&connection_aad(AadVersion::V2, &other), &sealed),
                Err(VaultError::Decrypt)
            );
        }
        // Sealed under version 2, it does not open as version 1 of the same owner.
        assert_eq!(
            ring.open(
                &connection_aad(AadVersion::V1, &owner("org-a", "c1", UPSTREAM)),
                &sealed
            ),
            Err(VaultError::Decrypt)
        );
    }

    #[test]
    fn version_2_binds_the_destination_and_version_1_does_not() {
        let ring = Keyring::parse(&spec("k1", 1)).unwrap();
        let moved: &[(&str, &str)] = &[
            ("auth_kind", "api_key"),
            ("upstream_url", "https://attacker.example/mcp"),
            ("auth_header", "x-api-key"),
        ];
        let renamed: &[(&str, &str)] = &[
            ("auth_kind", "api_key"),
            ("upstream_url", "https://mcp.example.com/mcp"),
            ("auth_header", "x-other"),
        ];
        let v2 = |destination| connection_aad(AadVersion::V2, &owner("org-a", "c1", destination));
        let sealed = ring.seal(&v2(UPSTREAM), b"key").unwrap();
        assert_eq!(ring.open(&v2(moved), &sealed), Err(VaultError::Decrypt));
        assert_eq!(ring.open(&v2(renamed), &sealed), Err(VaultError::Decrypt));
        let v1 = |destination| connection_aad(AadVersion::V1, &owner("org-a", "c1", destination));
        assert_eq!(v1(UPSTREAM), b"nubabel/connection/v1|org-a|c1");
        assert_eq!(v1(UPSTREAM), v1(moved));
    }

    #[test]
    fn version_2_fields_cannot_run_into_each_other() {
        let a = connection_aad(AadVersion::V2, &owner("org|a", "c1", &[]));
        let b = connection_aad(AadVersion::V2, &owner("org", "a|c1", &[]));
        assert_ne!(a, b);
        let c = connection_aad(AadVersion::V2, &owner("o", "c", &[("url", "xy")]));
        let d = connection_aad(AadVersion::V2, &owner("o", "c", &[("urlx", "y")]));
        assert_ne!(c, d);
    }

    #[test]
    fn aad_versions_round_trip_and_unknown_ones_are_refused() {
        for version in [AadVersion::V1, AadVersion::V2] {
            assert_eq!(AadVersion::from_i16(version.as_i16()), Ok(version));
        }
        assert_eq!(AadVersion::CURRENT, AadVersion::V2);
        assert_eq!(
            AadVersion::from_i16(3),
            Err(VaultError::UnknownAadVersion(3))
        );
    }

    #[test]
    fn every_encryption_uses_a_fresh_nonce() {
        let ring = Keyring::parse(&spec("k1", 1)).unwrap();
        let a = ring.seal(b"aad", b"same").unwrap();
        let b = ring.seal(b"aad", b"same").unwrap();
        assert_eq!(a.nonce.len(), NONCE_BYTES);
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn tampered_ciphertext_is_refused() {
        let ring = Keyring::parse(&spec("k1", 1)).unwrap();
        let mut sealed = ring.seal(b"aad", b"secret").unwrap();
        sealed.ciphertext[0] ^= 1;
        assert_eq!(ring.open(b"aad", &sealed), Err(VaultError::Decrypt));
    }

    #[test]
    fn the_first_key_seals_and_older_keys_still_open() {
        let old = Keyring::parse(&spec("k1", 1)).unwrap();
        let sealed_old = old.seal(b"aad", b"secret").unwrap();
        let rotated = Keyring::parse(&format!("{},{}", spec("k2", 2), spec("k1", 1))).unwrap();
        assert_eq!(rotated.current_key_id(), "k2");
        assert!(rotated.is_stale(&sealed_old));
        assert_eq!(&*rotated.open(b"aad", &sealed_old).unwrap(), b"secret");
        let sealed_new = rotated.seal(b"aad", b"secret").unwrap();
        assert_eq!(sealed_new.key_id, "k2");
        assert!(!rotated.is_stale(&sealed_new));
        assert_eq!(
            old.open(b"aad", &sealed_new),
            Err(VaultError::UnknownKey("k2".into()))
        );
    }

    #[test]
    fn a_key_with_the_same_id_but_other_bytes_cannot_open() {
        let a = Keyring::parse(&spec("k1", 1)).unwrap();
        let b = Keyring::parse(&spec("k1", 9)).unwrap();
        let sealed = a.seal(b"aad", b"secret").unwrap();
        assert_eq!(b.open(b"aad", &sealed), Err(VaultError::Decrypt));
    }

    #[test]
    fn malformed_keyrings_are_refused_without_echoing_key_bytes() {
        let short = format!("k1={}", BASE64.encode([3u8; 16]));
        for (bad, expected) in [
            ("", "entry 1 is empty"),
            ("k1", "entry 1 must be"),
            ("k1=%%%", "not valid base64"),
            (short.as_str(), "must be 32 bytes, got 16"),
            ("bad id=AAAA", "key id must be"),
        ] {
            let error = Keyring::parse(bad).unwrap_err().to_string();
            assert!(error.contains(expected), "{bad:?}: {error}");
        }
        let twice = format!("{},{}", spec("k1", 1), spec("k1", 2));
        assert!(
            Keyring::parse(&twice)
                .unwrap_err()
                .to_string()
                .contains("appears twice")
        );
        let error = Keyring::parse(&short).unwrap_err().to_string();
        assert!(!error.contains(&BASE64.encode([3u8; 16])));
    }

    #[test]
    fn debug_output_shows_key_ids_only() {
        let ring = Keyring::parse(&spec("k1", 1)).unwrap();
        let printed = format!("{ring:?}");
        assert!(printed.contains("k1"));
        assert!(!printed.contains(&BASE64.encode([1u8; KEY_BYTES])));
    }
}
