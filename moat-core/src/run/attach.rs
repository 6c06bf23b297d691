//! Interactive attach: the caller's terminal wired to a run's TTY, with the
//! seeds' escape sequences read from the input: `Ctrl-/ d` detaches,
//! `Ctrl-/ k` stops the run. Putting the terminal in raw mode is the
//! caller's business (the CLI does it); this module moves bytes.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::{load_meta, run_dir, RunMeta};
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::Output;

/// `Ctrl-/` (and `Ctrl-_`, the same byte).
pub const ESCAPE: u8 = 0x1f;

/// How an interactive attach ended.
#[derive(Debug, Clone, PartialEq)]
pub enum AttachEnd {
    /// The command exited; the run's final metadata.
    Exited(RunMeta),
    /// The user detached (`Ctrl-/ d`); the run goes on.
    Detached,
    /// The user stopped the run (`Ctrl-/ k`); its final metadata.
    Stopped(RunMeta),
}

/// What a piece of input means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Bytes for the container.
    Forward(Vec<u8>),
    /// Detach.
    Detach,
    /// Stop the run.
    Stop,
}

/// Splits input into bytes to forward and escape commands. An escape byte
/// at the end of a read waits for the next read; `Ctrl-/` followed by any
/// other byte forwards both.
#[derive(Debug, Default)]
pub struct EscapeReader {
    pending: bool,
}

impl EscapeReader {
    /// Interprets one read of input.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Input> {
        let mut out = Vec::new();
        let mut forward = Vec::new();
        for &b in data {
            if self.pending {
                self.pending = false;
                match b {
                    b'd' => {
                        flush(&mut out, &mut forward);
                        out.push(Input::Detach);
                        return out;
                    }
                    b'k' => {
                        flush(&mut out, &mut forward);
                        out.push(Input::Stop);
                        return out;
                    }
                    other => {
                        forward.push(ESCAPE);
                        forward.push(other);
                    }
                }
            } else if b == ESCAPE {
                self.pending = true;
            } else {
                forward.push(b);
            }
        }
        flush(&mut out, &mut forward);
        out
    }
}

fn flush(out: &mut Vec<Input>, forward: &mut Vec<u8>) {
    if !forward.is_empty() {
        out.push(Input::Forward(std::mem::take(forward)));
    }
}

/// Attaches `input` and `output` to a running run's TTY until the command
/// exits or the user detaches or stops it. `size` gives the terminal's
/// `(rows, cols)`; it is asked at once and again whenever the terminal is
/// resized (SIGWINCH). Input is read on a thread of its own.
///
/// `attached`, when given, is called once the engine has attached and
/// before anything is read: a run started with [`super::start_held`]
/// releases its container there, so not a byte of its output is missed.
/// An error from it ends the attach with that error.
pub fn attach_tty(
    home: &Path,
    id: &str,
    input: Box<dyn Read + Send>,
    mut output: Box<dyn Write + Send>,
    size: &(dyn Fn() -> Option<(u16, u16)> + Send + Sync),
    attached: Option<Box<dyn FnOnce() -> Result<()> + Send>>,
) -> Result<AttachEnd> {
    let meta = super::refresh(home, load_meta(&run_dir(home, id))?);
    if meta.state.is_terminal() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "run {} has {}; there is nothing to attach to",
                meta.id, meta.state
            ),
        ));
    }
    if !meta.interactive {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "run {} has no TTY (it was started without -i); attach with -i=false to follow its output",
                meta.id
            ),
        ));
    }
    let meta_for_stop = meta.clone();
    let engine = meta.engine;
    let container = meta.container.clone().ok_or_else(|| {
        Error::new(
            ErrorKind::Runtime,
            format!("run {} has no container yet", meta.id),
        )
    })?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut input = input;
        let mut buf = [0u8; 4096];
        loop {
            match input.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let end = crate::rt::run_async_local(async move {
        let docker = crate::runtime::connect(engine).await?;
        let (mut out_stream, mut sink) = docker.attach_tty(&container).await?;
        if let Some(attached) = attached {
            tokio::task::spawn_blocking(attached)
                .await
                .map_err(|e| Error::new(ErrorKind::Internal, format!("attach task: {e}")))??;
        }
        if let Some((rows, cols)) = size() {
            let _ = docker.resize_tty(&container, rows, cols).await;
        }
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
        let mut escapes = EscapeReader::default();
        let mut input_open = true;
        loop {
            tokio::select! {
                item = out_stream.next() => match item {
                    Some(Ok(Output::Stdout(b) | Output::Stderr(b))) => {
                        let _ = output.write_all(&b).and_then(|()| output.flush());
                    }
                    Some(Err(e)) => return Err(e),
                    None => return Ok(None),
                },
                _ = async {
                    match winch.as_mut() {
                        Some(w) => {
                            w.recv().await;
                        }
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some((rows, cols)) = size() {
                        let _ = docker.resize_tty(&container, rows, cols).await;
                    }
                }
                data = rx.recv(), if input_open => match data {
                    Some(data) => {
                        for action in escapes.feed(&data) {
                            match action {
                                Input::Forward(bytes) => {
                                    let _ = sink.write_all(&bytes).await;
                                    let _ = sink.flush().await;
                                }
                                Input::Detach => return Ok(Some(false)),
                                Input::Stop => return Ok(Some(true)),
                            }
                        }
                    }
                    None => {
                        input_open = false;
                        let _ = sink.shutdown().await;
                    }
                },
            }
        }
    })?;
    match end {
        None => Ok(AttachEnd::Exited(super::wait(
            home,
            id,
            Some(Duration::from_secs(60)),
        )?)),
        Some(false) => Ok(AttachEnd::Detached),
        Some(true) => Ok(AttachEnd::Stopped(super::stop(home, &meta_for_stop, 10)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_detach_stop_and_pass_everything_else() {
        let mut r = EscapeReader::default();
        assert_eq!(r.feed(b"ls\r"), vec![Input::Forward(b"ls\r".to_vec())]);
        assert_eq!(
            r.feed(&[b'a', ESCAPE, b'd', b'z']),
            vec![Input::Forward(b"a".to_vec()), Input::Detach]
        );
        let mut r = EscapeReader::default();
        assert_eq!(r.feed(&[ESCAPE]), vec![]);
        assert_eq!(r.feed(b"k"), vec![Input::Stop]);
        let mut r = EscapeReader::default();
        assert_eq!(
            r.feed(&[ESCAPE, b'x', 3]),
            vec![Input::Forward(vec![ESCAPE, b'x', 3])]
        );
        // Ctrl+C (0x03) is the container's, not moat's.
        assert_eq!(r.feed(&[3]), vec![Input::Forward(vec![3])]);
    }
}
