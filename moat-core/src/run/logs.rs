//! A run's output in `logs.jsonl`: one JSON object per chunk of output,
//! written as it arrives.
//!
//! ```json
//! {"t":"2026-11-22T10:00:00.123Z","s":"stdout","d":"hello\n"}
//! {"t":"2026-11-22T10:00:00.124Z","s":"stderr","b":"/wA="}
//! ```
//!
//! `s` is `stdout`, `stderr` or `moat` (a note from moat, such as the log
//! reaching its size limit); `d` holds text, `b` base64 for output that is not
//! UTF-8. Concatenating the chunks of a stream gives its exact bytes.
//! Chunks are split after each newline, so a line never spans two entries
//! unless it arrived in pieces.

use std::io::{BufRead, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default bound on a run's log file.
pub const DEFAULT_LIMIT: u64 = 64 * 1024 * 1024;

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output (or the TTY).
    Stdout,
    /// Standard error.
    Stderr,
    /// A note from moat.
    Moat,
}

/// One chunk of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// When it arrived (RFC 3339).
    pub time: String,
    /// Its stream.
    pub stream: Stream,
    /// Its bytes.
    pub data: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Line {
    t: String,
    s: Stream,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    d: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    b: Option<String>,
}

impl Chunk {
    fn from_line(text: &str) -> Option<Chunk> {
        let line: Line = serde_json::from_str(text).ok()?;
        let data = match (line.d, line.b) {
            (Some(d), _) => d.into_bytes(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD.decode(b).ok()?,
            (None, None) => Vec::new(),
        };
        Some(Chunk {
            time: line.t,
            stream: line.s,
            data,
        })
    }
}

/// Appends chunks to a run's `logs.jsonl`, up to a size limit.
#[derive(Debug)]
pub struct LogWriter {
    file: std::fs::File,
    path: PathBuf,
    written: u64,
    limit: u64,
    full: bool,
    /// Output could not be written (a full disk): why, and how many bytes
    /// were lost since.
    lost: Option<(String, u64)>,
}

impl LogWriter {
    /// Creates (or appends to) `path`.
    pub fn open(path: &Path, limit: u64) -> Result<LogWriter> {
        let file = crate::paths::open_private(path, crate::paths::Open::Append)?;
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(LogWriter {
            file,
            path: path.to_path_buf(),
            written,
            limit,
            full: false,
            lost: None,
        })
    }

    /// Why output was lost and how many bytes, if it was.
    pub fn lost(&self) -> Option<(&str, u64)> {
        self.lost.as_ref().map(|(why, n)| (why.as_str(), *n))
    }

    /// Writes a note of moat's own (`moat: <text>`) on the `moat` stream,
    /// also after output was lost (when the run is over and there is room
    /// again): writing resumes with it.
    pub fn note(&mut self, text: &str) -> Result<()> {
        self.lost = None;
        let time = crate::trace::now_rfc3339();
        self.entry(&time, Stream::Moat, format!("moat: {text}\n").as_bytes())
    }

    /// Records output of `stream`, one entry per line.
    pub fn write(&mut self, stream: Stream, data: &[u8]) -> Result<()> {
        let time = crate::trace::now_rfc3339();
        for piece in data.split_inclusive(|b| *b == b'\n') {
            self.entry(&time, stream, piece)?;
        }
        Ok(())
    }

