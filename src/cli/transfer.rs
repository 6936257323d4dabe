//! `import` and `export`: copying between a volume and a raw image file in 1 MiB blocks.

use super::progress::{Progress, Show};
use anyhow::{Context, Result, bail};
use snapvol::io::fs::{FileId, make_private, unusable_kind};
use snapvol::{DataDir, Volume};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Transfer unit.
pub const BLOCK_BYTES: usize = 1 << 20;

/// How a transfer runs, besides what it copies.
pub struct How<'a> {
    /// The file as the user named it, for messages.
    pub shown: &'a Path,
    /// Progress on this process's stderr (a bar, or lines without a terminal); false: in
    /// the daemon's log.
    pub progress: bool,
    /// Checked before each block: true stops the transfer with an error.
    pub cancelled: &'a dyn Fn() -> bool,
    /// The data directory whose own files (origins, stores, journals, ...) are never
    /// read or written as the user's file.
    pub data_dir: &'a DataDir,
}

impl How<'_> {
    fn check_cancelled(&self, done: u64) -> Result<()> {
        if (self.cancelled)() {
            bail!("interrupted after {done} bytes: the daemon is shutting down");
        }
        Ok(())
    }
}

/// Size of an open regular file or block device.
fn file_len(file: &mut File) -> std::io::Result<u64> {
    let len = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    Ok(len)
}

