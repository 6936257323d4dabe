//! Directory-level operations (small files, renames, locks). Kept here so that `io/` stays
//! the only place that touches the file system.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of every directory snapvol creates (the data directory, volume directories),
/// whatever the umask.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of every file snapvol creates, whatever the umask.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Sets `file`'s mode to [`PRIVATE_FILE_MODE`] (`fchmod`): a file is created with that
/// mode, but the umask may have taken bits away, and the mode must not depend on it.
pub fn make_private(file: &File) -> io::Result<()> {
    file.set_permissions(fs::Permissions::from_mode(PRIVATE_FILE_MODE))
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync the directory.
/// The file ends up with mode [`PRIVATE_FILE_MODE`].
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&tmp)?;
        make_private(&f)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Reads a small file (at most `max_bytes`).
pub fn read_small_file(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let len = fs::metadata(path)?.len();
    if len > max_bytes {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is {len} bytes, more than the {max_bytes} expected",
                path.display()
            ),
        ));
    }
    fs::read(path)
}

/// The memory this process's page cache may take at most, in bytes: the machine's
/// (`MemTotal`), or less where its memory cgroup is limited (v2 `memory.max`, v1
/// `memory.limit_in_bytes`). `None` when it cannot be told (no /proc).
pub fn memory_for_cache_bytes() -> Option<u64> {
    let meminfo = read_small_file(Path::new("/proc/meminfo"), 1 << 16).ok()?;
    let total_bytes = String::from_utf8_lossy(&meminfo)
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())?
        .saturating_mul(1024);
    let limit_bytes = read_small_file(Path::new("/proc/self/cgroup"), 1 << 16)
        .ok()
        .and_then(|groups| cgroup_memory_limit_bytes(&String::from_utf8_lossy(&groups)));
    Some(limit_bytes.map_or(total_bytes, |l| l.min(total_bytes)))
}

