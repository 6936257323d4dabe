//! Per-client authorization (`serve --authz FILE`): which client may open which export,
//! read-only or read-write.
//!
//! The file is TOML, a list of `[[allow]]` entries, each naming one identity and the
//! exports it may open:
//!
//! ```toml
//! [[allow]]
//! tls-name = "backup.example.com"   # a client certificate's subject CN or a SAN
//! read-write = ["vm1"]
//! read-only = ["vm1@*", "vm2"]      # VOL@* is every snapshot of VOL; "*" every export
//!
//! [[allow]]
//! uid = 1000                        # unix-socket clients (SO_PEERCRED); or user = "alice"
//! read-only = ["*"]
//!
//! [[allow]]
//! group = "disk"                    # the peer's primary or a supplementary group
//! read-write = ["scratch"]
//! ```
//!
//! A client's identities are the names of its (verified) TLS certificate and, on a unix
//! socket, its uid and groups. Its access to an export is the most any matching entry
//! grants; a client no entry matches sees no export at all. Snapshot exports stay
//! read-only whatever the file says. Matching is on the canonical export name (the empty
//! name is `default`), before the export is looked up, so a refusal tells nothing about
//! whether the export exists.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Largest authz file read.
pub const AUTHZ_FILE_BYTES_MAX: u64 = 1 << 20;
/// Most `[[allow]]` entries.
pub const AUTHZ_ENTRIES_MAX: usize = 10_000;
/// Most groups of a unix-socket peer that are looked at.
const PEER_GROUPS_MAX: usize = 1024;

/// What a client may do with an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// Who is at the other end of a connection, as far as the server can prove it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// Subject CNs and SANs (DNS, e-mail, URI) of the client's verified TLS certificate.
    pub tls_names: Vec<String>,
    /// The uid of a unix-socket peer.
    pub uid: Option<u32>,
    /// The primary and supplementary groups of a unix-socket peer.
    pub gids: Vec<u32>,
}