/// Clears `O_NONBLOCK` again after an open that must not block (see [`open_checked`]).
fn clear_nonblocking(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl(F_GETFL) on a descriptor `file` keeps open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above; F_SETFL takes the flags as a plain integer.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Refuses what import and export never use: a FIFO or socket (whose open could block a
/// daemon thread forever, or that is not a disk image), a directory, and any file of the
/// data directory (a volume's origin, store, journal, ...). `what` is e.g.
/// `export into x.img`.
fn refuse(meta: &std::fs::Metadata, what: &str, how: &How) -> Result<()> {
    let t = meta.file_type();
    if t.is_fifo() || t.is_socket() || t.is_dir() {
        let kind = unusable_kind(meta).unwrap_or("not a file");
        bail!("refusing to {what}: it is {kind}");
    }
    how.data_dir
        .refuse_own_file(FileId::of(meta), || what.to_string())?;
    Ok(())
}

/// Opens the user's image file with `opts`, without blocking in the open (`O_NONBLOCK`,
/// cleared again after) and checking the opened file itself (not only its path, which
/// may change in between) with [`refuse`].
fn open_checked(path: &Path, opts: &mut OpenOptions, what: &str, how: &How) -> Result<File> {
    let shown = how.shown.display();
    // The path first: a FIFO is refused before any open.
    if let Ok(meta) = std::fs::metadata(path) {
        refuse(&meta, what, how)?;
    }
    let f = opts
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot open {shown}"))?;
    let meta = f
        .metadata()
        .with_context(|| format!("cannot inspect {shown}"))?;
    refuse(&meta, what, how)?;
    clear_nonblocking(&f).with_context(|| format!("cannot open {shown}"))?;
    Ok(f)
}

/// Writes `file` into `vol` from offset 0; returns the number of bytes read from the file.
pub fn import(vol: &Volume, file: &Path, how: &How) -> Result<u64> {
    let shown = how.shown.display();
    let what = format!("import from {shown}");
    let mut f = open_checked(file, OpenOptions::new().read(true), &what, how)?;
    let len = file_len(&mut f).with_context(|| format!("cannot read the size of {shown}"))?;
    let vol_size = vol.size_bytes();
    if len > vol_size {
        bail!(
            "{shown} is {len} bytes, larger than volume {:?} ({vol_size} bytes)",
            vol.name()
        );
    }
    let bar = Progress::new(
        len,
        Show::for_command(how.progress),
        &format!("import {}", vol.name()),
    );
    let mut buf = vec![0u8; BLOCK_BYTES];
    let mut offset = 0u64;
    while offset < len {
        how.check_cancelled(offset)?;
        let n = (len - offset).min(BLOCK_BYTES as u64) as usize;
        f.read_exact(&mut buf[..n])
            .with_context(|| format!("cannot read {shown} at offset {offset}"))?;
        vol.write(offset, &buf[..n])?;
        offset += n as u64;
        bar.inc(n as u64);
    }
    vol.flush()?;
    bar.finish();
    Ok(len)
}

/// Writes the live volume (or snapshot `snapshot`) to `file`, sparse where the data is
/// zero; returns the number of bytes exported (the volume size).
/// Whether `export` may replace an existing regular file.
#[derive(Debug, Clone, Copy)]
pub struct Replace {
    pub force: bool,
}

pub fn export(
    vol: &Volume,
    snapshot: Option<&str>,
    file: &Path,
    how: &How,
    replace: Replace,
) -> Result<u64> {
    let shown = how.shown.display();
    let size = vol.size_bytes();
    // Fail on an unknown snapshot before creating or truncating the file.
    if let Some(snap) = snapshot
        && vol.snapshot_id(snap).is_err()
    {
        return Err(snapvol::Error::NoSuchSnapshot {
            volume: vol.name().to_string(),
            snapshot: snap.to_string(),
        }
        .into());
    }
    let what = format!("export into {shown}");
    // A new file is the daemon's: private whatever the umask. An existing one keeps its
    // mode, and is truncated only once it is known not to be one of the data directory's.
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(snapvol::io::fs::PRIVATE_FILE_MODE)
        .open(file);
    let (mut f, created) = match created {
        Ok(f) => {
            make_private(&f).with_context(|| format!("cannot create {shown}"))?;
            (f, Some(()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (
            open_checked(
                file,
                OpenOptions::new().write(true).create(true),
                &what,
                how,
            )?,
            None,
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot create {shown}")),
    };
    // A block device keeps its size and old contents: write every block, never truncate.
    let is_device = f
        .metadata()
        .with_context(|| format!("cannot inspect {shown}"))?
        .file_type()
        .is_block_device();
    if !is_device {
        if created.is_none() && !replace.force {
            bail!("{shown} already exists; give --force to replace it");
        }
        f.set_len(0)
            .with_context(|| format!("cannot truncate {shown}"))?;
    }
    if is_device {
        let dev_len =
            file_len(&mut f).with_context(|| format!("cannot read the size of {shown}"))?;
        if dev_len < size {
            bail!("{shown} is {dev_len} bytes, smaller than the {size} bytes to export");
        }
    }
    let label = match snapshot {
        Some(s) => format!("export {}@{s}", vol.name()),
        None => format!("export {}", vol.name()),
    };
    let bar = Progress::new(size, Show::for_command(how.progress), &label);
    let mut buf = vec![0u8; BLOCK_BYTES];
    let mut offset = 0u64;
    while offset < size {
        how.check_cancelled(offset)?;
        let n = (size - offset).min(BLOCK_BYTES as u64) as usize;
        let block = &mut buf[..n];
        match snapshot {
            Some(s) => vol.read_snapshot(s, offset, block)?,
            None => vol.read(offset, block)?,
        }
        // The file was truncated, so skipping a zero block leaves a hole that reads as zeros.
        if is_device || !is_zero(block) {
            f.write_all_at(block, offset)
                .with_context(|| format!("cannot write {shown} at offset {offset}"))?;
        }
        offset += n as u64;
        bar.inc(n as u64);
    }
    if !is_device {
        f.set_len(size)
            .with_context(|| format!("cannot set the size of {shown}"))?;
    }
    f.sync_all()
        .with_context(|| format!("cannot sync {shown}"))?;
    bar.finish();
    Ok(size)
}

fn is_zero(block: &[u8]) -> bool {
    let words = block.chunks_exact(8);
    let tail = words.remainder();
    tail.iter().all(|&b| b == 0)
        && words
            .into_iter()
            .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero_blocks() {
        assert!(super::is_zero(&[]));
        assert!(super::is_zero(&[0; 13]));
        for i in 0..13 {
            let mut b = [0u8; 13];
            b[i] = 1;
            assert!(!super::is_zero(&b), "{i}");
        }
    }
}