/// The memory limit of the cgroup that `/proc/self/cgroup`'s `groups` names, if it has one.
fn cgroup_memory_limit_bytes(groups: &str) -> Option<u64> {
    let read_number = |path: String| {
        let bytes = read_small_file(Path::new(&path), 64).ok()?;
        String::from_utf8_lossy(&bytes).trim().parse::<u64>().ok() // "max": none
    };
    for line in groups.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            return read_number(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"));
        }
        if controllers.is_empty()
            && let Some(limit) = read_number(format!("/sys/fs/cgroup{path}/memory.max"))
        {
            return Some(limit);
        }
    }
    None
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing parents with mode [`PRIVATE_DIR_MODE`] (set explicitly,
/// whatever the umask); directories that exist already are left as they are.
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && !parent.as_os_str().is_empty()
    {
        create_private_dir_all(parent)?;
    }
    match fs::DirBuilder::new().mode(PRIVATE_DIR_MODE).create(dir) {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Why `path` (a directory or file snapvol trusts: the data directory, a volume directory,
/// `volume.toml`) must not be used: it is writable by its group or others, or owned by
/// another user than this process's and root. `None` when it is fine. The path is
/// followed if it is a symbolic link.
pub fn untrusted(path: &Path) -> io::Result<Option<String>> {
    let meta = fs::metadata(path)?;
    let mode = meta.mode() & 0o7777;
    let fix = if meta.is_dir() {
        "chmod 700 it"
    } else {
        "chmod 600 it"
    };
    if mode & 0o002 != 0 {
        return Ok(Some(format!("writable by others (mode {mode:04o}); {fix}")));
    }
    if mode & 0o020 != 0 {
        return Ok(Some(format!(
            "writable by its group (mode {mode:04o}); {fix}"
        )));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Ok(Some(format!(
            "owned by uid {}, neither this user (uid {me}) nor root; chown it",
            meta.uid()
        )));
    }
    Ok(None)
}

/// Which file a path or an open file is, for telling whether two names are one file:
/// the device and inode, or for a block device the device it gives access to (two device
/// nodes of one disk are one file here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileId {
    Inode { dev: u64, ino: u64 },
    BlockDevice { rdev: u64 },
}

impl FileId {
    pub fn of(meta: &fs::Metadata) -> FileId {
        if meta.file_type().is_block_device() {
            FileId::BlockDevice { rdev: meta.rdev() }
        } else {
            FileId::Inode {
                dev: meta.dev(),
                ino: meta.ino(),
            }
        }
    }

    /// The file `path` names (following symbolic links); `None` if there is none.
    pub fn of_path(path: &Path) -> io::Result<Option<FileId>> {
        match fs::metadata(path) {
            Ok(meta) => Ok(Some(FileId::of(&meta))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// What kind of file `meta` describes, for messages: `None` for a regular file or a block
/// device (what snapvol reads and writes), else e.g. `"a FIFO"`.
pub fn unusable_kind(meta: &fs::Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() || t.is_block_device() {
        None
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_char_device() {
        Some("a character device")
    } else {
        Some("not a regular file or block device")
    }
}

/// Names of the entries of `dir` that are not directories (files, sockets, links, ...).
pub fn list_files(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir()
            && let Some(n) = entry.file_name().to_str()
        {
            names.push(n.to_string());
        }
    }
    names.sort();
    Ok(names)
}

pub fn remove_dir_all(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

pub fn remove_file(path: &Path) -> io::Result<()> {
    fs::remove_file(path)
}

pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)
}

/// Names of the subdirectories of `dir`.
pub fn list_dirs(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir()
            && let Some(n) = entry.file_name().to_str()
        {
            names.push(n.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// An exclusive advisory lock, held until the returned file is dropped.
/// `Ok(None)` means another process holds it.
pub fn try_lock(path: &Path) -> io::Result<Option<File>> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(PRIVATE_FILE_MODE)
        .open(path)?;
    if f.metadata()?.mode() & 0o777 != PRIVATE_FILE_MODE {
        make_private(&f)?;
    }
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// An append-only file of fixed-size records, made durable on [`AppendLog::sync`]: the
/// record of finished work that a re-run skips (a backup push's uploaded objects, a
/// restore's copied ones). A torn last record (a crash in an append) is ignored on read.
pub struct AppendLog {
    file: File,
    record_bytes: usize,
}

impl AppendLog {
    /// Opens (creating, mode 0600) the log at `path` and returns it with its whole records.
    pub fn open(path: &Path, record_bytes: usize) -> io::Result<(AppendLog, Vec<Vec<u8>>)> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        assert!(record_bytes > 0);
        let mut file = fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let whole = bytes.len() / record_bytes * record_bytes;
        if whole != bytes.len() {
            file.set_len(whole as u64)?;
        }
        let records = bytes[..whole]
            .chunks(record_bytes)
            .map(<[u8]>::to_vec)
            .collect();
        Ok((AppendLog { file, record_bytes }, records))
    }

    pub fn append(&mut self, record: &[u8]) -> io::Result<()> {
        use std::io::Write;
        assert_eq!(record.len(), self.record_bytes);
        self.file.write_all(record)
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Creates `path` (mode 0600) holding `bytes`, durably, only if it does not exist yet:
/// `Ok(false)` when it existed (its content is left as it is). Written under a temporary
/// name and linked into place, so no reader ever sees it partly written. Safe to race
/// (threads of one daemon included: each call has a temporary name of its own).
pub fn create_file_once(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{call}", std::process::id()));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&tmp)?;
        make_private(&f)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(path.parent().unwrap_or(Path::new(".")))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// `n` bytes from the kernel's random number generator.
pub fn random_bytes(n: usize) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// A file that only grows by appends until it is cut back to a length known to be
/// durable: a `receive`'s spool of the records it has checked.
pub struct Spool {
    file: File,
    len_bytes: u64,
}

impl Spool {
    /// Opens (creating, mode 0600) the spool at `path`, cut back to `keep_bytes` (an error
    /// if it holds fewer).
    pub fn open(path: &Path, keep_bytes: u64) -> io::Result<Spool> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(PRIVATE_FILE_MODE)
            .open(path)?;
        make_private(&file)?;
        let have = file.metadata()?.len();
        if have < keep_bytes {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} holds {have} bytes, fewer than the {keep_bytes} recorded as durable",
                    path.display()
                ),
            ));
        }
        file.set_len(keep_bytes)?;
        Ok(Spool {
            file,
            len_bytes: keep_bytes,
        })
    }

    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    /// Appends `parts` in order.
    pub fn append(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        for part in parts {
            self.file.write_all_at(part, self.len_bytes)?;
            self.len_bytes += part.len() as u64;
        }
        Ok(())
    }

    /// A handle that makes the spool durable from another thread.
    pub fn syncer(&self) -> io::Result<SpoolSyncer> {
        Ok(SpoolSyncer(self.file.try_clone()?))
    }

    /// Reads the spool from its start (buffered).
    pub fn reader(path: &Path) -> io::Result<impl io::Read + use<>> {
        Ok(io::BufReader::with_capacity(2 << 20, File::open(path)?))
    }
}

/// See [`Spool::syncer`].
pub struct SpoolSyncer(File);

impl SpoolSyncer {
    pub fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_file_once_races_between_threads_of_one_process() {
        // Concurrent first sends in one daemon each make the data directory's send key:
        // exactly one creates it, every other call finds it, none fails.
        const THREADS: usize = 8;
        for round in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("key.{round}"));
            let barrier = std::sync::Barrier::new(THREADS);
            let created: Vec<bool> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|i| {
                        let (path, barrier) = (&path, &barrier);
                        s.spawn(move || {
                            barrier.wait();
                            create_file_once(path, &[i as u8; 32]).unwrap()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(created.iter().filter(|c| **c).count(), 1, "{created:?}");
            let bytes = fs::read(&path).unwrap();
            assert_eq!(bytes.len(), 32);
            assert!(bytes.iter().all(|b| *b == bytes[0]));
            // No temporary file is left behind.
            assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        }
    }
}