impl Peer {
    /// The credentials of the process at the other end of a unix socket (SO_PEERCRED, and
    /// SO_PEERGROUPS where the kernel has it).
    pub fn of_unix(stream: &UnixStream) -> io::Result<Peer> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` and `len` are valid for writes and `len` holds the size of `cred`.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&raw mut cred).cast::<libc::c_void>(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut gids = vec![cred.gid];
        let mut groups = vec![0 as libc::gid_t; PEER_GROUPS_MAX];
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is writable for `len` bytes; the kernel writes at most that.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast::<libc::c_void>(),
                &mut len,
            )
        };
        if rc == 0 {
            let n = (len as usize / std::mem::size_of::<libc::gid_t>()).min(groups.len());
            for &g in groups.get(..n).unwrap_or_default() {
                if !gids.contains(&g) {
                    gids.push(g);
                }
            }
        }
        Ok(Peer {
            tls_names: Vec::new(),
            uid: Some(cred.uid),
            gids,
        })
    }

    /// For log lines: `tls:alice`, `uid:1000`, or `anonymous`.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .tls_names
            .iter()
            .take(4)
            .map(|n| format!("tls:{n}"))
            .collect();
        if let Some(uid) = self.uid {
            parts.push(format!("uid:{uid}"));
        }
        if parts.is_empty() {
            "anonymous".into()
        } else {
            parts.join(",")
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Identity {
    TlsName(String),
    Uid(u32),
    Gid(u32),
}

#[derive(Debug, Clone)]
struct Entry {
    identity: Identity,
    read_write: Vec<String>,
    read_only: Vec<String>,
}

/// The parsed authz file.
#[derive(Debug, Clone)]
pub struct Authz {
    entries: Vec<Entry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    #[serde(default)]
    allow: Vec<RawEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawEntry {
    tls_name: Option<String>,
    uid: Option<u32>,
    user: Option<String>,
    gid: Option<u32>,
    group: Option<String>,
    #[serde(default)]
    read_write: Vec<String>,
    #[serde(default)]
    read_only: Vec<String>,
}

/// Checks an export pattern: `*`, `VOL`, `VOL@SNAP` or `VOL@*`.
fn check_pattern(p: &str) -> Result<(), String> {
    if p == "*" {
        return Ok(());
    }
    let concrete = p
        .strip_suffix("@*")
        .map_or(p.to_string(), |v| format!("{v}@x"));
    crate::names::parse_target(&concrete)
        .map(|_| ())
        .map_err(|_| format!("{p:?} is not an export pattern (VOL, VOL@SNAP, VOL@* or *)"))
}

fn matches(pattern: &str, export: &str) -> bool {
    if pattern == "*" || pattern == export {
        return true;
    }
    match (pattern.strip_suffix("@*"), export.split_once('@')) {
        (Some(vol), Some((v, _))) => vol == v,
        _ => false,
    }
}

impl Authz {
    /// Reads and checks the file; the error is one line naming the file.
    pub fn load(path: &Path) -> Result<Authz, String> {
        let what = path.display();
        let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {what}: {e}"))?;
        if meta.len() > AUTHZ_FILE_BYTES_MAX {
            return Err(format!(
                "{what} is larger than {AUTHZ_FILE_BYTES_MAX} bytes"
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {what}: {e}"))?;
        Authz::parse(&text).map_err(|e| format!("{what}: {e}"))
    }

    /// Parses the file's text (user and group names are looked up now).
    pub fn parse(text: &str) -> Result<Authz, String> {
        let file: FileFormat = toml::from_str(text).map_err(|e| {
            // toml's messages span several lines; the first says what is wrong.
            e.message()
                .lines()
                .next()
                .unwrap_or("invalid TOML")
                .to_string()
                + &e.span()
                    .map(|s| format!(" (at byte {})", s.start))
                    .unwrap_or_default()
        })?;
        if file.allow.len() > AUTHZ_ENTRIES_MAX {
            return Err(format!("more than {AUTHZ_ENTRIES_MAX} [[allow]] entries"));
        }
        let mut entries = Vec::with_capacity(file.allow.len());
        for (i, raw) in file.allow.into_iter().enumerate() {
            let n = i + 1;
            let mut ids = Vec::new();
            if let Some(name) = raw.tls_name {
                if name.is_empty() {
                    return Err(format!("[[allow]] entry {n}: tls-name is empty"));
                }
                ids.push(Identity::TlsName(name));
            }
            if let Some(uid) = raw.uid {
                ids.push(Identity::Uid(uid));
            }
            if let Some(user) = raw.user {
                let uid = crate::io::users::user_id(&user)
                    .map_err(|e| format!("[[allow]] entry {n}: user {user:?}: {e}"))?;
                ids.push(Identity::Uid(uid));
            }
            if let Some(gid) = raw.gid {
                ids.push(Identity::Gid(gid));
            }
            if let Some(group) = raw.group {
                let gid = crate::io::users::group_id(&group)
                    .map_err(|e| format!("[[allow]] entry {n}: group {group:?}: {e}"))?;
                ids.push(Identity::Gid(gid));
            }
            let identity = match ids.len() {
                1 => ids.remove(0),
                0 => {
                    return Err(format!(
                        "[[allow]] entry {n} names no client: give one of tls-name, uid, \
                         user, gid, group"
                    ));
                }
                _ => {
                    return Err(format!(
                        "[[allow]] entry {n} names more than one client: give one of \
                         tls-name, uid, user, gid, group per entry"
                    ));
                }
            };
            for p in raw.read_write.iter().chain(&raw.read_only) {
                check_pattern(p).map_err(|e| format!("[[allow]] entry {n}: {e}"))?;
            }
            entries.push(Entry {
                identity,
                read_write: raw.read_write,
                read_only: raw.read_only,
            });
        }
        Ok(Authz { entries })
    }

    /// What `peer` may do with the export `canonical` (`VOL` or `VOL@SNAP`); `None`: it may
    /// not open it (nor see it listed).
    pub fn access(&self, peer: &Peer, canonical: &str) -> Option<Access> {
        let mut best = None;
        for e in &self.entries {
            let applies = match &e.identity {
                Identity::TlsName(name) => peer.tls_names.iter().any(|n| n == name),
                Identity::Uid(uid) => peer.uid == Some(*uid),
                Identity::Gid(gid) => peer.gids.contains(gid),
            };
            if !applies {
                continue;
            }
            if e.read_write.iter().any(|p| matches(p, canonical)) {
                return Some(Access::ReadWrite);
            }
            if e.read_only.iter().any(|p| matches(p, canonical)) {
                best = Some(Access::ReadOnly);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer_tls(name: &str) -> Peer {
        Peer {
            tls_names: vec![name.into()],
            ..Peer::default()
        }
    }

    #[test]
    fn entries_grant_the_most_any_matching_one_allows() {
        let a = Authz::parse(
            r#"
            [[allow]]
            tls-name = "alice"
            read-write = ["vm1"]
            read-only = ["vm1@*", "vm2"]

            [[allow]]
            tls-name = "alice"
            read-write = ["vm2"]

            [[allow]]
            uid = 1000
            read-only = ["*"]

            [[allow]]
            gid = 6
            read-write = ["disk1"]
            "#,
        )
        .unwrap();
        let alice = peer_tls("alice");
        assert_eq!(a.access(&alice, "vm1"), Some(Access::ReadWrite));
        assert_eq!(a.access(&alice, "vm1@monday"), Some(Access::ReadOnly));
        assert_eq!(a.access(&alice, "vm2"), Some(Access::ReadWrite));
        assert_eq!(a.access(&alice, "vm2@monday"), None);
        assert_eq!(a.access(&alice, "vm10"), None);
        assert_eq!(a.access(&peer_tls("bob"), "vm1"), None);
        assert_eq!(a.access(&Peer::default(), "vm1"), None);
        let local = Peer {
            uid: Some(1000),
            gids: vec![100, 6],
            ..Peer::default()
        };
        assert_eq!(a.access(&local, "anything@x"), Some(Access::ReadOnly));
        assert_eq!(a.access(&local, "disk1"), Some(Access::ReadWrite));
        let other = Peer {
            uid: Some(1001),
            gids: vec![1001],
            ..Peer::default()
        };
        assert_eq!(a.access(&other, "vm1"), None);
    }

    #[test]
    fn bad_files_are_one_line_errors() {
        for (text, want) in [
            ("[[allow]]\nread-only = [\"*\"]\n", "names no client"),
            (
                "[[allow]]\nuid = 1\ntls-name = \"a\"\n",
                "more than one client",
            ),
            (
                "[[allow]]\nuid = 1\nread-only = [\"a b\"]\n",
                "not an export pattern",
            ),
            ("[[allow]]\nuid = 1\nwrite = [\"a\"]\n", "unknown field"),
            ("[[allow]]\nuser = \"no-such-user-here\"\n", "no such user"),
            ("[[allow]\n", "at byte"),
        ] {
            let e = Authz::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{e:?}");
        }
        assert!(Authz::parse("").unwrap().entries.is_empty());
        assert_eq!(
            Authz::parse("[[allow]]\nuser = \"root\"\nread-only = [\"v@*\"]\n")
                .unwrap()
                .entries[0]
                .identity,
            Identity::Uid(0)
        );
    }

    #[test]
    fn unix_peer_is_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let p = Peer::of_unix(&a).unwrap();
        // SAFETY: no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        assert_eq!(p.uid, Some(uid));
        assert!(p.gids.contains(&gid));
    }
}
