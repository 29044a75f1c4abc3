//! Which registry repositories are known to hold each blob, remembered per layer store in
//! `<store>/blob-locations.json`, so that a push to another repository of the same registry
//! can mount a blob (`POST …/blobs/uploads/?mount=…&from=…`) instead of uploading it, as
//! container tools remember where each layer came from.
//!
//! It is a hint, never trusted: a registry that does not hold the blob in the named repository
//! (or does not mount) answers with an upload session, and the blob is uploaded. A missing,
//! unreadable or unknown file is an empty record; concurrent writers may lose each other's
//! additions (the file is replaced whole, by rename). Specified in docs/FORMAT.md ("Blob
//! locations").

use std::path::PathBuf;

use mcow_engine::store::LayerStore;
use mcow_format::Digest;
use serde::{Deserialize, Serialize};

use crate::error::{RemoteError, Result};
use crate::reference::{Location, Reference};

/// File name of the record in a layer store's directory.
pub const LOCATIONS_FILE: &str = "blob-locations.json";
/// The record's version.
const VERSION: u32 = 1;
/// Blobs remembered: the least recently seen are dropped beyond this.
const MAX_BLOBS: usize = 4096;
/// Repositories remembered per blob (the most recently seen).
const MAX_REPOSITORIES: usize = 8;

/// A repository of a registry: `HOST[:PORT]` as references write it, and the repository name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repository {
    /// `HOST[:PORT]`, lower case.
    pub host: String,
    /// The repository name, as in `/v2/<name>/…`.
    pub name: String,
}

impl Repository {
    /// The registry repository `reference` names, if it names one (`oci://`).
    pub fn of(reference: &Reference) -> Option<Repository> {
        match &reference.location {
            Location::Registry { base, repository } => Some(Repository {
                host: base.split_once("://").map_or(base.as_str(), |(_, h)| h).to_ascii_lowercase(),
                name: repository.clone(),
            }),
            _ => None,
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.host, self.name)
    }

