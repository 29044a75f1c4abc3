//! Per-export fetch options: what an export of a lazily pulled disk may ask of its fetching
//! ([`FetchOptions`], the control API's `"fetch"` object) and what a disk was opened with
//! ([`FetchSettings`]). Owns filling them in from the service's defaults and refusing what
//! cannot be; the service applies them when it opens a disk.

use serde::Serialize;

use mcow_engine::FetchPolicy;

/// How one export's lazily pulled disk fetches, where it differs from the service's defaults
/// ([`crate::ServiceConfig::fetch`], [`crate::ServiceConfig::prefetch`],
/// [`crate::ServiceConfig::fetch_all`]): the
/// control API's `"fetch"` object. No effect on a disk with nothing to fetch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchOptions {
    /// The fetch window of sequential reads, in blocks (1 to 4096): [`FetchPolicy::window`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
    /// The most one fetch of a long sequential run asks for, in bytes (0: no read-ahead):
    /// [`FetchPolicy::readahead`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readahead: Option<u64>,
    /// Prefetch the blocks of the image's trace in the background.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<bool>,
    /// Download every remaining block in the background (not with a cache limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<bool>,
}

impl FetchOptions {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == FetchOptions::default()
    }

    /// The settings these options make of the service's `defaults`, or why they are refused
    /// (`cache_limited`: the service has a cache limit, which fetching every block defeats).
    pub(crate) fn apply(
        &self,
        defaults: FetchSettings,
        cache_limited: bool,
    ) -> Result<FetchSettings, String> {
        let window = self.window.unwrap_or(defaults.window);
        if !(1..=4096).contains(&window) {
            return Err(format!("fetch window {window}: it must be 1 to 4096 blocks"));
        }
        let all = self.all.unwrap_or(defaults.all);
        if all && cache_limited {
            return Err("fetching every block (\"all\") does not go with the server's cache limit".into());
        }
        Ok(FetchSettings {
            window,
            readahead: self.readahead.unwrap_or(defaults.readahead),
            prefetch: self.prefetch.unwrap_or(defaults.prefetch),
            all,
        })
    }
}

/// How a lazily pulled disk fetches: the service's defaults with the options of the export
/// that opened it (see [`FetchOptions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FetchSettings {
    /// The fetch window, in blocks.
    pub window: u64,
    /// The read-ahead limit, in bytes.
    pub readahead: u64,
    /// Whether the trace is prefetched.
    pub prefetch: bool,
    /// Whether every remaining block is downloaded in the background.
    pub all: bool,
}

impl FetchSettings {
    pub(crate) fn policy(&self) -> FetchPolicy {
        FetchPolicy { window: self.window, readahead: self.readahead }
    }
}
