//! The read-ahead policy of partial layers: how many blocks one fetch asks for, given the reads
//! that came before it.
//!
//! Owns: the [`FetchPolicy`] a partial layer is opened with, the windows it comes to in blocks
//! (`Windows`), and the recent streams of reads (`Streams`) with the rule that sizes the next
//! fetch from them (scattered reads fetch what they cover, sequential ones aligned windows that
//! grow past a ramp, deep queues grow fast and take the gap behind them). Pure bookkeeping: no
//! I/O, no locks, no clock. Does not own: claiming, fetching or landing blocks (see `fetch`).

/// How a partial layer fetches missing blocks: how many at once while reads follow one
/// another, and how far fetches may run ahead of a long sequential run. (A read that follows
/// no other fetches just the missing blocks it covers.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchPolicy {
    /// The window of a run of reads that continue one another: a read that continues a run
    /// fetches the missing blocks up to the next multiple of `window` blocks (or the blocks it
    /// covers, if more), until read-ahead takes over. At least 1.
    pub window: u64,
    /// Bytes one fetch of a long sequential run of reads may ask for at most. Once a run has
    /// fetched 4 MiB, its fetches grow with it (see `Streams::window_for`), so a long run
    /// costs few requests while a short one fetches what fixed windows would. Below `window`
    /// blocks (0, say), `window` wins: no read-ahead.
    pub readahead: u64,
}

impl FetchPolicy {
    /// The default window: 4 blocks (256 KiB with 64 KiB blocks), so a run of small reads costs
    /// a request per 4 blocks at most, and fetches at most 3 blocks past its end.
    pub const DEFAULT_WINDOW: u64 = 4;
    /// The default readahead: 16 MiB per request at most (see docs/BENCHMARKS.md, "Lazy
    /// deployment", for what it costs and gains).
    pub const DEFAULT_READAHEAD: u64 = 16 << 20;

    /// The largest window of a stream, in blocks of `block_size` bytes.
    pub(crate) fn max_window(&self, block_size: u64) -> u64 {
        (self.readahead / block_size).max(self.window).max(1)
    }
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy { window: Self::DEFAULT_WINDOW, readahead: Self::DEFAULT_READAHEAD }
    }
}

/// How much a stream fetches with fixed windows before its fetches start to grow: 4 MiB. Runs
/// of reads shorter than that (most files) fetch what fixed windows over them would; longer
/// ones (a big file, a whole-disk copy) move to larger requests. Measured in
/// docs/BENCHMARKS.md ("Lazy deployment").
const READAHEAD_RAMP: u64 = 4 << 20;

/// A [`FetchPolicy`] in blocks of one layer's block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Windows {
    /// The window of reads that continue one another (at least 1).
    pub(crate) first: u64,
    /// Blocks a stream fetches with fixed windows before its fetches grow ([`READAHEAD_RAMP`]).
    pub(crate) ramp: u64,
    /// The largest window of a stream.
    pub(crate) max: u64,
}

impl Windows {
    pub(crate) fn new(policy: FetchPolicy, block_size: u64) -> Windows {
        Windows {
            first: policy.window.max(1),
            ramp: READAHEAD_RAMP / block_size,
            max: policy.max_window(block_size),
        }
    }
}

/// How fast the fetches of a deep-queue stream grow: each asks for one window plus 63 times what
/// the stream fetched before it (so about 64 times as much as the one before), up to the
/// read-ahead limit, which the second such fetch usually reaches. Its reads are already waiting,
/// so little is guessed. Measured in docs/BENCHMARKS.md ("Lazy deployment"): 64 against 8 made a
/// cold 43 MB copy 7% faster (one request fewer) and fetched no more for the few-files runs.
const DEEP_GROWTH: u64 = 64;

/// Streams followed at once per layer (say, a few files read side by side, or the threads of a
/// parallel copy).
const STREAMS: usize = 8;

/// A run of fetches in ascending block order.
#[derive(Debug, Clone, Copy)]
struct Stream {
    /// The first block and the end of the last fetch.
    start: u64,
    end: u64,
    /// The window of the last fetch, and the blocks fetched in all.
    window: u64,
    fetched: u64,
    last_use: u64,
}

/// The recent streams of a layer's reads, the least recently used replaced first.
#[derive(Debug, Default)]
pub(crate) struct Streams {
    streams: Vec<Stream>,
    tick: u64,
}

