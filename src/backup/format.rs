//! The backup repository's formats, byte by byte (docs/BACKUP-FORMAT.md): the repository
//! configuration, content objects and snapshot manifests, and the keys that name and seal
//! them. Nothing here does I/O.

use super::Error;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

/// The format version this build writes and reads (config, objects, manifests).
pub const BACKUP_FORMAT_VERSION: u32 = 1;
/// Volume bytes per object unless the repository says otherwise.
pub const OBJECT_SIZE_BYTES_DEFAULT: u32 = 4 << 20;
/// Objects are between these sizes (powers of two; a multiple of every chunk size).
pub const OBJECT_SIZE_BYTES_MIN: u32 = 1 << 20;
pub const OBJECT_SIZE_BYTES_MAX: u32 = 64 << 20;
/// Objects per manifest at most: 2^26 x 4 MiB = 256 TiB.
pub const MANIFEST_OBJECTS_MAX: u64 = 1 << 26;
/// A key file holds at least this many bytes of key material.
pub const KEY_FILE_BYTES_MIN: usize = 32;
/// ... and at most this many.
pub const KEY_FILE_BYTES_MAX: usize = 4096;
/// zstd level of object payloads (fast; random data costs little).
const ZSTD_LEVEL: i32 = 1;

const OBJECT_MAGIC: &[u8; 8] = b"SNAPVBKO";
const OBJECT_HEADER_BYTES: usize = 16;
const OBJECT_FLAG_ZSTD: u8 = 1;
const OBJECT_FLAG_ENCRYPTED: u8 = 2;

const MANIFEST_MAGIC: &[u8; 8] = b"SNAPVBKM";
const MANIFEST_HEADER_BYTES: usize = 20;
const MANIFEST_FLAG_ENCRYPTED: u32 = 1;
const MANIFEST_TRAILER_BYTES: usize = 32;
const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;

const CONTEXT_DIGEST: &str = "snapvol backup v1 object digest";
const CONTEXT_ENCRYPTION: &str = "snapvol backup v1 encryption";
const CONTEXT_KEY_CHECK: &str = "snapvol backup v1 key check";

/// A 32-byte content digest: the name of an object. All zeros is the hole sentinel in a
/// manifest (a range of zeros, no object).
pub type Digest = [u8; 32];
pub const HOLE: Digest = [0; 32];

pub fn digest_hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_digest_hex(s: &str) -> Option<Digest> {
    if s.len() != 64 {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, byte) in d.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(d)
}

/// `PREFIX/config`: JSON, written once (create-only) by the first push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    pub format_version: u32,
    pub object_size_bytes: u32,
    /// Hex of a key derived from the encryption key ("key check"); absent: not encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key_check: Option<String>,
    pub created_unix_ns: u64,
}

impl RepoConfig {
    pub fn decode(bytes: &[u8]) -> Result<RepoConfig, Error> {
        let c: RepoConfig = serde_json::from_slice(bytes)
            .map_err(|e| Error::Corrupt(format!("the repository's config: {e}")))?;
        if c.format_version != BACKUP_FORMAT_VERSION {
            return Err(Error::Corrupt(format!(
                "the repository's format version is {}; this snapvol reads {BACKUP_FORMAT_VERSION}",
                c.format_version
            )));
        }
        check_object_size(c.object_size_bytes)
            .map_err(|e| Error::Corrupt(format!("the repository's config: {e}")))?;
        Ok(c)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a config serializes");
        v.push(b'\n');
        v
    }
}

pub fn check_object_size(n: u32) -> Result<(), String> {
    if !n.is_power_of_two() || !(OBJECT_SIZE_BYTES_MIN..=OBJECT_SIZE_BYTES_MAX).contains(&n) {
        return Err(format!(
            "object size {n} must be a power of two from {OBJECT_SIZE_BYTES_MIN} to {OBJECT_SIZE_BYTES_MAX} bytes"
        ));
    }
    Ok(())
}

/// The keys of one repository: the digest key (names objects) and, for an encrypted
/// repository, the cipher. Without encryption the digest key is a fixed one, so equal
/// content has equal names in every unencrypted repository; with it, names are keyed by
/// the encryption key, so deduplication stays within one key.
#[derive(Clone)]
pub struct Keys {
    digest_key: [u8; 32],
    cipher: Option<XChaCha20Poly1305>,
    key_check: Option<String>,
    /// The key file's bytes (kept for a lazy restore, which goes on after restarts).
    material: Option<Vec<u8>>,
}

