//! A local directory as an object store: the embedded default remote (`file://`).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{RemoteError, Result};
use crate::layout::ObjectStore;
use crate::range::{RangeRead, Sink};

pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    pub fn new(root: impl Into<PathBuf>) -> DirStore {
        DirStore { root: root.into() }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Writes through a temporary file and a rename, so readers never see a partial object.
    fn write_atomic(&self, key: &str, fill: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
        let dest = self.path(key);
        let dir = dest.parent().expect("keys have a parent").to_path_buf();
        fs::create_dir_all(&dir).map_err(RemoteError::io("create directory", &dir))?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            dest.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let mut f = File::create(&tmp).map_err(RemoteError::io("create", &tmp))?;
        fill(&mut f).and_then(|_| f.sync_all()).map_err(RemoteError::io("write", &tmp))?;
        fs::rename(&tmp, &dest).map_err(RemoteError::io("rename", &tmp))
    }
}

impl RangeRead<str> for DirStore {
    fn stream_range(&self, key: &str, offset: u64, len: u64, sink: &mut Sink<'_>) -> Result<()> {
        let p = self.path(key);
        let f = File::open(&p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                RemoteError::NotFound { what: key.to_string(), location: self.describe() }
            }
            _ => RemoteError::io("open", &p)(e),
        })?;
        let size = f.metadata().map_err(RemoteError::io("stat", &p))?.len();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(RemoteError::OutOfRange {
                location: p.display().to_string(),
                object: "file",
                offset,
                end: offset.saturating_add(len),
                size,
            });
        }
        let mut buf = vec![0u8; (1 << 20).min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = buf.len().min((len - done) as usize);
            f.read_exact_at(&mut buf[..n], offset + done).map_err(RemoteError::io("read", &p))?;
            if !sink(&buf[..n]) {
                break;
            }
            done += n as u64;
        }
        Ok(())
    }
}

impl ObjectStore for DirStore {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.path(key).is_file())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match fs::read(self.path(key)) {
            Ok(b) => Ok(Some(b)),
            // A path through a file is as missing as one through nothing.
            Err(e)
                if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) =>
            {
                Ok(None)
            }
            Err(e) => Err(RemoteError::io("read", self.path(key))(e)),
        }
    }

    fn get_to(&self, key: &str, dest: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let p = self.path(key);
        let mut src = File::open(&p).map_err(RemoteError::io("open", &p))?;
        let mut out = File::create(dest).map_err(RemoteError::io("create", dest))?;
        copy_with_progress(&mut src, &mut out, progress).map_err(RemoteError::io("copy", &p))
    }

    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.write_atomic(key, |f| f.write_all(bytes))
    }

    fn put_file(&self, key: &str, path: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let mut src = File::open(path).map_err(RemoteError::io("open", path))?;
        self.write_atomic(key, |f| copy_with_progress(&mut src, f, progress))
    }

    fn why_no_layout(&self) -> String {
        match fs::metadata(&self.root) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "the directory does not exist".into(),
            Err(e) => format!("cannot read the directory: {e}"),
            Ok(m) if !m.is_dir() => "it is not a directory".into(),
            Ok(_) => "the directory has no index.json (no image was pushed there)".into(),
        }
    }
}

/// Copies in 1 MiB steps, reporting the bytes copied so far.
pub fn copy_with_progress(
    src: &mut dyn Read,
    dst: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            return dst.flush();
        }
        dst.write_all(&buf[..n])?;
        done += n as u64;
        progress(done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A range past the end of a file is the typed `OutOfRange` (same message as before), and
    /// an I/O failure keeps its `io::Error` as the source.
    #[test]
    fn ranges_past_the_end_and_io_errors_are_typed() {
        let t = tempfile::tempdir().unwrap();
        let store = DirStore::new(t.path());
        store.put_bytes("obj", b"0123456789").unwrap();
        assert_eq!(store.get_range("obj", 2, 8).unwrap(), b"23456789");
        let e = store.get_range("obj", 4, 7).unwrap_err();
        assert!(
            matches!(e, RemoteError::OutOfRange { object: "file", offset: 4, end: 11, size: 10, .. }),
            "{e:?}"
        );
        assert!(e.to_string().ends_with("obj: bytes 4..11 asked for, but the file has 10"), "{e}");
        let e = store.put_file("x", &t.path().join("missing"), &mut |_| {}).unwrap_err();
        let source = std::error::Error::source(&e).expect("an I/O error has its source");
        assert_eq!(
            source.downcast_ref::<std::io::Error>().map(|e| e.kind()),
            Some(std::io::ErrorKind::NotFound)
        );
    }
}