impl Streams {
    /// The stream a missing block continues: it lies in the stream's span or at most one window
    /// (of the stream) past its end, so requests of one sequential reader that arrive a little
    /// out of order (a client with many requests in flight) still count as that stream.
    pub(crate) fn stream_of(&self, p: u64) -> Option<usize> {
        self.streams.iter().position(|s| s.start <= p && p <= s.end + s.window)
    }

    /// The blocks to fetch from missing block `p` on, for a read that covers `own` blocks from
    /// `p`. A read no stream leads to (a scattered read) gets just its own blocks. One that
    /// continues a stream that has fetched less than `w.ramp` blocks gets the rest of its aligned
    /// window of `w.first` blocks (so reads that continue one another fetch what a fixed window
    /// over them would). Beyond the ramp, the first window plus half of
    /// what the stream fetched past `ramp`, at most `w.max`: a long run of reads asks for fewer,
    /// larger ranges, while what a run fetches past its end stays within about half of what it
    /// read past the ramp (plus one first window). A stream whose reader is already waiting
    /// beyond a fetch in flight (a deep queue) skips the ramp and grows by [`DEEP_GROWTH`], the
    /// fetch also takes the blocks between that fetch and `p` (the second value: where that gap
    /// starts), and each such fetch starts the next one when a quarter of it is in (see
    /// `fetch::Claim`). `in_flight` holds the fetches in flight as (claim, next block, end).
    /// Never less than `own`.
    pub(crate) fn window_for(
        &self,
        w: &Windows,
        p: u64,
        own: u64,
        in_flight: &[(u64, u64, u64)],
    ) -> (u64, Option<u64>) {
        let (first, ramp, max) = (w.first, w.ramp, w.max);
        let Some(i) = self.stream_of(p) else {
            return (own, None);
        };
        let s = self.streams[i];
        // The stream's reader is already past a fetch still in flight: it has more reads
        // outstanding (a deep queue), so what lies ahead is being asked for, not guessed, and
        // the blocks between that fetch and `p` will be asked for too.
        let ahead = in_flight.iter().filter(|&&(_, a, e)| s.start <= a && e <= p).map(|&(_, _, e)| e).max();
        if let Some(gap) = ahead {
            return ((first + (DEEP_GROWTH - 1) * s.fetched).min(max.max(first)).max(own), Some(gap));
        }
        if s.fetched >= ramp {
            return ((first + (s.fetched - ramp) / 2).min(max.max(first)).max(own), None);
        }
        ((first - p % first).max(own), None)
    }