impl Keys {
    pub fn plain() -> Keys {
        Keys {
            digest_key: blake3::derive_key(CONTEXT_DIGEST, b""),
            cipher: None,
            key_check: None,
            material: None,
        }
    }

    /// Keys from a key file's bytes.
    pub fn from_key_material(material: &[u8]) -> Result<Keys, Error> {
        if material.len() < KEY_FILE_BYTES_MIN || material.len() > KEY_FILE_BYTES_MAX {
            return Err(Error::InvalidArgument(format!(
                "the encryption key file holds {} bytes; it must hold {KEY_FILE_BYTES_MIN} to \
                 {KEY_FILE_BYTES_MAX} (e.g. `head -c 32 /dev/urandom > key`)",
                material.len()
            )));
        }
        let enc = blake3::derive_key(CONTEXT_ENCRYPTION, material);
        Ok(Keys {
            digest_key: blake3::derive_key(CONTEXT_DIGEST, material),
            cipher: Some(XChaCha20Poly1305::new((&enc).into())),
            key_check: Some(digest_hex(&blake3::derive_key(CONTEXT_KEY_CHECK, material))),
            material: Some(material.to_vec()),
        })
    }

    pub fn material(&self) -> Option<&[u8]> {
        self.material.as_deref()
    }

    pub fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    pub fn key_check(&self) -> Option<&str> {
        self.key_check.as_deref()
    }

    /// Checks these keys against the repository's config: one clear error for a missing,
    /// needless or wrong key.
    pub fn check_against(&self, config: &RepoConfig) -> Result<(), Error> {
        match (&config.encryption_key_check, &self.key_check) {
            (None, None) => Ok(()),
            (Some(_), None) => Err(Error::InvalidArgument(
                "the repository is encrypted: give its key with --encryption-key-file".into(),
            )),
            (None, Some(_)) => Err(Error::InvalidArgument(
                "the repository is not encrypted, but --encryption-key-file was given".into(),
            )),
            (Some(want), Some(have)) if want == have => Ok(()),
            (Some(_), Some(_)) => Err(Error::InvalidArgument(
                "wrong encryption key: the repository was made with another key".into(),
            )),
        }
    }

    /// The name of an object holding `plain`.
    pub fn digest(&self, plain: &[u8]) -> Digest {
        *blake3::keyed_hash(&self.digest_key, plain).as_bytes()
    }
}

/// Bytes of each sample [`worth_compressing`] compresses.
const COMPRESS_SAMPLE_BYTES: usize = 32 << 10;
/// Samples per object.
const COMPRESS_SAMPLE_COUNT: usize = 4;

/// `data` compressed with zstd at [`ZSTD_LEVEL`], by a context kept per thread (making
/// one costs about as much as compressing a sample).
fn compress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL)?);
        }
        c.as_mut().expect("made above").compress(data)
    })
}

/// Whether zstd is worth running over `plain`: a small object is simply tried; of a large
/// one, a few samples spread over it are compressed first, and the object is stored raw if
/// they gain under 3% together (random or already compressed data then costs a few
/// percent of a full compression). An object whose compressible parts all fall between
/// the samples is stored raw: a matter of size, never of correctness.
fn worth_compressing(plain: &[u8]) -> bool {
    let sample_total = COMPRESS_SAMPLE_BYTES * COMPRESS_SAMPLE_COUNT;
    if plain.len() <= 2 * sample_total {
        return true;
    }
    let stride = (plain.len() - COMPRESS_SAMPLE_BYTES) / (COMPRESS_SAMPLE_COUNT - 1);
    let compressed: usize = (0..COMPRESS_SAMPLE_COUNT)
        .map(|i| {
            let at = i * stride;
            let sample = &plain[at..at + COMPRESS_SAMPLE_BYTES];
            compress(sample).map_or(sample.len(), |c| c.len())
        })
        .sum();
    compressed * 100 < sample_total * 97
}

