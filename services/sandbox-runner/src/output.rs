//! A sandbox's redacted output: the last 8 MiB kept for replay, live output
//! for every open stream, and the exit status as the last message.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

use crate::model::Exit;

/// Output kept per sandbox for replay.
pub const BUFFER_BYTES: usize = 8 << 20;
/// Largest chunk sent.
pub const CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

/// A chunk of redacted output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    seq: u64,
    pub stream: Stream,
    /// Offset of the first byte in its stream's redacted output.
    pub offset: u64,
    pub data: Bytes,
}

#[derive(Debug, Default)]
struct Buf {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    next_seq: u64,
    offsets: [u64; 2],
    exit: Option<Exit>,
}

/// One sandbox's output.
#[derive(Debug)]
pub struct Output {
    buf: Mutex<Buf>,
    changed: watch::Sender<u64>,
}

impl Default for Output {
    fn default() -> Self {
        Self {
            buf: Mutex::new(Buf::default()),
            changed: watch::channel(0).0,
        }
    }
}

/// What a reader gets next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Chunk(Chunk),
    Exit(Exit),
}

impl Output {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buf> {
        self.buf.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends redacted bytes; the oldest chunks go beyond [`BUFFER_BYTES`].
    pub fn push(&self, stream: Stream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut b = self.lock();
        if b.exit.is_some() {
            return;
        }
        for piece in data.chunks(CHUNK_BYTES) {
            let seq = b.next_seq;
            b.next_seq += 1;
            let offset = b.offsets[stream.index()];
            b.offsets[stream.index()] += piece.len() as u64;
            b.bytes += piece.len();
            b.chunks.push_back(Chunk {
                seq,
                stream,
                offset,
                data: Bytes::copy_from_slice(piece),
            });
        }
        while b.bytes > BUFFER_BYTES
            && let Some(old) = b.chunks.pop_front()
        {
            b.bytes -= old.data.len();
        }
        drop(b);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Records the end; nothing is appended after it. The first end wins.
    pub fn finish(&self, exit: Exit) {
        let mut b = self.lock();
        if b.exit.is_none() {
            b.exit = Some(exit);
        }
        drop(b);
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn exit(&self) -> Option<Exit> {
        self.lock().exit.clone()
    }

    /// A reader from `from_offset` in each stream (0: the start).
    pub fn reader(self: &Arc<Self>, from_offset: u64) -> Reader {
        Reader {
            output: self.clone(),
            rx: self.changed.subscribe(),
            next_seq: 0,
            from_offset,
            done: false,
        }
    }
}

/// Reads one sandbox's output: the buffered part, then live, then the exit.
#[derive(Debug)]
pub struct Reader {
    output: Arc<Output>,
    rx: watch::Receiver<u64>,
    next_seq: u64,
    from_offset: u64,
    done: bool,
}

impl Reader {
    /// The next item; `None` after the exit.
    pub async fn next(&mut self) -> Option<Item> {
        loop {
            if self.done {
                return None;
            }
            self.rx.borrow_and_update();
            {
                let b = self.output.lock();
                // Chunks are in sequence order; those dropped are skipped.
                let start = b.chunks.partition_point(|c| c.seq < self.next_seq);
                for c in b.chunks.iter().skip(start) {
                    self.next_seq = c.seq + 1;
                    let end = c.offset + c.data.len() as u64;
                    if end <= self.from_offset {
                        continue;
                    }
                    let mut c = c.clone();
                    if c.offset < self.from_offset {
                        let skip = usize::try_from(self.from_offset - c.offset).unwrap_or(0);
                        c.data = c.data.slice(skip..);
                        c.offset = self.from_offset;
                    }
                    return Some(Item::Chunk(c));
                }
                if let Some(exit) = &b.exit {
                    self.done = true;
                    return Some(Item::Exit(exit.clone()));
                }
            }
            if self.rx.changed().await.is_err() {
                // The output is gone with its sandbox: nothing more will come.
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ExitReason;

    fn exit() -> Exit {
        Exit {
            reason: ExitReason::Exited,
            code: 0,
            signal: 0,
            message: String::new(),
            at: std::time::SystemTime::now(),
        }
    }

    #[tokio::test]
    async fn replay_then_live_then_exit() {
        let out = Arc::new(Output::default());
        out.push(Stream::Stdout, b"one ");
        out.push(Stream::Stderr, b"err");
        let mut r = out.reader(0);
        let Some(Item::Chunk(c)) = r.next().await else {
            panic!("chunk")
        };
        assert_eq!(
            (c.stream, c.offset, &c.data[..]),
            (Stream::Stdout, 0, &b"one "[..])
        );
        let Some(Item::Chunk(c)) = r.next().await else {
            panic!("chunk")
        };
        assert_eq!((c.stream, c.offset), (Stream::Stderr, 0));
        let live = out.clone();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            live.push(Stream::Stdout, b"two");
            live.finish(exit());
        });
        let Some(Item::Chunk(c)) = r.next().await else {
            panic!("live chunk")
        };
        assert_eq!((c.offset, &c.data[..]), (4, &b"two"[..]));
        assert!(matches!(r.next().await, Some(Item::Exit(_))));
        assert_eq!(r.next().await, None);
        writer.await.expect("writer");
    }

    #[tokio::test]
    async fn resume_from_an_offset_and_drop_the_oldest() {
        let out = Arc::new(Output::default());
        out.push(Stream::Stdout, b"0123456789");
        out.finish(exit());
        let mut r = out.reader(4);
        let Some(Item::Chunk(c)) = r.next().await else {
            panic!("chunk")
        };
        assert_eq!((c.offset, &c.data[..]), (4, &b"456789"[..]));

        let big = Arc::new(Output::default());
        let block = vec![b'x'; CHUNK_BYTES];
        for _ in 0..(BUFFER_BYTES / CHUNK_BYTES + 3) {
            big.push(Stream::Stdout, &block);
        }
        let mut r = big.reader(0);
        let Some(Item::Chunk(c)) = r.next().await else {
            panic!("chunk")
        };
        assert_eq!(
            c.offset,
            3 * CHUNK_BYTES as u64,
            "the oldest output is skipped"
        );
    }
}