    /// Records a fetch of `count` blocks at `p` with window `window` in its stream (or a new
    /// one).
    pub(crate) fn record(&mut self, p: u64, count: u64, window: u64) {
        self.tick += 1;
        let new = Stream { start: p, end: p + count, window, fetched: count, last_use: self.tick };
        match self.stream_of(p) {
            Some(i) => {
                let s = &mut self.streams[i];
                s.end = s.end.max(p + count);
                s.window = window;
                s.fetched += count;
                s.last_use = self.tick;
            }
            None if self.streams.len() < STREAMS => self.streams.push(new),
            None => {
                let oldest = (0..self.streams.len()).min_by_key(|&i| self.streams[i].last_use).unwrap_or(0);
                self.streams[oldest] = new;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u64 = 64 << 10;

    fn windows() -> Windows {
        Windows::new(FetchPolicy::default(), BS)
    }

    /// A reader that reads `own` blocks at `p` with nothing in flight: the window it gets, which
    /// it then fetches and records, as `SealedLayer::ensure_block` does.
    fn read(s: &mut Streams, w: &Windows, p: u64, own: u64) -> u64 {
        let (window, gap) = s.window_for(w, p, own, &[]);
        assert_eq!(gap, None, "no fetch is in flight, so no gap at {p}");
        s.record(p, window, window);
        window
    }

    // The policy's windows in blocks: 4 blocks, a ramp of 4 MiB (64 blocks) and read-ahead up to
    // 16 MiB (256 blocks); a read-ahead below one window leaves the window.
    #[test]
    fn windows_follow_the_policy() {
        assert_eq!(windows(), Windows { first: 4, ramp: 64, max: 256 });
        let none = Windows::new(FetchPolicy { window: 0, readahead: 0 }, BS);
        assert_eq!(none, Windows { first: 1, ramp: 64, max: 1 });
    }

    // A sequential reader of one block at a time, each read starting where the last fetch
    // ended: the first read fetches only itself (no stream yet), the next ones fill aligned
    // windows of 4 blocks until the stream has fetched the ramp (64 blocks), then fetches grow
    // by half of what was fetched past the ramp, up to 256 blocks, and never shrink.
    #[test]
    fn sequential_reads_fetch_aligned_windows_then_grow_to_the_limit() {
        let (w, mut s) = (windows(), Streams::default());
        assert_eq!(read(&mut s, &w, 0, 1), 1);
        assert_eq!(read(&mut s, &w, 1, 1), 3, "the rest of the aligned window 0..4");
        let mut p = 4;
        while p < 64 {
            assert_eq!(read(&mut s, &w, p, 1), 4, "fixed, aligned windows before the ramp (at {p})");
            p += 4;
        }
        let mut last = 4;
        let mut sizes = Vec::new();
        while p < 4096 {
            let n = read(&mut s, &w, p, 1);
            let expect = (4 + (p - 64) / 2).min(256);
            assert_eq!(n, expect, "past the ramp, at block {p}");
            assert!(n >= last, "windows never shrink along a stream");
            (last, p) = (n, p + n);
            sizes.push(n);
        }
        assert_eq!(*sizes.last().unwrap(), 256, "a long run reaches the read-ahead limit");
        assert_eq!(sizes.iter().position(|&n| n == 256), Some(11), "eleven growing fetches first");
    }

    // A read that covers more than its window always gets all of its own blocks.
    #[test]
    fn a_read_gets_at_least_its_own_blocks() {
        let (w, mut s) = (windows(), Streams::default());
        read(&mut s, &w, 0, 1);
        assert_eq!(s.window_for(&w, 1, 10, &[]), (10, None));
    }

    // Scattered reads, each far from every stream: every one fetches just the blocks it covers,
    // and no more than 8 streams are remembered (the least recently used goes first).
    #[test]
    fn scattered_reads_fetch_only_what_they_cover() {
        let (w, mut s) = (windows(), Streams::default());
        for i in 0..100u64 {
            let p = (i * 7919) % 1000 * 100; // far apart, in no order
            assert_eq!(read(&mut s, &w, p, 2), 2, "scattered read at {p}");
        }
        assert_eq!(s.streams.len(), STREAMS);
        // A stream is followed while the reader stays within one window of its end.
        let (w, mut s) = (windows(), Streams::default());
        read(&mut s, &w, 1000, 1); // stream 1000..1001, window 1
        assert_eq!(s.window_for(&w, 1002, 1, &[]).0, 4 - 1002 % 4, "one window past: continues");
        assert_eq!(s.window_for(&w, 1003, 1, &[]).0, 1, "further: scattered");
        assert_eq!(s.window_for(&w, 999, 1, &[]).0, 1, "before the stream: scattered");
    }

    // A deep-queue reader: its stream has a fetch in flight (blocks 4..8) and the reader already
    // asks for block 12, past it. The fetch skips the ramp (4 + 63 * 8 blocks, capped at 256)
    // and reports the gap from 8, so that blocks 8..12 are fetched along. A fetch in flight that
    // does not lie before the read (or is outside the stream) makes no gap.
    #[test]
    fn deep_queue_reads_grow_at_once_and_take_the_gap() {
        let (w, mut s) = (windows(), Streams::default());
        read(&mut s, &w, 0, 1); // 0..1
        read(&mut s, &w, 1, 1); // 1..4
        s.record(4, 4, 4); // 4..8, in flight
        assert_eq!(s.window_for(&w, 12, 1, &[(7, 4, 8)]), (256, Some(8)));
        let small = Windows { first: 4, ramp: 64, max: 1024 };
        assert_eq!(s.window_for(&small, 12, 1, &[(7, 4, 8)]), (4 + 63 * 8, Some(8)));
        // In flight but not behind the read: an ordinary sequential window.
        assert_eq!(s.window_for(&w, 8, 1, &[(7, 8, 12)]), (4, None));
        // Behind the read, but before the stream starts.
        let mut t = Streams::default();
        t.record(100, 4, 4);
        assert_eq!(t.window_for(&w, 104, 1, &[(1, 50, 60)]), (4, None));
    }
}