/// Encodes an object for `plain` (volume bytes), whose digest is `digest`: its bytes are
/// the concatenation of the returned parts (a raw, unencrypted object shares `plain`'s
/// memory instead of copying it).
pub fn encode_object_parts(keys: &Keys, digest: &Digest, plain: bytes::Bytes) -> Vec<bytes::Bytes> {
    let plain_len = u32::try_from(plain.len()).expect("objects are at most 64 MiB");
    assert!(plain_len <= OBJECT_SIZE_BYTES_MAX);
    let compressed = worth_compressing(&plain)
        .then(|| compress(&plain).expect("zstd compresses a buffer"))
        .filter(|c| c.len() < plain.len());
    let mut flags = if compressed.is_some() {
        OBJECT_FLAG_ZSTD
    } else {
        0
    };
    if keys.cipher.is_some() {
        flags |= OBJECT_FLAG_ENCRYPTED;
    }
    let mut header = Vec::with_capacity(OBJECT_HEADER_BYTES);
    header.extend_from_slice(OBJECT_MAGIC);
    header.push(BACKUP_FORMAT_VERSION as u8);
    header.push(flags);
    header.extend_from_slice(&[0, 0]);
    header.extend_from_slice(&plain_len.to_le_bytes());
    debug_assert_eq!(header.len(), OBJECT_HEADER_BYTES);
    let body: bytes::Bytes = match (&keys.cipher, compressed) {
        (None, None) => plain,
        (None, Some(c)) => c.into(),
        (Some(cipher), c) => {
            // The nonce is the digest's first 24 bytes: an object's bytes are a function of
            // its content (equal content, equal ciphertext), and different content has a
            // different digest.
            let aad = object_aad(&header, digest);
            cipher
                .encrypt(
                    &nonce_of(&digest[..NONCE_BYTES]),
                    Payload {
                        msg: c.as_deref().unwrap_or(&plain),
                        aad: &aad,
                    },
                )
                .expect("encryption of a bounded buffer")
                .into()
        }
    };
    vec![header.into(), body]
}

fn nonce_of(bytes: &[u8]) -> XNonce {
    XNonce::try_from(bytes).expect("nonces are 24 bytes")
}

fn object_aad(header: &[u8], digest: &Digest) -> Vec<u8> {
    let mut aad = header.to_vec();
    aad.extend_from_slice(digest);
    aad
}

/// Decodes an object named `digest` into its volume bytes, checking everything: header,
/// authentication (encrypted), length and the digest of the content.
pub fn decode_object(
    keys: &Keys,
    digest: &Digest,
    bytes: &bytes::Bytes,
) -> Result<bytes::Bytes, Error> {
    let name = digest_hex(digest);
    let bad = |why: &str| Error::DamagedObject {
        object: name.clone(),
        reason: why.to_string(),
    };
    if bytes.len() < OBJECT_HEADER_BYTES || &bytes[..8] != OBJECT_MAGIC {
        return Err(bad("not a snapvol backup object (bad magic)"));
    }
    if u32::from(bytes[8]) != BACKUP_FORMAT_VERSION {
        return Err(bad(&format!("object version {} unknown", bytes[8])));
    }
    let flags = bytes[9];
    if flags & !(OBJECT_FLAG_ZSTD | OBJECT_FLAG_ENCRYPTED) != 0 || bytes[10..12] != [0, 0] {
        return Err(bad("unknown flags"));
    }
    let plain_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    if plain_len > OBJECT_SIZE_BYTES_MAX as usize {
        return Err(bad("length out of range"));
    }
    let encrypted = flags & OBJECT_FLAG_ENCRYPTED != 0;
    if encrypted != keys.encrypted() {
        return Err(bad(if encrypted {
            "encrypted, but the repository is not"
        } else {
            "not encrypted, but the repository is"
        }));
    }
    let body: bytes::Bytes = match &keys.cipher {
        None => bytes.slice(OBJECT_HEADER_BYTES..),
        Some(cipher) => {
            let aad = object_aad(&bytes[..OBJECT_HEADER_BYTES], digest);
            cipher
                .decrypt(
                    &nonce_of(&digest[..NONCE_BYTES]),
                    Payload {
                        msg: &bytes[OBJECT_HEADER_BYTES..],
                        aad: &aad,
                    },
                )
                .map_err(|_| bad("fails authentication (damaged, or another key)"))?
                .into()
        }
    };
    let plain = if flags & OBJECT_FLAG_ZSTD != 0 {
        let p = zstd::bulk::decompress(&body, plain_len)
            .map_err(|e| bad(&format!("does not decompress: {e}")))?;
        if p.len() != plain_len {
            return Err(bad("decompresses to the wrong length"));
        }
        p.into()
    } else {
        if body.len() != plain_len {
            return Err(bad("wrong length"));
        }
        body
    };
    if keys.digest(&plain) != *digest {
        return Err(bad("content does not match its name (digest mismatch)"));
    }
    Ok(plain)
}