    fn entry(&mut self, time: &str, stream: Stream, piece: &[u8]) -> Result<()> {
        if self.full {
            return Ok(());
        }
        if let Some((_, n)) = &mut self.lost {
            *n += piece.len() as u64;
            return Ok(());
        }
        let line = match std::str::from_utf8(piece) {
            Ok(text) => Line {
                t: time.to_string(),
                s: stream,
                d: Some(text.to_string()),
                b: None,
            },
            Err(_) => Line {
                t: time.to_string(),
                s: stream,
                d: None,
                b: Some(base64::engine::general_purpose::STANDARD.encode(piece)),
            },
        };
        let mut bytes = serde_json::to_vec(&line).map_err(|e| {
            Error::new(
                crate::ErrorKind::Internal,
                format!("encoding a log line: {e}"),
            )
        })?;
        bytes.push(b'\n');
        if self.written + bytes.len() as u64 > self.limit {
            self.full = true;
            let note = Line {
                t: time.to_string(),
                s: Stream::Moat,
                d: Some(format!(
                    "moat: the log reached its limit of {} bytes; later output is not kept\n",
                    self.limit
                )),
                b: None,
            };
            bytes = serde_json::to_vec(&note).unwrap_or_default();
            bytes.push(b'\n');
        }
        if let Err(e) = self.file.write_all(&bytes) {
            // No torn line is left behind (truncating needs no space); later
            // output is counted, not written, until `note_lost`.
            let _ = self.file.set_len(self.written);
            let err = Error::io(&self.path, "write", e);
            self.lost = Some((err.to_string(), piece.len() as u64));
            return Err(err);
        }
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// Reads every chunk of a log file.
pub fn read_all(path: &Path) -> Result<Vec<Chunk>> {
    Follower::new(path, 0).poll()
}

/// The chunks holding the last `n` lines of output.
pub fn tail(chunks: &[Chunk], n: usize) -> &[Chunk] {
    let mut lines = 0;
    let mut start = chunks.len();
    while start > 0 {
        let c = &chunks[start - 1];
        if c.data.ends_with(b"\n") {
            if lines == n {
                break;
            }
            lines += 1;
        }
        start -= 1;
    }
    &chunks[start..]
}

/// Reads a log file as it grows: each [`Follower::poll`] returns the chunks
/// completed since the last.
#[derive(Debug, Clone)]
pub struct Follower {
    path: PathBuf,
    offset: u64,
}

impl Follower {
    /// Follows `path` from byte `offset` (0: the beginning).
    pub fn new(path: &Path, offset: u64) -> Follower {
        Follower {
            path: path.to_path_buf(),
            offset,
        }
    }

    /// Follows `path` from its current end.
    pub fn at_end(path: &Path) -> Follower {
        let offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Follower::new(path, offset)
    }

    /// The byte offset reached.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The chunks written since the last poll (none when the file does not
    /// exist yet). Never blocks.
    pub fn poll(&mut self) -> Result<Vec<Chunk>> {
        let mut out = Vec::new();
        let Ok(file) = std::fs::File::open(&self.path) else {
            return Ok(out);
        };
        let mut reader = std::io::BufReader::new(file);
        reader
            .seek(std::io::SeekFrom::Start(self.offset))
            .map_err(|e| Error::io(&self.path, "read", e))?;
        // Bytes, not text: a line still being written may end inside a
        // UTF-8 character; only complete lines are decoded.
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| Error::io(&self.path, "read", e))?;
            if n == 0 || !line.ends_with(b"\n") {
                break;
            }
            self.offset += n as u64;
            if let Some(chunk) = std::str::from_utf8(&line)
                .ok()
                .and_then(|text| Chunk::from_line(text.trim_end()))
            {
                out.push(chunk);
            }
        }
        Ok(out)
    }