    fn from_key(key: &str) -> Option<Repository> {
        let (host, name) = key.split_once('/')?;
        (!host.is_empty() && !name.is_empty())
            .then(|| Repository { host: host.to_string(), name: name.to_string() })
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    version: u32,
    /// Least recently seen first.
    blobs: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    digest: Digest,
    /// `HOST[:PORT]/REPOSITORY`, least recently seen first.
    repositories: Vec<String>,
}

/// The blob locations of one layer store, loaded into memory; [`BlobLocations::save`] writes
/// them back.
pub struct BlobLocations {
    store: LayerStore,
    path: PathBuf,
    file: File,
    /// The file on disk has a version we do not know: leave it alone.
    foreign: bool,
    changed: bool,
}

impl BlobLocations {
    /// The record of `store` (empty if there is none, or it cannot be read: it is only a hint,
    /// and a warning says why).
    pub fn load(store: &LayerStore) -> BlobLocations {
        let path = store.root().join(LOCATIONS_FILE);
        let mut foreign = false;
        let file = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<File>(&bytes) {
                Ok(f) if f.version == VERSION => f,
                Ok(f) => {
                    tracing::warn!(path = %path.display(), version = f.version, "unknown version: not used");
                    foreign = true;
                    File::default()
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable: starting afresh");
                    File::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => File::default(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable: not used");
                foreign = true;
                File::default()
            }
        };
        BlobLocations { store: store.clone(), path, file, foreign, changed: false }
    }

    /// The repositories of `host` other than `except` known to hold `digest`, the most
    /// recently seen first.
    pub fn repositories(&self, digest: &Digest, except: &Repository) -> Vec<String> {
        let Some(e) = self.file.blobs.iter().find(|e| e.digest == *digest) else {
            return Vec::new();
        };
        e.repositories
            .iter()
            .rev()
            .filter_map(|k| Repository::from_key(k))
            .filter(|r| r.host == except.host && r.name != except.name)
            .map(|r| r.name)
            .collect()
    }

    /// Records that `repository` holds `digest` (now the most recently seen of both).
    pub fn add(&mut self, digest: &Digest, repository: &Repository) {
        let key = repository.key();
        let mut entry = match self.file.blobs.iter().position(|e| e.digest == *digest) {
            Some(i) => self.file.blobs.remove(i),
            None => Entry { digest: *digest, repositories: Vec::new() },
        };
        entry.repositories.retain(|k| *k != key);
        entry.repositories.push(key);
        if entry.repositories.len() > MAX_REPOSITORIES {
            entry.repositories.drain(..entry.repositories.len() - MAX_REPOSITORIES);
        }
        self.file.blobs.push(entry);
        if self.file.blobs.len() > MAX_BLOBS {
            self.file.blobs.drain(..self.file.blobs.len() - MAX_BLOBS);
        }
        self.changed = true;
    }

    /// Writes the record back if it changed (through a temporary of the store and a rename).
    pub fn save(&mut self) -> Result<()> {
        if !self.changed || self.foreign {
            return Ok(());
        }
        self.file.version = VERSION;
        let bytes = serde_json::to_vec(&self.file).expect("blob locations serialize");
        let mut tmp = self.store.temp_file("blob-locations")?;
        let io = RemoteError::io("write", tmp.path());
        std::io::Write::write_all(&mut tmp.file(), &bytes)
            .and_then(|()| tmp.file().sync_all())
            .map_err(io)?;
        std::fs::rename(tmp.path(), &self.path).map_err(RemoteError::io("rename", tmp.path()))?;
        tmp.persisted();
        self.changed = false;
        Ok(())
    }

    /// [`BlobLocations::save`], with a failure only logged: losing the hint costs uploads,
    /// never correctness.
    pub fn save_or_warn(&mut self) {
        if let Err(e) = self.save() {
            tracing::warn!(path = %self.path.display(), error = %e, "could not record blob locations");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(text: &str) -> Repository {
        Repository::of(&Reference::parse(text).unwrap()).unwrap()
    }

    /// Tried: blobs recorded at repositories of two registries, saved, loaded again, more than
    /// the per-blob cap added. Must hold: only the other repositories of the same registry come
    /// back, the most recent first; the cap keeps the most recent; a garbled file is an empty
    /// record (not an error) and is replaced by the next save.
    #[test]
    fn records_survive_a_reload_and_answer_per_registry() {
        let t = tempfile::tempdir().unwrap();
        let store = LayerStore::new(t.path());
        let (d1, d2) = (Digest::of(b"one"), Digest::of(b"two"));
        let a = repo("oci://127.0.0.1:5000/mcow/a:v1");
        let b = repo("oci://127.0.0.1:5000/mcow/b");
        let elsewhere = repo("oci://LOCALHOST:6000/mcow/c");
        let mut l = BlobLocations::load(&store);
        l.add(&d1, &a);
        l.add(&d1, &elsewhere);
        l.add(&d1, &b);
        l.save().unwrap();
        let mut l = BlobLocations::load(&store);
        assert_eq!(l.repositories(&d1, &repo("oci://127.0.0.1:5000/other")), ["mcow/b", "mcow/a"]);
        assert_eq!(l.repositories(&d1, &a), ["mcow/b"]);
        assert_eq!(l.repositories(&d1, &repo("oci://localhost:6000/x")), ["mcow/c"]);
        assert!(l.repositories(&d2, &a).is_empty());
        for i in 0..20 {
            l.add(&d2, &repo(&format!("oci://127.0.0.1:5000/r{i}")));
        }
        let got = l.repositories(&d2, &a);
        assert_eq!(got.len(), MAX_REPOSITORIES);
        assert_eq!(got[0], "r19");
        std::fs::write(t.path().join(LOCATIONS_FILE), b"{not json").unwrap();
        let mut l = BlobLocations::load(&store);
        assert!(l.repositories(&d1, &b).is_empty());
        l.add(&d2, &a);
        l.save().unwrap();
        assert_eq!(BlobLocations::load(&store).repositories(&d2, &b), ["mcow/a"]);
    }
}