/// One snapshot in the repository: complete by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The local volume's identity (its `created_unix_ns`): tells a volume from another
    /// of the same name.
    pub volume_uid: u64,
    pub volume: String,
    pub snapshot: String,
    pub snapshot_id: u64,
    pub snapshot_created_unix_ns: u64,
    pub size_bytes: u64,
    pub chunk_size_bytes: u32,
    pub object_size_bytes: u32,
    /// The snapshot id this push was incremental to; 0: a full push.
    pub base_snapshot_id: u64,
    pub pushed_unix_ns: u64,
    /// One digest per `object_size_bytes` of the volume; [`HOLE`] for a range of zeros.
    pub objects: Vec<Digest>,
}

/// Fixed body bytes before the names and the index.
const MANIFEST_BODY_FIXED_BYTES: usize = 8 * 6 + 4 * 2;

impl Manifest {
    pub fn object_count_for(size_bytes: u64, object_size_bytes: u32) -> u64 {
        size_bytes.div_ceil(u64::from(object_size_bytes))
    }

    pub fn encode(&self, keys: &Keys, nonce: [u8; NONCE_BYTES]) -> Vec<u8> {
        assert_eq!(
            self.objects.len() as u64,
            Manifest::object_count_for(self.size_bytes, self.object_size_bytes)
        );
        let mut body =
            Vec::with_capacity(MANIFEST_BODY_FIXED_BYTES + 2 + 128 + 8 + 32 * self.objects.len());
        for v in [
            self.volume_uid,
            self.snapshot_id,
            self.snapshot_created_unix_ns,
            self.size_bytes,
        ] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.extend_from_slice(&self.chunk_size_bytes.to_le_bytes());
        body.extend_from_slice(&self.object_size_bytes.to_le_bytes());
        body.extend_from_slice(&self.base_snapshot_id.to_le_bytes());
        body.extend_from_slice(&self.pushed_unix_ns.to_le_bytes());
        for name in [&self.volume, &self.snapshot] {
            let len = u8::try_from(name.len()).expect("names are at most 64 bytes");
            body.push(len);
            body.extend_from_slice(name.as_bytes());
        }
        body.extend_from_slice(&(self.objects.len() as u64).to_le_bytes());
        for d in &self.objects {
            body.extend_from_slice(d);
        }
        let mut out = Vec::with_capacity(body.len() + 128);
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&BACKUP_FORMAT_VERSION.to_le_bytes());
        let flags = if keys.encrypted() {
            MANIFEST_FLAG_ENCRYPTED
        } else {
            0
        };
        out.extend_from_slice(&flags.to_le_bytes());
        let sealed;
        let body_out: &[u8] = match &keys.cipher {
            None => &body,
            Some(cipher) => {
                let mut s = nonce.to_vec();
                s.extend_from_slice(
                    &cipher
                        .encrypt(&nonce_of(&nonce), body.as_slice())
                        .expect("encryption of a bounded buffer"),
                );
                sealed = s;
                &sealed
            }
        };
        let len = u32::try_from(body_out.len()).expect("manifests are at most 2 GiB");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(body_out);
        let sum = *blake3::hash(&out).as_bytes();
        out.extend_from_slice(&sum);
        out
    }

    /// Decodes and checks a manifest (`key` names it in errors).
    pub fn decode(keys: &Keys, key: &str, bytes: &[u8]) -> Result<Manifest, Error> {
        let bad = |why: String| Error::Corrupt(format!("manifest {key}: {why}"));
        if bytes.len() < MANIFEST_HEADER_BYTES + MANIFEST_TRAILER_BYTES
            || &bytes[..8] != MANIFEST_MAGIC
        {
            return Err(bad("not a snapvol manifest (bad magic or too short)".into()));
        }
        let (content, trailer) = bytes.split_at(bytes.len() - MANIFEST_TRAILER_BYTES);
        if blake3::hash(content).as_bytes() != trailer {
            return Err(bad("fails its checksum".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(content[o..o + 4].try_into().unwrap());
        let version = u32_at(8);
        if version != BACKUP_FORMAT_VERSION {
            return Err(bad(format!(
                "version {version}; this snapvol reads {BACKUP_FORMAT_VERSION}"
            )));
        }
        let flags = u32_at(12);
        if flags & !MANIFEST_FLAG_ENCRYPTED != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let body_len = u32_at(16) as usize;
        if MANIFEST_HEADER_BYTES + body_len != content.len() {
            return Err(bad("body length does not match the file".into()));
        }
        let sealed = &content[MANIFEST_HEADER_BYTES..];
        let encrypted = flags & MANIFEST_FLAG_ENCRYPTED != 0;
        let opened;
        let body: &[u8] = match (&keys.cipher, encrypted) {
            (None, false) => sealed,
            (Some(cipher), true) => {
                if sealed.len() < NONCE_BYTES + TAG_BYTES {
                    return Err(bad("too short".into()));
                }
                let (nonce, ct) = sealed.split_at(NONCE_BYTES);
                opened = cipher
                    .decrypt(&nonce_of(nonce), ct)
                    .map_err(|_| bad("fails authentication (damaged, or another key)".into()))?;
                &opened
            }
            (None, true) => {
                return Err(bad(
                    "encrypted: give the key with --encryption-key-file".into()
                ));
            }
            (Some(_), false) => return Err(bad("not encrypted, but a key was given".into())),
        };
        let mut r = Reader { b: body, at: 0 };
        let short = || bad("truncated body".into());
        let volume_uid = r.u64().ok_or_else(short)?;
        let snapshot_id = r.u64().ok_or_else(short)?;
        let snapshot_created_unix_ns = r.u64().ok_or_else(short)?;
        let size_bytes = r.u64().ok_or_else(short)?;
        let chunk_size_bytes = r.u32().ok_or_else(short)?;
        let object_size_bytes = r.u32().ok_or_else(short)?;
        let base_snapshot_id = r.u64().ok_or_else(short)?;
        let pushed_unix_ns = r.u64().ok_or_else(short)?;
        let volume = r.name().ok_or_else(short)?;
        let snapshot = r.name().ok_or_else(short)?;
        let count = r.u64().ok_or_else(short)?;
        check_object_size(object_size_bytes).map_err(bad)?;
        if count > MANIFEST_OBJECTS_MAX
            || count != Manifest::object_count_for(size_bytes, object_size_bytes)
        {
            return Err(bad(format!(
                "{count} objects do not cover a volume of {size_bytes} bytes"
            )));
        }
        if !chunk_size_bytes.is_power_of_two() || chunk_size_bytes > object_size_bytes {
            return Err(bad(format!("chunk size {chunk_size_bytes} out of range")));
        }
        let mut objects = Vec::with_capacity(count as usize);
        for _ in 0..count {
            objects.push(r.digest().ok_or_else(short)?);
        }
        if r.at != body.len() {
            return Err(bad("trailing bytes in the body".into()));
        }
        Ok(Manifest {
            volume_uid,
            volume,
            snapshot,
            snapshot_id,
            snapshot_created_unix_ns,
            size_bytes,
            chunk_size_bytes,
            object_size_bytes,
            base_snapshot_id,
            pushed_unix_ns,
            objects,
        })
    }

    /// The repository key of this manifest: `manifests/VOLUME/UID-SNAPID-SNAPSHOT`.
    pub fn key(&self) -> String {
        manifest_key(
            &self.volume,
            self.volume_uid,
            self.snapshot_id,
            &self.snapshot,
        )
    }
}

pub fn manifest_key(volume: &str, volume_uid: u64, snapshot_id: u64, snapshot: &str) -> String {
    format!("manifests/{volume}/{volume_uid:020}-{snapshot_id:020}-{snapshot}")
}

/// `objects/ab/abcd...` for a digest.
pub fn object_key(d: &Digest) -> String {
    let hex = digest_hex(d);
    format!("objects/{}/{hex}", &hex[..2])
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn name(&mut self) -> Option<String> {
        let len = *self.take(1)?.first()? as usize;
        let s = String::from_utf8(self.take(len)?.to_vec()).ok()?;
        crate::names::validate_name("name", &s).ok()?;
        Some(s)
    }
    fn digest(&mut self) -> Option<Digest> {
        self.take(32)?.try_into().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`encode_object_parts`] in one buffer.
    fn encode_object(keys: &Keys, digest: &Digest, plain: &[u8]) -> Vec<u8> {
        encode_object_parts(keys, digest, bytes::Bytes::copy_from_slice(plain)).concat()
    }

    fn manifest() -> Manifest {
        Manifest {
            volume_uid: 7,
            volume: "vm1".into(),
            snapshot: "s1".into(),
            snapshot_id: 3,
            snapshot_created_unix_ns: 11,
            size_bytes: 9 << 20,
            chunk_size_bytes: 65536,
            object_size_bytes: 4 << 20,
            base_snapshot_id: 2,
            pushed_unix_ns: 13,
            objects: vec![[1; 32], HOLE, [3; 32]],
        }
    }

    #[test]
    fn a_manifest_round_trips_plain_and_encrypted_and_every_flipped_byte_is_refused() {
        for keys in [Keys::plain(), Keys::from_key_material(&[5u8; 32]).unwrap()] {
            let m = manifest();
            let bytes = m.encode(&keys, [9; 24]);
            assert_eq!(Manifest::decode(&keys, "k", &bytes).unwrap(), m);
            for i in 0..bytes.len() {
                let mut b = bytes.clone();
                b[i] ^= 0x40;
                assert!(Manifest::decode(&keys, "k", &b).is_err(), "byte {i}");
            }
            assert!(Manifest::decode(&keys, "k", &bytes[..bytes.len() - 1]).is_err());
        }
    }

    #[test]
    fn an_object_round_trips_and_damage_or_another_key_is_named() {
        let keys = Keys::from_key_material(b"0123456789abcdef0123456789abcdef").unwrap();
        let other = Keys::from_key_material(b"0123456789abcdef0123456789abcdeX").unwrap();
        let mut plain = vec![0u8; 1 << 20];
        plain[100..200].fill(7);
        for k in [&Keys::plain(), &keys] {
            let d = k.digest(&plain);
            let o = encode_object(k, &d, &plain);
            assert!(o.len() < plain.len() / 10, "compressed");
            assert_eq!(decode_object(k, &d, &o.clone().into()).unwrap(), plain);
            let mut damaged = o.clone();
            let last = damaged.len() - 1;
            damaged[last] ^= 1;
            let e = decode_object(k, &d, &damaged.into())
                .unwrap_err()
                .to_string();
            assert!(e.contains(&digest_hex(&d)), "{e}");
        }
        let d = keys.digest(&plain);
        let o = encode_object(&keys, &d, &plain);
        assert!(decode_object(&other, &d, &o.into()).is_err());
        assert_ne!(keys.digest(&plain), Keys::plain().digest(&plain));
        assert!(
            keys.check_against(&RepoConfig {
                format_version: 1,
                object_size_bytes: 4 << 20,
                encryption_key_check: other.key_check().map(String::from),
                created_unix_ns: 0,
            })
            .is_err()
        );
    }

    #[test]
    fn incompressible_objects_are_stored_raw_and_compressible_ones_compressed() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..4u32 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let k = Keys::plain();
        for (plain, compressed) in [
            (random.clone(), false),
            (random[..100_000].to_vec(), false),
            // Text-like: every sample compresses.
            (
                random.iter().map(|b| b'a' + b % 4).collect::<Vec<u8>>(),
                true,
            ),
            (vec![7u8; 100_000], true),
        ] {
            let d = k.digest(&plain);
            let o = encode_object(&k, &d, &plain);
            assert_eq!(o[9] & OBJECT_FLAG_ZSTD != 0, compressed, "{}", plain.len());
            if !compressed {
                assert_eq!(o.len(), OBJECT_HEADER_BYTES + plain.len());
                assert_eq!(&o[OBJECT_HEADER_BYTES..], &plain[..]);
            }
            assert_eq!(decode_object(&k, &d, &o.clone().into()).unwrap(), plain);
        }
    }
}