    /// Waits up to `within` for new chunks or for `done()`, polling the
    /// file with a backoff from 2 to 20 ms: the chunks (perhaps none), and
    /// whether `done()` was true before they were read (so a caller that
    /// sees it true and gets nothing has read everything).
    pub fn wait(
        &mut self,
        done: &mut dyn FnMut() -> bool,
        within: Duration,
    ) -> Result<(Vec<Chunk>, bool)> {
        let started = std::time::Instant::now();
        let mut delay = Duration::from_millis(2);
        loop {
            let finished = done();
            let chunks = self.poll()?;
            if !chunks.is_empty() || finished || started.elapsed() >= within {
                return Ok((chunks, finished));
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(20));
        }
    }
}

/// Follows a log file from `offset`: gives each new chunk to `each` until
/// `done()` is true and the file holds nothing more. Returns the offset
/// reached. `each` returning `false` stops early.
pub fn follow(
    path: &Path,
    offset: u64,
    done: &mut dyn FnMut() -> bool,
    each: &mut dyn FnMut(Chunk) -> bool,
) -> Result<u64> {
    let mut follower = Follower::new(path, offset);
    loop {
        let (chunks, finished) = follower.wait(done, Duration::MAX)?;
        if finished && chunks.is_empty() {
            return Ok(follower.offset());
        }
        for chunk in chunks {
            if !each(chunk) {
                return Ok(follower.offset());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_waits_for_output_or_the_end_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs.jsonl");
        let mut follower = Follower::new(&path, 0);
        // Nothing written, not over: back after the bound, empty-handed.
        let started = std::time::Instant::now();
        let (chunks, over) = follower
            .wait(&mut || false, Duration::from_millis(60))
            .unwrap();
        assert!(chunks.is_empty() && !over);
        assert!(started.elapsed() >= Duration::from_millis(60));
        assert!(started.elapsed() < Duration::from_secs(2));
        // Output written while it waits arrives without waiting the bound.
        let writer = std::thread::spawn({
            let path = path.clone();
            move || {
                std::thread::sleep(Duration::from_millis(30));
                let mut w = LogWriter::open(&path, DEFAULT_LIMIT).unwrap();
                w.write(Stream::Stdout, b"hello\n").unwrap();
            }
        });
        let started = std::time::Instant::now();
        let (chunks, _) = follower
            .wait(&mut || false, Duration::from_secs(30))
            .unwrap();
        writer.join().unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].data, b"hello\n");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Over: at once, and `follow` ends with everything read.
        let (chunks, over) = follower
            .wait(&mut || true, Duration::from_secs(30))
            .unwrap();
        assert!(chunks.is_empty() && over);
        let mut seen = Vec::new();
        let end = follow(&path, 0, &mut || true, &mut |c| {
            seen.extend(c.data);
            true
        })
        .unwrap();
        assert_eq!(seen, b"hello\n");
        assert_eq!(end, follower.offset());
    }

    #[test]
    fn chunks_round_trip_bytes_and_split_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs.jsonl");
        let mut w = LogWriter::open(&path, DEFAULT_LIMIT).unwrap();
        w.write(Stream::Stdout, b"one\ntwo\nthr").unwrap();
        w.write(Stream::Stderr, &[0xff, 0x00, b'\n']).unwrap();
        w.write(Stream::Stdout, b"ee\n").unwrap();
        let chunks = read_all(&path).unwrap();
        let out: Vec<u8> = chunks
            .iter()
            .filter(|c| c.stream == Stream::Stdout)
            .flat_map(|c| c.data.clone())
            .collect();
        assert_eq!(out, b"one\ntwo\nthree\n");
        let err: Vec<u8> = chunks
            .iter()
            .filter(|c| c.stream == Stream::Stderr)
            .flat_map(|c| c.data.clone())
            .collect();
        assert_eq!(err, vec![0xff, 0x00, b'\n']);
        assert_eq!(chunks.len(), 5);
        let last_two: Vec<u8> = tail(&chunks, 2)
            .iter()
            .flat_map(|c| c.data.clone())
            .collect();
        // Stream pieces interleave: the tail starts at the partial "thr".
        assert_eq!(last_two, b"thr\xff\x00\nee\n");
    }

    #[test]
    fn the_log_stops_at_its_limit_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs.jsonl");
        let mut w = LogWriter::open(&path, 400).unwrap();
        for _ in 0..100 {
            w.write(Stream::Stdout, b"0123456789\n").unwrap();
        }
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < 600, "{size}");
        let chunks = read_all(&path).unwrap();
        let last = chunks.last().unwrap();
        assert_eq!(last.stream, Stream::Moat);
        assert!(String::from_utf8_lossy(&last.data).contains("limit of 400 bytes"));
    }

    #[test]
    fn follow_reads_until_done() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs.jsonl");
        let mut w = LogWriter::open(&path, DEFAULT_LIMIT).unwrap();
        w.write(Stream::Stdout, b"a\n").unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            w.write(Stream::Stdout, b"b\n").unwrap();
        });
        let mut seen = Vec::new();
        let start = std::time::Instant::now();
        follow(
            &path,
            0,
            &mut || start.elapsed() > Duration::from_millis(200),
            &mut |c| {
                seen.extend(c.data);
                true
            },
        )
        .unwrap();
        writer.join().unwrap();
        assert_eq!(seen, b"a\nb\n");
    }
}
